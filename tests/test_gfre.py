"""GFRE engine against scikit-matter itself (values, chosen alphas, defaults)."""

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from skmatter.datasets import load_degenerate_CH4_manifold
from skmatter.linear_model import Ridge2FoldCV
from skmatter.metrics import global_reconstruction_distortion as sk_gfrd
from skmatter.metrics import global_reconstruction_error as sk_gfre
from skmatter.metrics import pointwise_global_reconstruction_distortion as sk_pw_gfrd
from skmatter.metrics import pointwise_global_reconstruction_error as sk_pw_gfre
from skmatter.metrics._reconstruction_measures import (
    _prepare_data,
    check_global_reconstruction_measures_input,
)

import dfre.metrics as dm
from dfre.data.selection import Selection, make_selection
from dfre.metrics import gfre_matrix

RTOL = 1e-6


def correlated(n, dims, seed=0, rank=None):
    """Feature sets that are nonlinear maps of a shared 6-d latent plus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    out = []
    for i, d in enumerate(dims):
        proj = rng.normal(size=(6, d))
        f = np.tanh(latent @ proj) if i % 2 else np.sin(latent @ proj)
        out.append(f + 0.1 * rng.normal(size=(n, d)) + rng.normal(size=d))
    if rank is not None:  # make the first set rank-deficient: its columns span `rank` dims
        out[0] = out[0][:, :rank] @ rng.normal(size=(rank, dims[0]))
    return out


def split(n, n_test, seed=1):
    rng = np.random.default_rng(seed)
    test = np.sort(rng.choice(n, n_test, replace=False))
    return np.setdiff1d(np.arange(n), test), test


def reference(sets, train, test):
    """skmatter's GFRE matrix and chosen (relative) alphas."""
    m = len(sets)
    gfre, alpha = np.zeros((m, m)), np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            x, y = sets[a].astype(np.float64), sets[b].astype(np.float64)
            gfre[a, b] = sk_gfre(x, y, train_idx=train, test_idx=test)
            tr, te, scaler, est = check_global_reconstruction_measures_input(
                x, y, train, test, None, None
            )
            x_tr, _, y_tr, _ = _prepare_data(x, y, tr, te, scaler)
            alpha[a, b] = est.fit(x_tr, y_tr).alpha_
    return gfre, alpha


def assert_matches(result, ref_gfre, ref_alpha=None):
    off = ~np.eye(len(ref_gfre), dtype=bool)
    np.testing.assert_allclose(result.matrix[off], ref_gfre[off], rtol=RTOL)
    assert np.all(np.abs(np.diag(result.matrix)) < 1e-6)  # a set reconstructs itself
    if ref_alpha is not None:
        np.testing.assert_array_equal(result.alpha[off], ref_alpha[off])


@pytest.mark.parametrize("solver", ["auto", "gram", "tsqr"])
def test_well_conditioned_matches_skmatter(solver):
    sets = correlated(1500, (12, 20, 9))
    train, test = split(1500, 200)
    result = gfre_matrix(sets, (train, test), solver=solver, pointwise=True)
    assert_matches(result, *reference(sets, train, test))
    if solver == "auto":  # a well-conditioned spectrum keeps the fast normal equations
        assert result.config["solver_used"] == "gram" and not result.config["exact_path_for"]
    np.testing.assert_array_equal(result.test_rows, test)
    assert result.pointwise.shape == (3, 3, 200)
    for a, b in [(0, 1), (2, 0)]:
        np.testing.assert_allclose(
            result.pointwise[a, b],
            sk_pw_gfre(sets[a], sets[b], train_idx=train, test_idx=test),
            rtol=RTOL,
        )


@pytest.mark.parametrize("solver", ["auto", "gram", "tsqr"])
def test_rank_deficient_source_matches_skmatter(solver):
    sets = correlated(1200, (16, 10), seed=3, rank=5)
    assert np.linalg.matrix_rank(sets[0]) == 5
    train, test = split(1200, 150)
    assert_matches(gfre_matrix(sets, (train, test), solver=solver), *reference(sets, train, test))


def test_float32_matches_skmatter_on_float64_cast():
    sets = [s.astype(np.float32) for s in correlated(1000, (10, 14), seed=5)]
    train, test = split(1000, 100)
    result = gfre_matrix(sets, (train, test))
    assert_matches(result, *reference([s.astype(np.float64) for s in sets], train, test))


def test_degenerate_ch4_manifold_matches_skmatter():
    """skmatter's own example: power spectrum cannot reconstruct the bispectrum."""
    data = load_degenerate_CH4_manifold().data
    sets = [data["SOAP_power_spectrum"], data["SOAP_bispectrum"]]
    train, test = split(162, 40)
    ref_gfre, ref_alpha = reference(sets, train, test)
    for solver in ("tsqr", "auto"):
        result = gfre_matrix(sets, (train, test), solver=solver)
        assert_matches(result, ref_gfre, ref_alpha)
        assert result.matrix[0, 1] > result.matrix[1, 0]
    assert result.config["solver_used"] == "tsqr"  # auto: the spectra need the exact path
    # the default 50/50 split of skmatter, through the compatible function; there the
    # bispectrum reconstructs the power spectrum exactly up to rounding (skmatter: 5e-10)
    for x, y in [(sets[0], sets[1]), (sets[1], sets[0])]:
        ref = sk_gfre(x, y)
        assert dm.global_reconstruction_error(x, y) == pytest.approx(ref, rel=RTOL, abs=1e-7)


def test_dask_chunks_on_a_distributed_cluster_equal_numpy():
    sets = correlated(2000, (8, 13), seed=7)
    train, test = split(2000, 300)
    expected = gfre_matrix(sets, (train, test), pointwise=True)
    chunked = [da.from_array(s.astype(np.float32), chunks=(173, -1)) for s in sets]
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        for solver in ("gram", "tsqr"):
            got = gfre_matrix(chunked, (train, test), solver=solver, pointwise=True)
            off = ~np.eye(2, dtype=bool)
            np.testing.assert_allclose(got.matrix[off], expected.matrix[off], rtol=1e-5)
            np.testing.assert_allclose(
                got.pointwise[0, 1], expected.pointwise[0, 1], rtol=1e-4, atol=1e-7
            )
            np.testing.assert_allclose(got.cka, expected.cka, rtol=1e-6)


def test_kfold_tests_every_row_once_and_matches_skmatter_per_fold():
    sets = correlated(900, (7, 11), seed=9)
    selection = make_selection("kfold:3", 900, seed=2)
    result = gfre_matrix(sets, selection, pointwise=True)
    assert sorted(result.test_rows.tolist()) == list(range(900))
    start = 0
    squares = 0.0
    for train, test in selection.folds:
        ref = sk_pw_gfre(sets[0], sets[1], train_idx=train, test_idx=test)
        got = result.pointwise[0, 1, start : start + len(test)]
        np.testing.assert_allclose(got, ref, rtol=RTOL)
        squares += (ref**2).sum()
        start += len(test)
    assert result.matrix[0, 1] == pytest.approx(np.sqrt(squares / 900), rel=RTOL)


def test_stats_only_matrix_equals_pointwise_matrix():
    sets = correlated(800, (6, 9), seed=4)
    train, test = split(800, 100)
    a = gfre_matrix(sets, (train, test))
    b = gfre_matrix(sets, (train, test), pointwise=True)
    off = ~np.eye(2, dtype=bool)
    np.testing.assert_allclose(a.matrix[off], b.matrix[off], rtol=1e-9)


def test_cka_equals_direct_formula():
    sets = correlated(600, (5, 8, 4), seed=11)
    train, test = split(600, 60)
    result = gfre_matrix(sets, (train, test))
    for a in range(3):
        for b in range(3):
            x = sets[a] - sets[a].mean(axis=0)
            y = sets[b] - sets[b].mean(axis=0)
            direct = np.linalg.norm(x.T @ y) ** 2 / (
                np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
            )
            assert result.cka[a, b] == pytest.approx(direct, rel=1e-9)


def test_compatible_functions_follow_skmatter_defaults_and_orders():
    x, y = correlated(400, (6, 9), seed=13)
    rng = np.random.default_rng(0)
    test = rng.choice(400, 50, replace=False)  # unsorted: results follow this order
    train = rng.permutation(np.setdiff1d(np.arange(400), test))  # order sets the folds
    assert dm.global_reconstruction_error(x, y) == pytest.approx(sk_gfre(x, y), rel=RTOL)
    assert dm.global_reconstruction_error(x, y, test_idx=test) == pytest.approx(
        sk_gfre(x, y, test_idx=test), rel=RTOL
    )
    assert dm.global_reconstruction_error(y, x, train_idx=train) == pytest.approx(
        sk_gfre(y, x, train_idx=train), rel=RTOL
    )
    np.testing.assert_allclose(
        dm.pointwise_global_reconstruction_error(x, y, train, test),
        sk_pw_gfre(x, y, train, test),
        rtol=RTOL,
    )
    np.testing.assert_allclose(
        dm.pointwise_global_reconstruction_distortion(x, y, test, train),
        sk_pw_gfrd(x, y, test, train),
        rtol=RTOL,
    )
    assert dm.global_reconstruction_distortion(x, y) == pytest.approx(sk_gfrd(x, y), rel=RTOL)


@pytest.mark.parametrize(
    "estimator",
    [
        Ridge2FoldCV(
            alphas=np.geomspace(1e-6, 0.5, 9),
            alpha_type="relative",
            regularization_method="tikhonov",
            random_state=3,
        ),
        Ridge2FoldCV(
            alphas=[1e-3, 1e-1, 1.0, 10.0],
            alpha_type="absolute",
            regularization_method="cutoff",
            random_state=4,
        ),
        Ridge2FoldCV(
            alphas=[1e-4, 1e-2, 1.0],
            regularization_method="tikhonov",
            scoring="neg_mean_squared_error",
            shuffle=False,
        ),
    ],
)
def test_other_ridge_settings_match_skmatter(estimator):
    x, y = correlated(500, (7, 10), seed=17)
    train, test = split(500, 80)
    from sklearn.base import clone

    got = dm.global_reconstruction_error(x, y, test, train, estimator=clone(estimator))
    ref = sk_gfre(x, y, test, train, estimator=clone(estimator))
    assert got == pytest.approx(ref, rel=RTOL)


def test_selection_object_and_alpha_are_reported():
    sets = correlated(300, (4, 6), seed=19)
    train, test = split(300, 30)
    selection = Selection.explicit(train, test, 300)
    result = gfre_matrix(dict(zip(["a/ll", "b/bb"], sets, strict=True)), selection)
    assert result.names == ["a/ll", "b/bb"]
    assert result.selection is selection
    assert np.all(np.isin(result.alpha, np.geomspace(1e-9, 0.9, 20)))
