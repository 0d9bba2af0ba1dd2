"""Batched local ridge against skmatter's Ridge2FoldCV fitted neighbourhood by neighbourhood."""

import numpy as np
import pytest
from sklearn.model_selection import KFold
from skmatter.linear_model import Ridge2FoldCV

import dfre.linalg.local_ridge as local_ridge_module
from dfre.linalg.local_ridge import DEFAULT_ALPHAS, fold_positions, local_ridge


def skmatter_local(xn, yn, xq):
    """skmatter's local fit of pointwise_local_reconstruction_error, one query at a time."""
    est = Ridge2FoldCV(
        alphas=np.geomspace(1e-9, 0.9, 20),
        alpha_type="relative",
        regularization_method="cutoff",
        random_state=0x5F3759DF,
        shuffle=True,
        scoring="neg_root_mean_squared_error",
        n_jobs=1,
    )
    pred, alpha = [], []
    for x, y, q in zip(xn, yn, xq, strict=True):
        xm, ym = x.mean(axis=0), y.mean(axis=0)
        est.fit(x - xm, y - ym)
        pred.append(ym + est.predict((q - xm)[None])[0])
        alpha.append(est.alpha_)
    return np.array(pred), np.array(alpha)


def neighbourhoods(b, k, dx, dy, seed=0, rank=None, noise=0.0):
    rng = np.random.default_rng(seed)
    rank = rank or dx
    x = rng.normal(size=(b, k, rank)) @ rng.normal(size=(rank, dx))
    x += noise * rng.normal(size=x.shape)
    y = np.tanh(x @ rng.normal(size=(dx, dy)) / np.sqrt(dx)) + 0.01 * rng.normal(size=(b, k, dy))
    q = x[:, 0] + 0.1 * rng.normal(size=(b, dx))
    return x, y, q


def test_fold_positions_are_ridge2foldcv_split():
    for k in (2, 9, 20, 33):
        cv = KFold(n_splits=2, shuffle=True, random_state=0x5F3759DF)
        f1, f2 = next(cv.split(np.zeros((k, 3))))
        g1, g2 = fold_positions(k)
        np.testing.assert_array_equal(f1, g1)
        np.testing.assert_array_equal(f2, g2)


@pytest.mark.parametrize(
    "b, k, dx, dy",
    [(25, 20, 12, 12), (20, 31, 40, 5), (15, 40, 8, 6), (10, 64, 70, 30), (12, 2, 3, 2)],
)
def test_kernel_path_equals_skmatter(b, k, dx, dy):
    x, y, q = neighbourhoods(b, k, dx, dy, seed=k)
    ref, ref_alpha = skmatter_local(x, y, q)
    res = local_ridge(x, y, q)
    np.testing.assert_allclose(res.prediction, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.alpha, ref_alpha)


def test_ill_conditioned_neighbourhoods_fall_back_to_svd_and_still_match():
    # rank 3 in 10 dimensions plus tiny noise: singular values span 1e-9 s_max
    x, y, q = neighbourhoods(20, 24, 10, 4, seed=3, rank=3, noise=1e-9)
    ref, ref_alpha = skmatter_local(x, y, q)
    res = local_ridge(x, y, q)
    assert res.n_exact > 0
    np.testing.assert_allclose(res.prediction, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.alpha, ref_alpha)
    # the kernel alone squares the condition number and would be far off here
    assert not np.allclose(local_ridge(x, y, q, method="kernel").prediction, ref, atol=1e-3)
    svd = local_ridge(x, y, q, method="svd")
    np.testing.assert_allclose(svd.prediction, ref, rtol=1e-9, atol=1e-12)


def test_exact_linear_target_and_identical_points():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 16, 5))
    x[:, 8:] = x[:, :8]  # every neighbour twice
    y = x @ rng.normal(size=(5, 3)) + 1.0  # exactly linear: error at rounding level
    q = rng.normal(size=(8, 5))
    ref, _ = skmatter_local(x, y, q)
    res = local_ridge(x, y, q)
    np.testing.assert_allclose(res.prediction, ref, rtol=1e-8, atol=1e-10)
    flat = np.ones((3, 6, 4))  # all neighbours identical: prediction is the target mean
    yf = np.arange(18.0).reshape(3, 6, 1)
    res = local_ridge(flat, yf, np.zeros((3, 4)))
    np.testing.assert_allclose(res.prediction[:, 0], yf.mean(axis=1)[:, 0])


def test_several_targets_share_the_source_decompositions():
    x, y, q = neighbourhoods(10, 30, 12, 9, seed=7)
    targets = [y[..., :4], y[..., 4:], np.sin(y)]
    together = local_ridge(x, targets, q, alphas=DEFAULT_ALPHAS)
    for t, res in zip(targets, together, strict=True):
        alone = local_ridge(x, t, q)
        np.testing.assert_array_equal(res.prediction, alone.prediction)
        np.testing.assert_array_equal(res.alpha, alone.alpha)


def test_all_components_kept_takes_the_linear_solve_and_matches():
    """Nearly linear targets choose the smallest alpha: the refit keeps every component
    and is a linear solve with the reflected kernel (k - 1 <= d)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 16, 20))
    y = x @ rng.normal(size=(20, 3)) + 1e-3 * rng.normal(size=(8, 16, 3))
    q = rng.normal(size=(8, 20))
    ref, ref_alpha = skmatter_local(x, y, q)
    res = local_ridge(x, y, q)
    assert (ref_alpha == 1e-9).sum() >= 6
    np.testing.assert_allclose(res.prediction, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.alpha, ref_alpha)


def test_neighbours_given_in_fold_order_give_the_same_fit():
    x, y, q = neighbourhoods(6, 21, 9, 4, seed=9)
    order = np.concatenate(fold_positions(21))
    given = local_ridge(x[:, order], y[:, order], q, fold_ordered=True)
    plain = local_ridge(x, y, q)
    np.testing.assert_allclose(given.prediction, plain.prediction, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(given.alpha, plain.alpha)


@pytest.mark.parametrize("gufunc", [True, False])
def test_cholesky_certificate_per_matrix(monkeypatch, gufunc):
    """numpy's gufunc flags each failed factor; without it the smallest eigenvalue decides."""
    if not gufunc:
        monkeypatch.setattr(local_ridge_module, "_cholesky_gufunc", None)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 7, 7))
    spd = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(7)
    shifts = np.array([0.0, 1e3, 0.0, -1.0, 1e3])  # subtracting 1e3 I leaves it indefinite
    matrices = spd - shifts[:, None, None] * np.eye(7)
    ok = local_ridge_module._cholesky_succeeds(matrices)
    np.testing.assert_array_equal(ok, [True, False, True, True, False])


def test_all_kept_refit_skips_the_eigendecomposition(monkeypatch):
    """When every component is certified kept, the refit is a solve: no eigh of K."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 16, 20))
    y = x @ rng.normal(size=(20, 3)) + 1e-3 * rng.normal(size=(8, 16, 3))
    q = rng.normal(size=(8, 20))
    sizes = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda m: sizes.append(m.shape) or eigh(m))
    res = local_ridge(x, y, q)
    ref, ref_alpha = skmatter_local(x, y, q)
    np.testing.assert_allclose(res.prediction, ref, rtol=1e-9, atol=1e-12)
    refits = [shape[0] for shape in sizes if shape[-1] == 15]  # (k - 1) x (k - 1) kernels
    assert sum(refits) == (ref_alpha != 1e-9).sum() < 8  # only items that cut components
