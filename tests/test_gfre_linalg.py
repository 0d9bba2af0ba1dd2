"""Blocked statistics (Gram, TSQR) and the factor-based ridge of the GFRE engine."""

import dask.array as da
import numpy as np
import pytest

from dfre.linalg.gram import group_statistics
from dfre.linalg.ridge import factor_svd
from dfre.linalg.scaling import flexible_scaling, scaled_factor


def ill_conditioned(n=3000, d=8, seed=0):
    """Centred singular values spread from 1 to 1e-10, on top of an offset."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = np.logspace(0, -10, d) * np.sqrt(n)
    x = (q - q.mean(axis=0)) * s @ v.T
    return x + 3.0, np.linalg.svd(x - x.mean(axis=0), compute_uv=False)


@pytest.mark.parametrize("solver", ["gram", "tsqr"])
def test_chunked_statistics_of_groups_equal_direct(solver):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 5)) * [1, 2, 3, 4, 5] + 1e4
    labels = rng.integers(-1, 3, size=1000)
    stats = group_statistics(da.from_array(x, chunks=(97, -1)), labels, 3, solver=solver)
    for g in range(3):
        rows = x[labels == g]
        assert stats.count[g] == len(rows)
        np.testing.assert_allclose(stats.mean[g] + stats.shift, rows.mean(axis=0), rtol=1e-14)
        centred = rows - rows.mean(axis=0)
        np.testing.assert_allclose(stats.scatter(g), centred.T @ centred, rtol=1e-9, atol=1e-9)
    union = stats.union([0, 1, 2])
    used = x[labels >= 0]
    np.testing.assert_allclose(union.mean[0] + union.shift, used.mean(axis=0), rtol=1e-14)


def test_tsqr_keeps_tiny_singular_values_that_gram_cannot_resolve():
    x, s_true = ill_conditioned()
    labels = np.zeros(len(x), dtype=int)
    found = {}
    for solver in ("gram", "tsqr"):
        stats = group_statistics(da.from_array(x, chunks=(500, -1)), labels, 1, solver=solver)
        n, mean, second = stats.group(0)
        scaling = flexible_scaling(n, mean, np.diag(stats.scatter(0)), [slice(0, 8)], ["x"])
        factor = scaled_factor(solver, n, mean, second, scaling)
        s = factor_svd(factor.matrix, factor.floor, exact=solver == "tsqr").s * scaling.scale[0]
        found[solver] = np.pad(s, (0, 8 - len(s)))  # a rank-revealing factor may be short
    np.testing.assert_allclose(found["tsqr"], s_true, rtol=1e-6)
    # the normal equations resolve the top of the spectrum, and zero what they cannot
    np.testing.assert_allclose(found["gram"][:3], s_true[:3], rtol=1e-6)
    assert np.all(found["gram"][s_true < 1e-8 * s_true[0]] == 0)
