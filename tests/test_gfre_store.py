"""GFRE over a store (results contract), the `dfre gfre` command, and bad input."""

import json

import numpy as np
import pytest
import zarr

from dfre.cli import main
from dfre.data.selection import Selection, selection_for_store
from dfre.errors import DfreError
from dfre.metrics import gfre_matrix, gfre_store, global_reconstruction_error
from dfre.store import Store

NAMES = ["alpha-1/ll", "beta-2/bb", "gamma-3/ll"]


def synthetic(n, dims, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 5))
    return [
        (np.tanh(latent @ rng.normal(size=(5, d))) + 0.1 * rng.normal(size=(n, d))).astype(
            np.float32
        )
        for d in dims
    ]


@pytest.fixture(scope="module")
def scheduler():
    """A running in-process cluster for the CLI runs (``--scheduler ADDRESS``)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def feature_store(sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    for name, values in zip(NAMES, synthetic(store.n_atoms, (6, 9, 4)), strict=True):
        store.create_feature(name, values.shape[1])[...] = values
    return sample_store_copy


def test_gfre_store_writes_the_results_contract(feature_store):
    result = gfre_store(feature_store, NAMES, "stratified:60", run="mine", seed=3)
    store = Store.open(feature_store)
    group = store.result("mine")
    attrs = dict(group.attrs)
    assert attrs["kind"] == "gfre" and attrs["names"] == NAMES
    assert attrs["selection"] == "stratified:60" and attrs["config"]["solver"] == "auto"
    assert attrs["config"]["solver_used"] in ("gram", "tsqr")
    assert set(attrs["config"]["diagnostics"]["feature_sets"]) == set(NAMES)
    assert "dfre_version" in attrs
    for key in ("error", "tail_share", "median_error", "p95_error"):
        assert group[key].shape == (3, 3) and np.isfinite(group[key][...]).all()
    np.testing.assert_allclose(group["error"][...], result.error)
    matrix = group["matrix"][...]
    pointwise = group["pointwise"][...]
    test_rows = group["test_rows"][...]
    assert matrix.shape == (3, 3) and group["alpha"].shape == (3, 3)
    assert group["cka"].shape == (3, 3) and test_rows.dtype == np.int64
    assert pointwise.shape == (3, 3, 60) and len(test_rows) == 60
    np.testing.assert_allclose(matrix, np.sqrt(np.mean(pointwise**2, axis=2)))
    np.testing.assert_allclose(matrix, result.matrix)
    selection = Selection.load(group["selection"])
    assert selection == selection_for_store("stratified:60", store, seed=3)
    np.testing.assert_array_equal(selection.test, test_rows)
    # every entry is skmatter's GFRE on the same rows (float32 features cast to float64)
    x = np.asarray(store.features(NAMES[1]), dtype=np.float64)
    y = np.asarray(store.features(NAMES[0]), dtype=np.float64)
    from skmatter.metrics import global_reconstruction_error as sk_gfre

    ref = sk_gfre(x, y, train_idx=selection.train, test_idx=selection.test)
    assert matrix[1, 0] == pytest.approx(ref, rel=1e-6)


def test_masked_rows_are_never_selected(feature_store):
    store = Store.open(feature_store, mode="r+")
    mask = np.zeros(store.n_atoms, dtype=bool)
    mask[::7] = True
    store.group["features"]["beta-2"].create_array("_mask", shape=mask.shape, dtype=bool)[...] = (
        mask
    )
    values = np.asarray(store.features(NAMES[1]))
    values[mask] = np.nan  # the model could not handle these rows
    store.feature_array(NAMES[1])[...] = values
    result = gfre_store(store, NAMES[:2], "kfold:3")
    assert not mask[result.test_rows].any()
    assert len(result.test_rows) == (~mask).sum()
    assert np.isfinite(result.matrix).all()


def test_store_feature_sets_in_compatible_function(feature_store):
    store = Store.open(feature_store)
    x, y = store.features(NAMES[0]), store.features(NAMES[2])
    by_name = global_reconstruction_error(NAMES[0], NAMES[2], store=store)
    assert global_reconstruction_error(x, y) == pytest.approx(by_name, rel=1e-12)


def test_cli_prints_matrix_and_json(feature_store, scheduler, capsys):
    args = ["gfre", "--store", feature_store, "--features", *NAMES[:2], "--scheduler", scheduler]
    assert main([*args, "--selection", "random:50", "--solver", "tsqr"]) == 0
    out = capsys.readouterr().out
    assert "source \\ target" in out and NAMES[0] in out
    assert main([*args, "--selection", "random:50", "--json", "--run", "again"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["names"] == NAMES[:2] and payload["n_test"] == 50
    stored = Store.open(feature_store).result("again")["matrix"][...]
    np.testing.assert_allclose(payload["gfre"], stored)
    tikhonov = [*args, "--regularization", "tikhonov", "--alphas", "1e-6,1e-3,0.1", "--json"]
    tikhonov += ["--selection", "random:50"]
    assert main(tikhonov) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(np.ravel(payload["alpha"])) <= {1e-6, 1e-3, 0.1}
    config = dict(Store.open(feature_store).result("gfre").attrs)["config"]
    assert config["regularization_method"] == "tikhonov"


# ---------------------------------------------------------------------- bad input
def _tree(path):
    return sorted(
        p.relative_to(path).as_posix() for p in __import__("pathlib").Path(path).rglob("*")
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--features", "alpha-1/ll", "nope/ll"], "no feature set 'nope/ll'"),
        (["--features", "alpha-1/ll", "beta-2/bb", "--selection", "kfold:x"], "kfold"),
    ],
)
def test_cli_bad_input_is_one_line_and_store_untouched(feature_store, capsys, extra, message):
    before = _tree(feature_store)
    code = main(["gfre", "--store", feature_store, "--no-gpu", "--dashboard-address", ":0", *extra])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("dfre: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert _tree(feature_store) == before


def test_cli_nan_features_refused_and_store_untouched(feature_store, scheduler, capsys):
    store = Store.open(feature_store, mode="r+")
    values = np.asarray(store.features(NAMES[1]))
    values[5, 2] = np.nan
    store.feature_array(NAMES[1])[...] = values
    before = _tree(feature_store)
    code = main(
        [
            "gfre",
            "--store",
            feature_store,
            "--features",
            *NAMES[:2],
            "--selection",
            "kfold:2",
            "--scheduler",
            scheduler,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "beta-2/bb has 1 NaN or infinite" in err
    assert _tree(feature_store) == before


def _data(n=200):
    return synthetic(n, (4, 5), seed=1)


@pytest.mark.parametrize(
    "change, selection, message",
    [
        (lambda f: [f[0], f[1][:-1]], None, "different numbers of rows"),
        (lambda f: [f[0], np.where(np.arange(5) == 2, np.inf, f[1])], None, "infinite"),
        (lambda f: [f[0], np.ones_like(f[1])], None, "is constant on the train rows"),
        (None, (np.arange(100), np.array([], dtype=int)), "test selection is empty"),
        (None, (np.array([], dtype=int), np.arange(10)), "train selection is empty"),
        (None, (np.arange(100), np.arange(90, 120)), "overlap"),
        (None, (np.array([3]), np.arange(10, 20)), "needs at least 2"),
        (None, (np.arange(10), np.array([5000])), "must lie in 0..199"),
        (None, (np.array([1, 1, 2]), np.arange(10, 20)), "duplicates"),
        (lambda f: [f[0], f[1][:, 0]], None, "must be 2-D"),
    ],
)
def test_bad_input_raises_one_line_dfre_error(change, selection, message):
    features = _data()
    if change is not None:
        features = change(features)
    selection = selection or (np.arange(20, 200), np.arange(20))
    with pytest.raises(DfreError, match=message) as info:
        gfre_matrix(features, selection)
    assert "\n" not in str(info.value)


def test_unknown_feature_name_and_unsupported_settings():
    x, y = _data()
    with pytest.raises(DfreError, match="pass store="):
        gfre_matrix(["a/ll", "b/ll"], (np.arange(20, 200), np.arange(20)))
    with pytest.raises(DfreError, match="unknown solver"):
        gfre_matrix([x, y], (np.arange(20, 200), np.arange(20)), solver="svd")
    from sklearn.linear_model import Ridge

    with pytest.raises(DfreError, match="Ridge2FoldCV"):
        global_reconstruction_error(x, y, estimator=Ridge())
    with pytest.raises(DfreError, match="at least as wide"):
        from dfre.metrics import global_reconstruction_distortion

        global_reconstruction_distortion(y, x)


def test_result_group_is_zarr(feature_store):
    gfre_store(feature_store, NAMES[:2], "random:30")
    group = zarr.open_group(feature_store, mode="r")["results"]["gfre"]
    assert group["matrix"].dtype == np.float64
