"""Error bars, spectra, diagnostics and sanity warnings of GFRE/LFRE results."""

from __future__ import annotations

import numpy as np
import pytest
from skmatter.linear_model import Ridge2FoldCV
from skmatter.metrics import global_reconstruction_error as sk_gfre
from skmatter.metrics import pointwise_local_reconstruction_error as sk_pw_lfre

from dfre.data.selection import make_selection
from dfre.errors import DfreError
from dfre.linalg.local_ridge import DEFAULT_ALPHAS, RANDOM_STATE
from dfre.linalg.spectrum import GRAM_RESOLVED, unit_roundoff
from dfre.metrics import gfre_matrix, gfre_store, lfre_matrix, lfre_store
from dfre.metrics.diagnostics import TAIL_FLAG, describe_rows, diagnose, tail_share
from dfre.metrics.uncertainty import bootstrap_standard_error
from dfre.store import Store


def split(n: int, n_test: int, seed: int = 0):
    test = np.sort(np.random.default_rng(seed).choice(n, n_test, replace=False))
    return np.setdiff1d(np.arange(n), test), test


def with_spectrum(n: int, singular: np.ndarray, seed: int = 0, offset: float = 3.0):
    """Rows whose centred matrix has exactly the singular values ``singular`` (n large)."""
    rng = np.random.default_rng(seed)
    d = len(singular)
    u, _ = np.linalg.qr(rng.normal(size=(n, d)) - rng.normal(size=(n, d)).mean(0))
    u -= u.mean(0)
    u, _ = np.linalg.qr(u)
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (u * singular) @ v.T + offset


# ---------------------------------------------------------------------- error bars
def test_bootstrap_error_matches_the_delta_method_for_light_tails():
    rng = np.random.default_rng(1)
    e = np.abs(rng.normal(size=(1, 1, 4000)))
    got = bootstrap_standard_error(e)[0, 0]
    squares = e[0, 0] ** 2
    rmse = np.sqrt(squares.mean())
    delta = squares.std(ddof=1) / np.sqrt(len(squares)) / (2 * rmse)  # d sqrt(m) = dm / 2 sqrt m
    assert got == pytest.approx(delta, rel=0.1)
    np.testing.assert_array_equal(bootstrap_standard_error(e), bootstrap_standard_error(e))


def test_bootstrap_error_grows_with_a_dominating_environment_and_keeps_nan():
    rng = np.random.default_rng(2)
    e = np.abs(rng.normal(size=(2, 2, 500)))
    e[1, 0, 7] = 50.0  # one environment with the error of the As atom
    e[0, 1] = np.nan  # a pair that was not computed
    err = bootstrap_standard_error(e)
    assert np.isnan(err[0, 1]) and np.isfinite(err[[0, 1, 1], [0, 0, 1]]).all()
    assert err[1, 0] > 10 * err[0, 0]


def test_tail_share():
    squares = np.ones((3, 200))
    squares[1, 0] = 1e6
    share = tail_share(squares)  # worst 1% = 2 of 200
    assert share[0] == pytest.approx(2 / 200) and share[1] > 0.99


# ---------------------------------------------------------------------- spectra and paths
def test_spectrum_is_exact_and_decides_the_path():
    n = 900
    steep = with_spectrum(n, np.geomspace(30.0, 30.0 * 1e-10, 12), seed=3)
    mild = with_spectrum(n, np.geomspace(30.0, 3.0, 8), seed=4)
    target = np.tanh(steep[:, :5] + mild[:, :5])
    sets = {"steep": steep, "mild": mild, "target": target}
    train, test = split(n, 150)
    result = gfre_matrix(sets, (train, test))
    assert result.config["exact_path_for"] == ["steep"]
    spectrum = result.spectra[0]
    assert spectrum.exact and spectrum.dim == 12
    # singular values of the train rows: those of the whole set up to subsampling, the
    # condition number spans the 10 decades built in (exact, not Gram-limited)
    assert 1e9 < spectrum.singular_values[0] / spectrum.singular_values[-1] < 1e11
    assert spectrum.rank == 12  # float64 storage noise is far below 1e-10
    want = np.array(
        [[sk_gfre(x, y, train_idx=train, test_idx=test) for y in sets.values()]
         for x in sets.values()]
    )  # fmt: skip
    np.testing.assert_allclose(result.matrix, want, rtol=1e-6, atol=1e-7)
    # without the steep set the normal equations suffice: one pass, Gram path
    fast = gfre_matrix({"mild": mild, "target": target}, (train, test))
    assert fast.config["solver_used"] == "gram" and fast.spectra[0].smallest_ratio > GRAM_RESOLVED
    np.testing.assert_allclose(fast.matrix, want[1:, 1:], rtol=1e-6, atol=1e-7)


def test_noise_floor_of_float32_storage():
    x = with_spectrum(600, np.geomspace(10.0, 1e-9, 10), seed=5, offset=100.0).astype(np.float32)
    result = gfre_matrix([x, x[:, :3] ** 2], split(600, 100))
    spectrum = result.spectra[0]
    frobenius = np.linalg.norm(x[result.selection[0]].astype(np.float64))
    assert spectrum.noise_floor == pytest.approx(unit_roundoff(np.float32) * frobenius, rel=1e-6)
    # the offset of 100 puts the float32 rounding far above the smallest directions
    assert spectrum.rank < 10 and spectrum.noise_ratio > 1e-6


# ---------------------------------------------------------------------- the alpha floor
def floored_estimator(floor: float) -> Ridge2FoldCV:
    return Ridge2FoldCV(
        alphas=np.maximum(DEFAULT_ALPHAS, floor),
        alpha_type="relative",
        regularization_method="cutoff",
        scoring="neg_root_mean_squared_error",
        random_state=RANDOM_STATE,
        shuffle=True,
    )


def test_alpha_floor_is_skmatter_with_a_raised_grid():
    n = 800
    x = with_spectrum(n, np.geomspace(20.0, 2e-8, 10), seed=6)
    y = np.tanh(x[:, :4] * 0.3) + 0.01 * np.random.default_rng(6).normal(size=(n, 4))
    train, test = split(n, 120)
    fixed = gfre_matrix([x, y], (train, test), alpha_floor=1e-4, pairs=[(0, 1)])
    want = sk_gfre(x, y, train_idx=train, test_idx=test, estimator=floored_estimator(1e-4))
    assert fixed.matrix[0, 1] == pytest.approx(want, rel=1e-6)
    assert fixed.alpha[0, 1] >= 1e-4
    auto = gfre_matrix(
        [x.astype(np.float32), y.astype(np.float32)], (train, test), alpha_floor="auto"
    )
    floor = auto.config["alpha_floor"]["relative"]["X0"]
    assert floor == pytest.approx(auto.spectra[0].noise_ratio)
    want = sk_gfre(
        x.astype(np.float32).astype(np.float64),
        y.astype(np.float32).astype(np.float64),
        train_idx=train,
        test_idx=test,
        estimator=floored_estimator(floor),
    )
    assert auto.matrix[0, 1] == pytest.approx(want, rel=1e-6)
    with pytest.raises(DfreError, match="alpha floor"):
        gfre_matrix([x, y], (train, test), alpha_floor="high")
    with pytest.raises(DfreError, match="relative cutoff"):
        gfre_matrix([x, y], (train, test), alpha_floor=2.0)


def test_lfre_alpha_floor():
    n = 500
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 6))
    y = np.tanh(x @ rng.normal(size=(6, 3)))
    train, test = split(n, 25)
    got = lfre_matrix([x, y], (train, test), k=40, alpha_floor=1e-3, pairs=[(0, 1)])
    want = sk_pw_lfre(x, y, 40, train_idx=train, test_idx=test, estimator=floored_estimator(1e-3))
    np.testing.assert_allclose(got.pointwise[0, 1], want, rtol=1e-6, atol=1e-8)
    auto = lfre_matrix([x, y], (train, test), k=40, alpha_floor="auto", pairs=[(0, 1)])
    assert np.isfinite(auto.matrix[0, 1]) and auto.config["alpha_floor"] == "auto"
    # float64 features: the noise floor is far below every cutoff, the values are skmatter's
    plain = sk_pw_lfre(x, y, 40, train_idx=train, test_idx=test)
    np.testing.assert_allclose(auto.pointwise[0, 1], plain, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------- flags and warnings
def test_flags_name_the_environments_that_dominate(sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    n = store.n_atoms
    rng = np.random.default_rng(8)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (np.tanh(x @ rng.normal(size=(5, 4))) + 0.05 * rng.normal(size=(n, 4))).astype(np.float32)
    from dfre.data.selection import selection_for_store

    selection = selection_for_store("random:100", store, seed=1)
    outlier = int(selection.test[17])
    y[outlier] += 40.0  # one test environment far from everything else in the target
    store.create_feature("src/x", 5)[...] = x
    store.create_feature("tgt/y", 4)[...] = y
    for fn in (gfre_store, lfre_store):
        result = fn(store, ["src/x", "tgt/y"], "random:100", seed=1, run=fn.__name__)
        flags = [f for f in result.diagnostics.flags if f["target"] == "tgt/y"]
        flag = next(f for f in flags if f["source"] == "src/x")
        assert any("worst 1%" in r for r in flag["reasons"])
        worst = flag["environments"][0]
        assert worst["row"] == outlier and worst["share"] > TAIL_FLAG
        (where,) = describe_rows(store, [outlier])
        assert {k: worst[k] for k in where} == where
        assert where["element"] and where["subset"]
        assert result.diagnostics.tail_share[0, 1] > TAIL_FLAG
        saved = dict(store.result(fn.__name__).attrs)["config"]["diagnostics"]
        assert saved["flags"][0]["environments"][0]["row"] == outlier


def test_sanity_warnings():
    rng = np.random.default_rng(9)
    wide = rng.normal(size=(120, 64))
    narrow = np.tanh(wide[:, :3])
    result = gfre_matrix([wide, narrow], split(120, 70))  # 50 train rows, 64 features
    warnings = result.diagnostics.warnings
    assert any("64 features but only 50 train" in w for w in warnings)
    assert any(
        "test set is 58% of the selected environments (70 test, 50 train)" in w for w in warnings
    )
    lfre = lfre_matrix([narrow, narrow**2], split(120, 70), k=50)
    assert any(
        "k = 50 neighbours is at or above the 50 train" in w for w in lfre.diagnostics.warnings
    )
    quiet = gfre_matrix([narrow, narrow**2], split(120, 20))
    assert quiet.diagnostics.warnings == []
    odd = make_selection("kfold:2", 121, seed=0)  # folds of 61 and 60 test rows
    assert sorted(len(test) for _, test in odd.folds) == [60, 61]
    x = rng.normal(size=(121, 3))
    assert gfre_matrix([x, np.tanh(x)], odd).diagnostics.warnings == []


def test_tail_flags_skip_negligible_errors_and_keep_values_above_one():
    rng = np.random.default_rng(3)
    pointwise = np.abs(rng.normal(size=(2, 2, 300)))
    pointwise[:, :, 0] = 1e3  # one environment carries nearly all the squared error
    scale = np.array([[1e-6, 0.3], [2.0, 1e-4]])[:, :, None]
    pointwise = pointwise / np.sqrt((pointwise**2).mean(-1, keepdims=True)) * scale
    matrix = np.sqrt((pointwise**2).mean(-1))
    diag = diagnose(["a", "b"], matrix, pointwise, np.arange(300))
    assert (diag.tail_share > 0.99).all()
    flagged = {(f["source"], f["target"]): f["reasons"] for f in diag.flags}
    assert set(flagged) == {("a", "b"), ("b", "a")}  # not the diagonal at rounding level
    assert len(flagged[("b", "a")]) == 2 and flagged[("a", "b")][0].startswith("the worst 1%")
    assert diag.flags[0]["environments"][0]["row"] == 0
