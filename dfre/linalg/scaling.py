"""skmatter's ``StandardFlexibleScaler`` from group statistics, and scaled data factors.

The scaler is fitted on the train rows of each feature set :math:`X` (n, d):

.. math::

    \\mu = \\frac{1}{n}\\sum_i x_i, \\qquad
    s = \\sqrt{\\sum_{j=1}^{d} \\frac{1}{n}\\sum_i (x_{ij} - \\mu_j)^2}, \\qquad
    \\tilde x_i = (x_i - \\mu) / s,

so the scaled train rows have a total variance of 1 (skmatter refuses
:math:`s^2 < 10^{-12}`). Every quantity of a linear reconstruction depends on the scaled
rows of a group only through a *factor* :math:`F` with
:math:`F^T F = \\tilde Z_g^T \\tilde Z_g`, built here from the group's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dfre.errors import DfreError
from dfre.linalg.backend import array_module

#: skmatter's ``StandardFlexibleScaler(atol=1e-12)``: smallest total variance accepted.
ZERO_VARIANCE = 1e-12
EPS = np.finfo(np.float64).eps


@dataclass
class FlexibleScaling:
    """Train mean (D,) of the concatenated sets minus ``shift`` and one scale per set (M,).

    A row ``z`` scales to ``(z - shift - mean) / column_scale``.
    """

    mean: np.ndarray
    scale: np.ndarray
    slices: list[slice]
    shift: np.ndarray | None = None

    @property
    def column_scale(self) -> np.ndarray:
        """The scale of every column (D,)."""
        out = np.empty(self.mean.shape[0])
        for sl, s in zip(self.slices, self.scale, strict=True):
            out[sl] = s
        return out


def flexible_scaling(
    count: float,
    mean: np.ndarray,
    scatter_diag: np.ndarray,
    slices: Sequence[slice],
    names: Sequence[str],
    shift: np.ndarray | None = None,
) -> FlexibleScaling:
    """Fit the scaler of every feature set from the train count, mean and scatter diagonal."""
    scales = []
    for sl, name in zip(slices, names, strict=True):
        var_sum = float(scatter_diag[sl].sum()) / count
        if not var_sum >= ZERO_VARIANCE:
            raise DfreError(
                f"feature set {name} is constant on the train rows (total variance "
                f"{var_sum:.3g}): it cannot be scaled; drop it or check how it was computed"
            )
        scales.append(np.sqrt(var_sum))
    mean = np.asarray(mean, dtype=np.float64)
    shift = np.zeros_like(mean) if shift is None else np.asarray(shift, dtype=np.float64)
    return FlexibleScaling(mean, np.array(scales), list(slices), shift)


@dataclass
class Factor:
    """Rows ``matrix`` (r, D) with ``matrixᵀ matrix`` = scaled scatter of a group about the
    train mean; singular values of its column blocks below ``floor`` are noise."""

    matrix: np.ndarray
    count: float
    floor: float


def scaled_factor(
    kind: str, count: float, mean: np.ndarray, second: np.ndarray, scaling: FlexibleScaling
) -> Factor:
    """Factor of the group's rows centred on the *train* mean and scaled per set.

    With :math:`\\delta = \\mu_g - \\mu` the scatter about the train mean is
    :math:`M_g + n_g \\delta\\delta^T`. For ``kind="tsqr"`` the factor is
    :math:`[R_g; \\sqrt{n_g}\\delta^T] / c` (``c`` the column scales), exact to working
    precision. For ``kind="gram"`` it is :math:`R P^T` from the pivoted (rank-revealing)
    Cholesky factorisation :math:`P^T G P = R^T R` of the scaled scatter matrix ``G``
    (LAPACK ``dpstrf``, which stops at pivots below :math:`D\\,\\epsilon\\,\\max G_{ii}`);
    singular values of its column blocks below
    :math:`\\sqrt{D\\,\\epsilon \\max_i G_{ii}}` are rounding noise (``floor``).
    """
    c = scaling.column_scale
    delta = mean - scaling.mean
    if kind == "tsqr":
        stacked = np.concatenate([second, np.sqrt(count) * delta[None]]) / c
        return Factor(stacked, count, 0.0)
    gram = (second + count * np.outer(delta, delta)) / np.outer(c, c)
    return Factor(gram_factor(gram), count, np.sqrt(gram.shape[0] * EPS * gram.diagonal().max()))


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """``F`` (rank, D) with :math:`F^T F = G` for a symmetric positive semidefinite ``G``."""
    from scipy.linalg.lapack import dpstrf

    r, piv, rank, info = dpstrf(gram, lower=0)
    if info < 0:
        raise ValueError(f"dpstrf: illegal argument {-info}")
    factor = np.zeros((max(rank, 1), gram.shape[0]))
    factor[:, piv[: len(piv)] - 1] = np.triu(r)[: max(rank, 1)]
    if rank == 0:
        factor[:] = 0.0
    return factor


def scale_rows(block, shift, scale: float):
    """``(block - shift) / scale`` in float64 (a fitted scaler's transform, two passes);
    with ``shift`` None and ``scale`` 1 the block itself, as float64."""
    xp = array_module(block)
    if shift is None:
        out = xp.asarray(block, dtype=xp.float64)
        return out if scale == 1.0 else out / scale
    out = xp.subtract(block, xp.asarray(shift), dtype=xp.float64)
    out /= scale
    return out
