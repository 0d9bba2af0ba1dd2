"""Tall-skinny QR: a tree of small QR factorisations, one pass over the rows.

Each block of rows is centred on its own mean and reduced to the triangular factor of
its QR decomposition, :math:`Z_c = Q R`; two partial factors of disjoint row sets merge as

.. math::

    R = \\operatorname{qr}\\begin{pmatrix} R_a \\\\ R_b \\\\
        \\sqrt{n_a n_b / n}\\,(\\mu_b - \\mu_a)^T \\end{pmatrix},

so that :math:`R^T R` is the centred scatter matrix of the union (see
:mod:`dfre.linalg.gram` for the means). Unlike the scatter matrix itself, :math:`R` keeps
the singular values of the data to working precision: use ``solver="tsqr"`` when the
feature sets are ill-conditioned (singular values below about :math:`10^{-7} s_{max}`,
where the squared singular values of the normal equations drown in rounding errors).
It costs about twice the flops of the Gram pass.
"""

from __future__ import annotations

from dfre.linalg.backend import array_module


def _r_factor(a):
    xp = array_module(a)
    return xp.linalg.qr(a, mode="r")


def tsqr_part(z):
    """Count, mean and centred R factor of the float64 rows ``z``."""
    xp = array_module(z)
    n, d = z.shape
    if n == 0:
        return 0.0, xp.zeros(d), xp.zeros((0, d))
    mean = z.mean(axis=0)
    return float(n), mean, _r_factor(z - mean)


def tsqr_merge(a, b):
    """Merge two (count, mean, R) triples of disjoint row sets."""
    na, ma, ra = a
    nb, mb, rb = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    xp = array_module(delta)
    stacked = xp.concatenate([ra, rb, (delta * (na * nb / n) ** 0.5)[None]])
    return n, ma + delta * (nb / n), _r_factor(stacked)
