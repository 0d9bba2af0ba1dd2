"""Singular-value spectra of feature sets from the one-pass group statistics.

For the centred train rows :math:`X_c` (n, d) of a feature set (in the units it is
stored in), the statistics of :mod:`dfre.linalg.gram` give its singular values
:math:`s_1 \\ge \\dots \\ge s_d`: exactly from a QR factor (``solver="tsqr"``,
:math:`X_c = Q R`, the singular values of ``R``), or from the eigenvalues of the scatter
matrix :math:`M = X_c^T X_c` (``solver="gram"``), whose absolute error is of order
:math:`d\\,\\epsilon\\,s_1^2`, so that singular values below about
:math:`\\sqrt{d\\epsilon}\\, s_1 \\approx 10^{-7} s_1` are lost in rounding.

**Noise floor.** Features stored in a floating-point type of unit roundoff ``u``
(:math:`2^{-24}` for float32) are known only up to a relative error ``u`` per value. The
perturbation of one unit roundoff in every stored value has the norm

.. math::

    \\nu = u\\, \\|X\\|_F

(:math:`\\|X\\|_F` of the rows as stored, not centred: rounding happens there), and no
singular value below :math:`\\nu` can be told apart from such a perturbation; the
*numerical rank* counts the singular values above it. It is the least noise stored
features carry: a model's own float32 arithmetic adds more (CHGNet 0.3.0 evaluated in
float32 and in float64 differs by 5.7 :math:`\\nu` for its backbone and 12.2 :math:`\\nu`
for its last-layer features in spectral norm over 1,271 atoms of the sample dataset:
``python benchmarks/real_features.py --atoms 2500``).

**Resolution of the normal equations.** A ridge map fitted from a Gram matrix matches
the SVD solution (scikit-matter's) to about :math:`d\\,\\epsilon\\,\\kappa^2` relative,
with :math:`\\kappa` the ratio of the largest to the smallest singular value the cutoff
keeps. :data:`GRAM_RESOLVED` bounds :math:`1/\\kappa` for the Gram path: a source set
whose spectrum reaches below it, with a cutoff grid that reaches there too, needs the
exact (QR) path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Smallest s / s_max at which the Gram (normal-equation) path is trusted to reproduce
#: the SVD path to 1e-6: d * eps / GRAM_RESOLVED**2 stays below 1e-6 for d up to ~500.
GRAM_RESOLVED = 1e-4


def unit_roundoff(dtype) -> float:
    """Unit roundoff of a stored floating dtype (2**-24 for float32); float64 otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    return float(np.finfo(dtype).eps) / 2.0


@dataclass
class SetSpectrum:
    """Singular values of one feature set's centred train rows, and what they rest on."""

    name: str
    dim: int
    n_rows: float
    singular_values: np.ndarray  # (min(n, d),) descending, in the stored units
    noise_floor: float  # nu, same units
    smallest_ratio: float  # min over the CV folds and train rows of s_min / s_max
    exact: bool  # from a QR factor (True) or a Gram matrix (False)

    @property
    def s_max(self) -> float:
        return float(self.singular_values[0]) if len(self.singular_values) else 0.0

    @property
    def rank(self) -> int:
        """Numerical rank: singular values above the storage noise floor."""
        return int(np.sum(self.singular_values > self.noise_floor))

    @property
    def noise_ratio(self) -> float:
        """The noise floor relative to the largest singular value."""
        return self.noise_floor / self.s_max if self.s_max > 0 else np.inf

    @property
    def condition(self) -> float:
        """:math:`s_{max} / s_{min}` over the singular values above the noise floor."""
        above = self.singular_values[self.singular_values > self.noise_floor]
        return float(above[0] / above[-1]) if len(above) else np.inf

    def resolved(self, smallest_relative_cutoff: float | None = None) -> bool:
        """Whether the Gram path reproduces the SVD path for this set as a source.

        True when the spectrum is known exactly, when it stays above
        :data:`GRAM_RESOLVED` of its largest value, or when no cutoff of the grid
        (``smallest_relative_cutoff``, relative to :math:`s_{max}`) reaches below it.
        """
        if self.exact or self.smallest_ratio >= GRAM_RESOLVED:
            return True
        return smallest_relative_cutoff is not None and smallest_relative_cutoff >= GRAM_RESOLVED

    def to_json(self) -> dict:
        return {
            "dim": self.dim,
            "rank": self.rank,
            "condition": _finite_or_none(self.condition),
            "noise_floor": _finite_or_none(self.noise_ratio),
            "smallest_singular_value": _finite_or_none(
                float(self.singular_values[-1]) / self.s_max if self.s_max > 0 else np.inf
            ),
            "exact_spectrum": self.exact,
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _block_singular_values(stats, g: int, sl: slice, centre: np.ndarray | None) -> np.ndarray:
    """Singular values (descending) of the rows of group ``g``, columns ``sl``, centred on
    ``centre`` (default: the group's own mean)."""
    count, mean, second = stats.group(g)
    delta = np.zeros(sl.stop - sl.start) if centre is None else (mean - centre)[sl]
    if stats.kind == "tsqr":
        block = np.concatenate([second[:, sl], np.sqrt(count) * delta[None]])
        return np.linalg.svd(block, compute_uv=False)
    scatter = second[sl, sl] + count * np.outer(delta, delta)
    return np.sqrt(np.clip(np.linalg.eigvalsh(scatter)[::-1], 0.0, None))


def _ratio(s: np.ndarray) -> float:
    return float(s[-1] / s[0]) if len(s) and s[0] > 0 else 0.0


def set_spectra(
    stats,
    names: Sequence[str],
    slices: Sequence[slice],
    dtypes: Sequence,
    fold_groups: Sequence[tuple[int, int]],
) -> list[SetSpectrum]:
    """Spectra of every feature set from group statistics (numpy, see ``gram``).

    ``fold_groups`` lists, per selection fold, the groups of its two CV folds; their union
    is the fold's train rows. Singular values and noise floor are those of the first
    fold's train rows; the smallest ratio is taken over every CV fold and train set (the
    matrices the ridge decomposes), each centred on its train mean as the scaler does.
    """
    trains = [stats.union(list(groups)) for groups in fold_groups]
    shift = np.zeros(stats.mean.shape[1]) if stats.shift is None else stats.shift
    out = []
    for name, sl, dtype in zip(names, slices, dtypes, strict=True):
        ratios = []
        for groups, train in zip(fold_groups, trains, strict=True):
            centre = train.mean[0]
            ratios.append(_ratio(_block_singular_values(train, 0, sl, None)))
            ratios.extend(_ratio(_block_singular_values(stats, g, sl, centre)) for g in groups)
        train = trains[0]
        count, mean, second = train.group(0)
        diag = np.diag(train.scatter(0))[sl]
        frobenius = np.sqrt(float(np.sum(diag + count * (mean[sl] + shift[sl]) ** 2)))
        d = sl.stop - sl.start
        floor = unit_roundoff(dtype) * frobenius
        s = _block_singular_values(train, 0, sl, None)[: int(min(count, d))]
        out.append(
            SetSpectrum(str(name), d, count, s, float(floor), min(ratios), stats.kind == "tsqr")
        )
    return out
