"""LFRE over a store (results contract), breakdowns, the `dfre lfre` command, bad input."""

import json

import numpy as np
import pytest
from skmatter.metrics import pointwise_local_reconstruction_error as sk_pw_lfre

from dfre.cli import main
from dfre.data.selection import Selection
from dfre.errors import DfreError
from dfre.metrics import lfre_matrix, lfre_store
from dfre.metrics.breakdown import breakdown, pointwise_breakdown
from dfre.store import Store

NAMES = ["alpha-1/ll", "beta-2/bb"]
CLUSTER = ["--no-gpu", "--workers", "1", "--dashboard-address", ":0"]


def synthetic(n, dims, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    return [
        (np.tanh(latent @ rng.normal(size=(4, d))) + 0.05 * rng.normal(size=(n, d))).astype(
            np.float32
        )
        for d in dims
    ]


@pytest.fixture
def feature_store(sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    for name, values in zip(NAMES, synthetic(store.n_atoms, (6, 4)), strict=True):
        store.create_feature(name, values.shape[1])[...] = values
    return sample_store_copy


def test_lfre_store_writes_the_results_contract(feature_store):
    result = lfre_store(feature_store, NAMES, "stratified:40", run="mine", seed=2)
    store = Store.open(feature_store)
    group = store.result("mine")
    attrs = dict(group.attrs)
    assert attrs["kind"] == "lfre" and attrs["names"] == NAMES
    assert attrs["selection"] == "stratified:40" and "dfre_version" in attrs
    assert attrs["config"]["k_rule"] == "min(d_F, d_F')" and attrs["config"]["seed"] == 2
    matrix, k, pointwise = group["matrix"][...], group["k"][...], group["pointwise"][...]
    test_rows = group["test_rows"][...]
    assert matrix.dtype == np.float64 and k.dtype == np.int64 and test_rows.dtype == np.int64
    assert pointwise.shape == (2, 2, 40) and group["alpha"].shape == (2, 2)
    np.testing.assert_array_equal(k, [[6, 4], [4, 4]])
    np.testing.assert_allclose(matrix, np.sqrt((pointwise**2).mean(axis=2)))
    selection = Selection.load(group["selection"])
    np.testing.assert_array_equal(selection.test_rows(), test_rows)
    # the stored numbers are skmatter's on the float64 cast of the stored float32 features
    x = np.asarray(store.features(NAMES[0]), dtype=np.float64)
    y = np.asarray(store.features(NAMES[1]), dtype=np.float64)
    ref = sk_pw_lfre(x, y, 4, train_idx=selection.train, test_idx=selection.test)
    np.testing.assert_allclose(pointwise[0, 1], ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.matrix, matrix)


def test_masked_rows_are_never_selected(feature_store):
    store = Store.open(feature_store, mode="r+")
    mask = np.zeros(store.n_atoms, dtype=bool)
    mask[::3] = True
    arr = store.group["features"]["beta-2"].create_array("_mask", shape=mask.shape, dtype=bool)
    arr[...] = mask
    result = lfre_store(store, NAMES, "kfold:2", k=5)
    assert len(result.test_rows) == (~mask).sum() and not mask[result.test_rows].any()
    for train, _ in result.selection.folds:
        assert not mask[train].any()


def test_breakdown_by_subset_and_element(feature_store):
    lfre_store(feature_store, NAMES, "random:60", k=8)
    store = Store.open(feature_store)
    group = store.result("lfre")
    pointwise, rows = group["pointwise"][...], group["test_rows"][...]
    for by in ("subset", "element"):
        table = breakdown(feature_store, "lfre", by)
        pair = table[(table.source == NAMES[0]) & (table.target == NAMES[1])]
        assert pair["count"].sum() == 60
        total = np.sqrt((pair["count"] * pair["rmse"] ** 2).sum() / 60)
        assert total == pytest.approx(group["matrix"][0, 1], rel=1e-12)
    subsets = store.subsets()[store.structure_index()[rows]]
    table = breakdown(store, "lfre", "subset")
    label = subsets[0]
    expected = np.sqrt(np.mean(pointwise[1, 0][subsets == label] ** 2))
    got = table[(table.source == NAMES[1]) & (table.target == NAMES[0]) & (table.group == label)]
    assert got["rmse"].item() == pytest.approx(expected, rel=1e-12)
    assert got["count"].item() == (subsets == label).sum()


def test_pointwise_breakdown_values_and_bad_labels():
    pw = np.array([[[1.0, 3.0, 4.0]]])
    table = pointwise_breakdown(pw, ["H", "O", "O"], ["a/b"])
    assert table["group"].tolist() == ["H", "O"] and table["count"].tolist() == [1, 2]
    np.testing.assert_allclose(table["rmse"], [1.0, np.sqrt(12.5)])
    with pytest.raises(DfreError, match="one label per test environment"):
        pointwise_breakdown(pw, ["H"], ["a/b"])


def lfre_cli(store, *extra):
    """``dfre lfre`` on the two feature sets of ``store``, 30 random test rows."""
    return main(
        ["lfre", "--store", store, "--features", *NAMES, "--selection", "random:30", *extra]
        + CLUSTER
    )


def test_cli_json_and_table(feature_store, capsys):
    code = lfre_cli(feature_store, "--k", "7", "--run", "cli", "--json")
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    stored = Store.open(feature_store).result("cli")
    np.testing.assert_allclose(out["lfre"], stored["matrix"][...])
    assert out["k"] == [[7, 7], [7, 7]] and out["n_test"] == 30
    code = lfre_cli(feature_store, "--breakdown", "element")
    assert code == 0
    text = capsys.readouterr().out
    assert "LFRE (rows: source, columns: target)" in text and "RMSE per element" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--features", "alpha-1/ll", "nope/ll"], "no feature set 'nope/ll'"),
        (["--features", *NAMES, "--k", "1"], "at least 2 neighbours"),
        (["--features", *NAMES, "--k", "most"], "--k most: give a number of neighbours"),
        (
            ["--features", *NAMES, "--k", "500", "--selection", "random:40"],
            "LFRE with k = 500 neighbours needs at least 500: lower k (--k) or ask for fewer "
            "test rows",
        ),
        (["--features", *NAMES, "--selection", "bogus:3"], "bogus"),
    ],
)
def test_cli_bad_input_is_one_line_and_leaves_the_store_untouched(
    feature_store, capsys, extra, message
):
    code = main(["lfre", "--store", feature_store, *extra, *CLUSTER])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("dfre: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert Store.open(feature_store).result_names() == []


def test_lfre_matrix_reads_store_pairs(feature_store):
    store = Store.open(feature_store)
    selection = Selection.explicit(np.arange(0, store.n_atoms, 2), [1, 3, 5, 7], store.n_atoms)
    a = lfre_matrix([(store, NAMES[0]), (feature_store, NAMES[1])], selection, k=5)
    b = lfre_matrix([np.asarray(store.features(n)) for n in NAMES], selection, k=5)
    np.testing.assert_allclose(a.pointwise, b.pointwise, rtol=1e-12, atol=1e-12)
