"""Error bars of reconstruction errors: a bootstrap over the test environments.

A GFRE or LFRE is a root mean square over the test environments,
:math:`E = \\sqrt{\\frac{1}{n}\\sum_i e_i^2}` with :math:`e_i` the pointwise errors.
Its uncertainty here is the standard error of :math:`E` under resampling of the test
environments: the standard deviation over ``B`` bootstrap replicates

.. math::

    E^{(b)} = \\sqrt{\\frac{\\sum_i w_{bi}\\, e_i^2}{\\sum_i w_{bi}}}, \\qquad
    w_{bi} \\sim \\mathrm{Poisson}(1)\\ \\text{independent},

the *Poisson bootstrap* (Hanley & MacGibbon 2006; Chamandy et al. 2012), which equals
the ordinary multinomial bootstrap as n grows and, unlike it, can be drawn in blocks of
environments (bounded memory for millions of test environments, every pair with one
matrix product per block).

Why this one: with the maps fitted on a training set far larger than the test set (the
paper's protocol: all but 1,000 environments), the spread of a reconstruction error
comes mostly from *which* environments are tested, and real feature sets have
heavy-tailed pointwise errors (a few environments can carry most of the squared error).
The bootstrap measures exactly that spread, with no distributional assumption, from the
pointwise errors dfre computes anyway, and it is the same for GFRE and LFRE, for one
test set or for k folds. It costs no refit. It does not include the variance of the
fitted maps over training sets, which the spread over selection seeds does: on 2,500
atoms of the sample dataset (CHGNet 0.3.0 and SevenNet-0 features, 500 random test
rows, 2,000 train rows, 10 seeds) the seed-to-seed standard deviation of the GFREs was
0.9 to 1.9 times the mean bootstrap error bar, 1.5 times in the median
(``python benchmarks/real_features.py --atoms 2500 --seeds 10 --test 500``). Read the
error bar as a lower bound on that spread; the training-set part of the spread shrinks
as the training set grows.
"""

from __future__ import annotations

import numpy as np

#: Bootstrap replicates.
N_BOOTSTRAP = 1000
#: Seed of the replicates (fixed: the same inputs always give the same error bars).
BOOTSTRAP_SEED = 20_240_601
#: Test environments drawn at a time (bounds the (B, block) weight matrix).
BLOCK = 4096


def bootstrap_standard_error(
    pointwise: np.ndarray, n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Standard error of :math:`\\sqrt{\\mathrm{mean}(e^2)}` over the last axis.

    ``pointwise`` (..., n) are pointwise errors; NaN entries (pairs not computed) give NaN.
    Returns an array of shape ``pointwise.shape[:-1]``.
    """
    pointwise = np.asarray(pointwise, dtype=np.float64)
    lead = pointwise.shape[:-1]
    n = pointwise.shape[-1]
    squares = pointwise.reshape(-1, n) ** 2  # (P, n)
    if n == 0:
        return np.full(lead, np.nan)
    computed = np.isfinite(squares).all(axis=1)
    squares = np.where(computed[:, None], squares, 0.0)
    rng = np.random.default_rng(seed)
    weighted = np.zeros((n_bootstrap, squares.shape[0]))
    total = np.zeros(n_bootstrap)
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        w = rng.poisson(1.0, size=(n_bootstrap, hi - lo)).astype(np.float64)
        weighted += w @ squares[:, lo:hi].T
        total += w.sum(axis=1)
    total = np.where(total > 0, total, np.nan)  # an empty replicate (only for tiny n)
    replicates = np.sqrt(weighted / total[:, None])
    error = np.nanstd(replicates, axis=0, ddof=1)
    error[~computed] = np.nan
    return error.reshape(lead)


def uncertainty_arrays(result) -> dict[str, np.ndarray]:
    """The error bars and per-entry diagnostics of a result, as arrays of ``results/<run>``:
    ``error`` (bootstrap standard error), ``tail_share``, ``median_error``, ``p95_error``."""
    out = {}
    if result.error is not None:
        out["error"] = np.asarray(result.error, dtype=np.float64)
    diag = result.diagnostics
    if diag is not None:
        out["tail_share"] = diag.tail_share
        out["median_error"] = diag.median
        out["p95_error"] = diag.p95
    return out
