"""GFRE and LFRE on the real features of the shipped models equal scikit-matter's.

The features of pretrained CHGNet 0.3.0 and SevenNet-0 (``real_store``, made once per
session) are what broke the normal equations before: CHGNet's last-layer spectrum
decays to 1e-11 of its largest singular value. Every default path -- ``gfre_matrix``,
``lfre_matrix``, the skmatter-compatible functions, the ``*_store`` functions and the
CLI -- must give skmatter's value for any selection seed (1e-6 relative, 1e-7 absolute
near zero), independently of chunking, workers and the other sets in the call.
"""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from conftest import REAL_FEATURES
from distributed import Client, LocalCluster
from skmatter.metrics import global_reconstruction_error as sk_gfre
from skmatter.metrics import pointwise_local_reconstruction_error as sk_pw_lfre

from dfre.cli import main
from dfre.data.selection import selection_for_store
from dfre.metrics import gfre_matrix, gfre_store, global_reconstruction_error, lfre_matrix
from dfre.store import Store

RTOL, ATOL = 1e-6, 1e-7


def random_split(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    test = np.sort(np.random.default_rng(seed).choice(n, n_test, replace=False))
    return np.setdiff1d(np.arange(n), test), test


def skmatter_matrix(sets: dict, train, test) -> np.ndarray:
    values = [np.asarray(v, dtype=np.float64) for v in sets.values()]
    return np.array(
        [[sk_gfre(x, y, train_idx=train, test_idx=test) for y in values] for x in values]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_gfre_equals_skmatter_for_any_seed(real_features, seed):
    n = len(next(iter(real_features.values())))
    train, test = random_split(n, 180, seed)
    result = gfre_matrix(real_features, (train, test))
    np.testing.assert_allclose(
        result.matrix, skmatter_matrix(real_features, train, test), rtol=RTOL, atol=ATOL
    )
    # CHGNet's last layer is what the normal equations cannot resolve: auto took TSQR
    assert "chgnet-0.3.0/ll" in result.config["exact_path_for"]
    assert result.config["solver_used"] == "tsqr"
    sets = result.config["diagnostics"]["feature_sets"]
    assert sets["chgnet-0.3.0/ll"]["rank"] < 64 and sets["chgnet-0.3.0/ll"]["exact_spectrum"]
    assert sets["chgnet-0.3.0/ll"]["condition"] > 1e6 > sets["sevennet-0/bb"]["condition"]


def test_the_gram_solver_alone_is_not_faithful_there(real_features):
    """The reason for the automatic path: normal equations miss skmatter by far more than
    the tolerance when CHGNet's last layer is the source."""
    n = len(next(iter(real_features.values())))
    train, test = random_split(n, 180, 0)
    want = skmatter_matrix(real_features, train, test)
    gram = gfre_matrix(real_features, (train, test), solver="gram")
    assert np.abs(gram.matrix[0, 1:] / want[0, 1:] - 1).max() > 1e-3


def test_skmatter_compatible_function_honours_its_solver(real_features):
    x, y = (np.asarray(real_features[k], dtype=np.float64) for k in REAL_FEATURES[:2])
    train, test = random_split(len(x), 150, 3)
    want = sk_gfre(x, y, train_idx=train, test_idx=test)
    for solver in ("auto", "tsqr"):
        got = global_reconstruction_error(x, y, train_idx=train, test_idx=test, solver=solver)
        assert got == pytest.approx(want, rel=RTOL)
    gram = global_reconstruction_error(x, y, train_idx=train, test_idx=test, solver="gram")
    assert gram != pytest.approx(want, rel=1e-4)  # solver reaches the computation


def test_chunks_workers_and_other_sets_do_not_change_the_values(real_features):
    n = len(next(iter(real_features.values())))
    train, test = random_split(n, 150, 4)
    reference = gfre_matrix(real_features, (train, test))
    for rows in (64, 257):
        chunked = {k: da.from_array(v, chunks=(rows, -1)) for k, v in real_features.items()}
        got = gfre_matrix(chunked, (train, test))
        np.testing.assert_allclose(got.matrix, reference.matrix, rtol=1e-8, atol=1e-12)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        chunked = {k: da.from_array(v, chunks=(100, -1)) for k, v in real_features.items()}
        got = gfre_matrix(chunked, (train, test))
    np.testing.assert_allclose(got.matrix, reference.matrix, rtol=1e-8, atol=1e-12)
    three = {k: real_features[k] for k in REAL_FEATURES[:3]}
    got = gfre_matrix(three, (train, test))
    np.testing.assert_allclose(got.matrix, reference.matrix[:3, :3], rtol=1e-8, atol=1e-12)


def test_store_and_cli_defaults_equal_skmatter(real_store, tmp_path, capsys):
    import shutil

    path = str(tmp_path / "real.zarr")
    shutil.copytree(real_store, path)
    store = Store.open(path, mode="r+")
    valid = store.valid_rows(REAL_FEATURES)
    sets = {k: np.asarray(store.features(k), dtype=np.float64) for k in REAL_FEATURES}
    for seed in (0, 5):
        selection = selection_for_store("random:150", store, seed=seed, valid=valid)
        want = skmatter_matrix(sets, selection.train, selection.test)
        got = gfre_store(store, REAL_FEATURES, "random:150", run=f"g{seed}", seed=seed)
        np.testing.assert_allclose(got.matrix, want, rtol=RTOL, atol=ATOL)
    args = ["gfre", "--store", path, "--features", *REAL_FEATURES, "--selection", "random:150"]
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        args += ["--seed", "5", "--run", "cli", "--json", "--scheduler", cluster.scheduler_address]
        assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(out["gfre"]), want, rtol=RTOL, atol=ATOL)
    assert np.all(np.array(out["error"]) >= 0) and out["solver_used"] == "tsqr"


@pytest.mark.parametrize("seed", [0, 1])
def test_default_lfre_equals_skmatter_pointwise(real_features, seed):
    names = REAL_FEATURES
    n = len(real_features[names[0]])
    train, test = random_split(n, 40, 10 + seed)
    result = lfre_matrix(real_features, (train, test))
    values = {k: np.asarray(v, dtype=np.float64) for k, v in real_features.items()}
    for a, b in [(0, 1), (0, 2), (1, 0), (2, 3), (3, 3), (0, 0)]:
        k = int(result.k[a, b])
        want = sk_pw_lfre(values[names[a]], values[names[b]], k, train_idx=train, test_idx=test)
        np.testing.assert_allclose(result.pointwise[a, b], want, rtol=RTOL, atol=ATOL)
    assert np.isfinite(result.error).all() and (result.error >= 0).all()
    assert set(result.config["diagnostics"]["feature_sets"]) == set(names)


def test_distortion_equals_skmatter(real_features):
    from skmatter.metrics import global_reconstruction_distortion as sk_gfrd

    from dfre.metrics import global_reconstruction_distortion

    x, y = (np.asarray(real_features[k], dtype=np.float64) for k in REAL_FEATURES[::3])
    train, test = random_split(len(x), 150, 6)
    want = sk_gfrd(x, y, train_idx=train, test_idx=test)  # 64 -> 128 features
    got = global_reconstruction_distortion(x, y, train_idx=train, test_idx=test)
    assert got == pytest.approx(want, rel=RTOL, abs=ATOL)
