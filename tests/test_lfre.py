"""LFRE engine against scikit-matter itself: pointwise values, defaults, inputs, k-fold."""

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from skmatter.datasets import load_degenerate_CH4_manifold
from skmatter.linear_model import Ridge2FoldCV
from skmatter.metrics import local_reconstruction_error as sk_lfre
from skmatter.metrics import pointwise_local_reconstruction_error as sk_pw_lfre
from skmatter.metrics._reconstruction_measures import (
    _prepare_data,
    check_local_reconstruction_measures_input,
)

import dfre.metrics as dm
from dfre.data.selection import Selection, make_selection
from dfre.errors import DfreError
from dfre.metrics import lfre_matrix

RTOL = 1e-6
#: Errors of exact local maps are rounding noise of O(1) features: compare them absolutely.
ATOL = 1e-12


def correlated(n, dims, seed=0):
    """Feature sets that are nonlinear maps of a shared 4-d latent plus a little noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    out = []
    for i, d in enumerate(dims):
        f = (
            np.tanh(latent @ rng.normal(size=(4, d)))
            if i % 2
            else np.sin(latent @ rng.normal(size=(4, d)))
        )
        out.append(f + 0.05 * rng.normal(size=(n, d)))
    return out


@pytest.fixture(scope="module")
def ch4():
    data = load_degenerate_CH4_manifold().data
    x, y = data["SOAP_power_spectrum"], data["SOAP_bispectrum"]
    return x, y, np.arange(0, len(x), 2), np.arange(1, len(x), 2)


@pytest.mark.parametrize("direction", ["power->bi", "bi->power", "power->power"])
def test_degenerate_ch4_manifold_equals_skmatter(ch4, direction):
    x, y, train, test = ch4
    source, target = {"power->bi": (x, y), "bi->power": (y, x), "power->power": (x, x)}[direction]
    ref = sk_pw_lfre(source, target, 20, train_idx=train, test_idx=test)
    ours = dm.pointwise_local_reconstruction_error(
        source, target, 20, train_idx=train, test_idx=test
    )
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    assert dm.local_reconstruction_error(
        source, target, 20, train_idx=train, test_idx=test
    ) == pytest.approx(
        sk_lfre(source, target, 20, train_idx=train, test_idx=test), rel=RTOL, abs=ATOL
    )


def test_power_spectrum_cannot_reconstruct_bispectrum_locally(ch4):
    """The paper's point about the degenerate manifold, as numbers."""
    x, y, train, test = ch4
    forward = dm.local_reconstruction_error(x, y, 20, train_idx=train, test_idx=test)
    backward = dm.local_reconstruction_error(y, x, 20, train_idx=train, test_idx=test)
    assert forward > 0.1 and backward < 1e-8


def test_default_split_and_test_only_and_train_only(ch4):
    x, y, train, test = ch4
    np.testing.assert_allclose(
        dm.pointwise_local_reconstruction_error(y, x, 15),
        sk_pw_lfre(y, x, 15),
        rtol=RTOL,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        dm.pointwise_local_reconstruction_error(x, y, 12, test_idx=test[::3]),
        sk_pw_lfre(x, y, 12, test_idx=test[::3]),
        rtol=RTOL,
        atol=ATOL,
    )
    shuffled = np.random.default_rng(3).permutation(train)  # order of train rows is kept
    np.testing.assert_allclose(
        dm.pointwise_local_reconstruction_error(y, x, 12, train_idx=shuffled),
        sk_pw_lfre(y, x, 12, train_idx=shuffled),
        rtol=RTOL,
        atol=ATOL,
    )


def test_correlated_sets_float32_and_dask_inputs():
    x, y = correlated(700, (9, 6), seed=4)
    rng = np.random.default_rng(0)
    test = np.sort(rng.choice(700, 90, replace=False))
    train = np.setdiff1d(np.arange(700), test)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    ref = sk_pw_lfre(
        x32.astype(np.float64), y32.astype(np.float64), 6, train_idx=train, test_idx=test
    )
    for xs, ys in [
        (x32, y32),
        (da.from_array(x32, chunks=(100, 9)), da.from_array(y32, chunks=(250, 6))),
    ]:
        ours = dm.pointwise_local_reconstruction_error(xs, ys, 6, train_idx=train, test_idx=test)
        np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    assert ref.min() > 1e-3  # a real reconstruction error, not rounding noise


def test_custom_alphas_and_non_default_estimator(ch4):
    x, y, train, test = ch4
    est = Ridge2FoldCV(
        alphas=np.geomspace(1e-6, 0.5, 7),
        alpha_type="relative",
        regularization_method="cutoff",
        random_state=0x5F3759DF,
        shuffle=True,
        scoring="neg_root_mean_squared_error",
    )
    np.testing.assert_allclose(
        dm.pointwise_local_reconstruction_error(
            x, y, 20, train_idx=train, test_idx=test, estimator=est
        ),
        sk_pw_lfre(x, y, 20, train_idx=train, test_idx=test, estimator=est),
        rtol=RTOL,
        atol=ATOL,
    )
    tikhonov = Ridge2FoldCV(alphas=[1e-3, 1e-1], regularization_method="tikhonov", random_state=1)
    # not reproduced by dfre: handed to skmatter, so still skmatter's numbers
    np.testing.assert_allclose(
        dm.pointwise_local_reconstruction_error(
            x, y, 20, train_idx=train, test_idx=test, estimator=tikhonov
        ),
        sk_pw_lfre(x, y, 20, train_idx=train, test_idx=test, estimator=tikhonov),
    )


def skmatter_pair(x, y, k, train, test):
    return sk_pw_lfre(x.astype(np.float64), y.astype(np.float64), k, train_idx=train, test_idx=test)


def test_lfre_matrix_all_pairs_default_k_equals_skmatter():
    sets = correlated(600, (7, 4, 10), seed=2)
    selection = make_selection("random:30", 600, seed=5)
    result = lfre_matrix({"a": sets[0], "b": sets[1], "c": sets[2]}, selection)
    assert result.names == ["a", "b", "c"]
    np.testing.assert_array_equal(result.k, [[7, 4, 7], [4, 4, 4], [7, 4, 10]])
    for i in range(3):
        for j in range(3):
            ref = skmatter_pair(sets[i], sets[j], result.k[i, j], selection.train, selection.test)
            np.testing.assert_allclose(result.pointwise[i, j], ref, rtol=RTOL, atol=ATOL)
            assert result.matrix[i, j] == pytest.approx(
                np.linalg.norm(ref) / np.sqrt(len(ref)), rel=RTOL, abs=ATOL
            )
    np.testing.assert_array_equal(result.test_rows, selection.test)
    assert np.all((result.alpha > 0) & (result.alpha < 1))


def test_kfold_full_dataset_every_environment_once():
    sets = correlated(150, (5, 8), seed=7)
    selection = make_selection("kfold:3", 150, seed=1)
    result = lfre_matrix(sets, selection, k=12)
    assert np.array_equal(np.sort(result.test_rows), np.arange(150))
    start = 0
    for train, test in selection.folds:
        for i, j in [(0, 1), (1, 0)]:
            ref = skmatter_pair(sets[i], sets[j], 12, train, test)
            np.testing.assert_allclose(
                result.pointwise[i, j, start : start + len(test)], ref, rtol=RTOL, atol=ATOL
            )
        start += len(test)
    np.testing.assert_allclose(result.matrix, np.sqrt((result.pointwise**2).mean(axis=2)))


def test_duplicate_rows_give_a_deterministic_result():
    """Exact distance ties are ordered by train position (stable argsort), whatever the
    partitioning; the reference is skmatter's estimator on stable-argsort neighbourhoods."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(60, 4))
    x = np.concatenate([base, base, base[:30]])  # every row at least twice
    y = np.concatenate([base @ rng.normal(size=(4, 3)), rng.normal(size=(90, 3))])
    test = np.arange(0, 150, 5)
    train = np.setdiff1d(np.arange(150), test)
    first = dm.pointwise_local_reconstruction_error(x, y, 9, train_idx=train, test_idx=test)
    again = dm.pointwise_local_reconstruction_error(
        da.from_array(x, chunks=(17, 4)),
        da.from_array(y, chunks=(40, 3)),
        9,
        train_idx=train,
        test_idx=test,
    )
    np.testing.assert_allclose(first, again, rtol=1e-12)  # same neighbours, same fits

    tr, te, scaler, est = check_local_reconstruction_measures_input(
        x, y, 9, train, test, None, None
    )
    x_tr, x_te, y_tr, y_te = _prepare_data(x, y, tr, te, scaler)
    dist = np.sum(x_tr**2, axis=1) + np.sum(x_te**2, axis=1)[:, None] - 2 * x_te @ x_tr.T
    ref = []
    for i in range(len(te)):
        nb = np.argsort(dist[i], kind="stable")[:9]
        xm, ym = x_tr[nb].mean(axis=0), y_tr[nb].mean(axis=0)
        est.fit(x_tr[nb] - xm, y_tr[nb] - ym)
        ref.append(np.linalg.norm(y_te[i] - ym - est.predict((x_te[i] - xm)[None])[0]))
    np.testing.assert_allclose(first, ref, rtol=RTOL, atol=ATOL)


def test_distributed_cluster_gives_the_same_numbers():
    sets = correlated(400, (6, 5), seed=9)
    selection = Selection.explicit(np.arange(0, 400, 2), np.arange(1, 400, 8), 400)
    local = lfre_matrix(sets, selection)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        remote = lfre_matrix(
            [da.from_array(s, chunks=(100, -1)) for s in sets],
            selection,
            query_block=16,
            tile_rows=64,
        )
    np.testing.assert_allclose(remote.pointwise, local.pointwise, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_errors():
    x, y = correlated(100, (4, 3))
    train, test = np.arange(0, 100, 2), np.arange(1, 100, 2)
    pw = dm.pointwise_local_reconstruction_error
    with pytest.raises(DfreError, match="k >= 2"):
        pw(x, y, 1, train_idx=train, test_idx=test)
    with pytest.raises(DfreError, match="only 50 train environments"):
        pw(x, y, 51, train_idx=train, test_idx=test)
    with pytest.raises(DfreError, match="at least n_local_points"):
        pw(x, y, 101)
    with pytest.raises(DfreError, match="different numbers of rows"):
        pw(x, y[:90], 5)
    for bad in (np.nan, np.inf):
        broken = x.copy()
        broken[7, 2] = bad
        with pytest.raises(DfreError, match="NaN or infinite"):
            pw(broken, y, 5, train_idx=train, test_idx=test)
    with pytest.raises(DfreError, match="too large for float64 sums of squares"):
        pw(x * 1e200, y, 5, train_idx=train, test_idx=test)
    with pytest.raises(DfreError, match="constant on the train rows"):
        pw(np.ones_like(x), y, 5, train_idx=train, test_idx=test)
    with pytest.raises(DfreError, match="rows must lie in"):
        pw(x, y, 5, train_idx=train, test_idx=np.array([1, 100]))
    for error in (DfreError,):
        with pytest.raises(error) as info:
            lfre_matrix([x, y], "random:10")
        assert "\n" not in str(info.value)


def test_large_feature_offsets_scale_like_skmatter():
    """The one-pass scaler shifts by a data row: an offset of 1e4 costs no accuracy."""
    x, y = correlated(500, (8, 5), seed=11)
    x, y = x + 1e4, y - 3e3
    rng = np.random.default_rng(1)
    test = np.sort(rng.choice(500, 60, replace=False))
    train = np.setdiff1d(np.arange(500), test)
    np.testing.assert_allclose(
        dm.pointwise_local_reconstruction_error(x, y, 8, train_idx=train, test_idx=test),
        sk_pw_lfre(x, y, 8, train_idx=train, test_idx=test),
        rtol=RTOL,
        atol=ATOL,
    )


def test_k_rules_min_max_and_fixed():
    np.testing.assert_array_equal(dm.lfre.k_matrix([3, 5], "max"), [[3, 5], [5, 5]])
    np.testing.assert_array_equal(dm.lfre.k_matrix([3, 5], "min"), [[3, 3], [3, 5]])
    np.testing.assert_array_equal(dm.lfre.k_matrix([3, 5], None), [[3, 3], [3, 5]])
    np.testing.assert_array_equal(dm.lfre.k_matrix([3, 5], 4), [[4, 4], [4, 4]])
    with pytest.raises(DfreError, match="'min' or 'max'"):
        dm.lfre.k_matrix([3, 5], "median")
    assert dm.lfre.parse_k("max") == "max" and dm.lfre.parse_k("12") == 12
    with pytest.raises(DfreError, match="--k x"):
        dm.lfre.parse_k("x")


def test_lfre_matrix_with_the_larger_dimension_as_k_equals_skmatter():
    """The paper's Fig. 8 takes k = max(d_F, d_F')."""
    sets = correlated(400, (5, 9), seed=6)
    selection = make_selection("random:25", 400, seed=2)
    result = lfre_matrix(sets, selection, "max")
    np.testing.assert_array_equal(result.k, [[5, 9], [9, 9]])
    assert result.config["k_rule"] == "max(d_F, d_F')"
    ref = skmatter_pair(sets[0], sets[1], 9, selection.train, selection.test)
    np.testing.assert_allclose(result.pointwise[0, 1], ref, rtol=RTOL, atol=ATOL)
