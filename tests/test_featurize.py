"""The featurize pipeline on real Dask workers, real Zarr stores and real models."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from conftest import one_error_line
from distributed import Client, LocalCluster

from dfre.cli import main
from dfre.errors import DfreError
from dfre.featurize import featurize, plan_units
from dfre.models.base import load_extractor, loaded_models
from dfre.store import Store, StructureBlock

TOL = 1e-5


@pytest.fixture(scope="module")
def client():
    """Two thread workers sharing this process's model cache (so the forward lock is
    exercised); worker processes are tested by the CLI and resources tests."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def mixed_frames():
    """Periodic, slab and molecular structures, and three a model cannot handle."""
    si = bulk("Si", "diamond", 5.43)
    si.rattle(0.05, seed=1)
    cu = bulk("Cu", "fcc", 3.61).repeat((2, 2, 1))
    cu.rattle(0.03, seed=2)
    slab = fcc111("Al", (1, 1, 3), vacuum=4.0)
    isolated = Atoms("H2O", positions=[[0, 0, 0], [0.76, 0.59, 0], [12.0, 0, 0]])
    fermium = Atoms("Fm2", positions=[[0, 0, 0], [2.5, 0, 0]])
    return [
        si,
        molecule("H2O"),
        cu,
        Atoms("O"),
        molecule("CH4"),
        slab,
        isolated,
        bulk("NaCl", "rocksalt", 5.64),
        fermium,
        molecule("NH3"),
    ]


MASKED = {3: "single isolated atom", 6: "no neighbour within", 8: "unsupported element(s) Fm"}


def make_store(path, frames, chunk_atoms):
    store = Store.create(path, chunk_atoms=chunk_atoms)
    store.append(StructureBlock.from_atoms(frames))
    return store


def direct_features(model, frames, layer):
    """Each structure alone through the adapter (checked against the raw models in
    test_models.py); NaN rows for the structures the model cannot handle."""
    extractor = load_extractor(model)
    rows = []
    for atoms in frames:
        if extractor.unsupported_reason(atoms) is None:
            rows.append(extractor.featurize([atoms])[layer])
        else:
            rows.append(np.full((len(atoms), extractor.layers[layer].dim), np.nan, np.float32))
    return np.concatenate(rows)


def test_plan_units_cover_rows_once_and_never_share_a_chunk():
    offsets = np.array([0, 3, 10, 12, 40, 41, 64, 70])
    units = plan_units(offsets, chunk_rows=8, max_straddle=0.5)
    rows = np.concatenate([np.arange(u.row_lo, u.row_hi) for u in units])
    np.testing.assert_array_equal(rows, np.arange(70))
    chunks = np.concatenate([np.arange(u.c_lo, u.c_hi) for u in units])
    np.testing.assert_array_equal(chunks, np.arange(9))
    for u in units:
        assert u.row_lo % 8 == 0 and (u.row_hi % 8 == 0 or u.row_hi == 70)
        assert offsets[u.s_lo] <= u.row_lo < offsets[u.s_lo + 1] and u.first_row == offsets[u.s_lo]
        assert offsets[u.s_hi - 1] < u.row_hi <= offsets[u.s_hi]
    # the 28-atom structure 12..40 straddles 16, 24, 32 (> 4 atoms): one unit of chunks 1..4
    assert any(u.c_lo <= 1 and u.c_hi >= 5 for u in units)


@pytest.mark.parametrize("model", ["chgnet-0.3.0", "sevennet-0"])
def test_pipeline_equals_direct_calls_with_masks(client, tmp_path, model):
    frames = mixed_frames()
    store = make_store(tmp_path / "s.zarr", frames, chunk_atoms=8)
    report = featurize(store.path, model, batch_atoms=6)
    store = Store.open(store.path)
    assert store.feature_names() == [f"{model}/bb", f"{model}/ll"]
    for layer in ("bb", "ll"):
        got = store.features(f"{model}/{layer}").compute()
        expected = direct_features(model, frames, layer)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0, equal_nan=True)
    assert set(report.masked) == set(MASKED)
    for index, fragment in MASKED.items():
        assert fragment in report.masked[index]
    offsets = store.offsets
    expected_mask = np.zeros(store.n_atoms, bool)
    for index in MASKED:
        expected_mask[offsets[index] : offsets[index + 1]] = True
    np.testing.assert_array_equal(store.feature_mask(f"{model}/ll"), expected_mask)
    np.testing.assert_array_equal(store.valid_rows([f"{model}/ll"]), ~expected_mask)
    assert set(store.group["features"][model].attrs["masked"]) == {str(i) for i in MASKED}


def test_pipeline_on_sample_store_is_independent_of_batch_size(client, sample_store_copy):
    store = Store.open(sample_store_copy)
    frames = list(store.iter_atoms())
    featurize(sample_store_copy, "chgnet-0.3.0", name="small", batch_atoms=40, chunk_atoms=64)
    featurize(sample_store_copy, "chgnet-0.3.0", name="large", batch_atoms=100_000)
    store = Store.open(sample_store_copy)
    assert store.feature_array("small/ll").chunks[0] == 64
    small = store.features("small/ll").compute()
    large = store.features("large/ll").compute()
    assert not np.isnan(small).any()
    np.testing.assert_allclose(small, large, atol=TOL, rtol=0)
    np.testing.assert_allclose(small, direct_features("chgnet-0.3.0", frames, "ll"), atol=TOL)


def test_rerun_computes_only_missing_units(client, tmp_path):
    frames = [bulk("Si", "diamond", 5.43), molecule("H2O"), bulk("Cu", "fcc", 3.61)] * 6
    store = make_store(tmp_path / "s.zarr", frames, chunk_atoms=4)
    first = featurize(store.path, "chgnet-0.3.0", layers=["ll"])
    units = plan_units(store.offsets, 4)
    assert first.n_units == len(units) >= 4 and first.n_units_computed == len(units)
    store = Store.open(store.path, mode="r+")
    group = store.group["features"]["chgnet-0.3.0"]
    complete = np.asarray(group["ll"][:])
    lost, kept = units[1], units[2]
    # an interrupted run: unit 1 was never recorded done, its rows never written
    group["_done_ll"][lost.c_lo : lost.c_hi] = False
    group["ll"][lost.row_lo : lost.row_hi] = np.nan
    group["ll"][kept.row_lo : kept.row_hi] = 7.0  # a done unit must not be recomputed
    seen = []
    second = featurize(store.path, "chgnet-0.3.0", layers=["ll"], progress=seen.append)
    assert second.n_units_computed == 1 and [r["unit"] for r in seen] == [(lost.c_lo, lost.c_hi)]
    now = np.asarray(group["ll"][:])
    np.testing.assert_allclose(now[lost.row_lo : lost.row_hi], complete[lost.row_lo : lost.row_hi])
    assert (now[kept.row_lo : kept.row_hi] == 7.0).all()
    # a new layer later: computed everywhere, the first layer untouched
    third = featurize(store.path, "chgnet-0.3.0", layers=["ll", "bb"])
    assert third.n_units_computed == len(units) and third.layers == ["ll", "bb"]
    assert (np.asarray(group["ll"][kept.row_lo : kept.row_hi]) == 7.0).all()
    assert not np.isnan(np.asarray(group["bb"][:])).any()


def test_feature_attributes_record_provenance(client, tmp_path):
    store = make_store(tmp_path / "s.zarr", [bulk("Si", "diamond", 5.43)], chunk_atoms=4)
    featurize(store.path, "sevennet-mf-0-r2scan", layers=["ll"])
    attrs = dict(Store.open(store.path).feature_array("sevennet-mf-0-r2scan/ll").attrs)
    assert attrs["model"] == "sevennet-mf-0-r2scan" and attrs["layer"] == "ll"
    assert attrs["weights_file"] == "checkpoint_sevennet_mf_0.pth"
    assert len(attrs["weights_sha256"]) == 64
    assert attrs["versions"]["sevenn"] and attrs["versions"]["torch"]
    assert attrs["dtype"] == "float32" and attrs["device"] == "cpu"
    assert "reduce_hidden_to_energy" in attrs["layer_definition"]


def test_featurize_without_distributed_client(tmp_path):
    frames = [bulk("Si", "diamond", 5.43), molecule("H2O")]
    store = make_store(tmp_path / "s.zarr", frames, chunk_atoms=4)
    featurize(store.path, "chgnet-0.3.0", layers=["bb"])
    got = Store.open(store.path).features("chgnet-0.3.0/bb").compute()
    np.testing.assert_allclose(got, direct_features("chgnet-0.3.0", frames, "bb"), atol=TOL)


# ---------------------------------------------------------------------- command line
def test_cli_featurize_runs_on_its_own_cluster(sample_store_copy, capsys):
    code = main(
        [
            "featurize",
            "--store",
            sample_store_copy,
            "--model",
            "chgnet-0.3.0",
            "--layers",
            "ll",
            "--batch-atoms",
            "256",
            "--workers",
            "1",
            "--no-gpu",
            "--dashboard-address",
            ":0",
        ]
    )
    assert code == 0
    assert "chgnet-0.3.0: layers ll; computed" in capsys.readouterr().out
    store = Store.open(sample_store_copy)
    assert store.feature_names() == ["chgnet-0.3.0/ll"]
    assert not np.isnan(store.features("chgnet-0.3.0/ll").compute()).any()


def one_line_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfre: error: ") and err.count("\n") == 1, err
    assert fragment in err, err


def test_cli_bad_inputs_are_one_line_errors_and_leave_the_store_untouched(tmp_path, capsys):
    path = str(tmp_path / "s.zarr")
    make_store(path, [bulk("Si", "diamond", 5.43)], chunk_atoms=4)
    base = ["featurize", "--store", path]
    one_line_error(capsys, [*base, "--model", "mace9"], "unknown model 'mace9'")
    one_line_error(
        capsys,
        [*base, "--model", "chgnet-0.3.0", "--layers", "ll,xx"],
        "model chgnet-0.3.0 has no layer xx; it offers: bb, ll",
    )
    one_line_error(
        capsys,
        [
            *base,
            "--model",
            "generic",
            "--weights",
            str(tmp_path / "no.pt"),
            "--hook",
            "ll=mlp",
            "--option",
            "runner=x:y",
        ],
        "no.pt does not exist",
    )
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    one_line_error(
        capsys,
        [
            *base,
            "--model",
            "generic",
            "--weights",
            str(corrupt),
            "--hook",
            "ll=mlp",
            "--option",
            "runner=x:y",
        ],
        "corrupt or not a torch model",
    )
    one_line_error(
        capsys, [*base, "--model", "chgnet-0.3.0", "--hook", "llmlp"], "expected KEY=VALUE"
    )
    assert Store.open(path).feature_names() == []
    assert list(Store.open(path).group["features"].group_keys()) == []

    empty = str(tmp_path / "empty.zarr")
    Store.create(empty)
    one_line_error(
        capsys, ["featurize", "--store", empty, "--model", "chgnet-0.3.0"], "has no structures"
    )
    fermium = str(tmp_path / "fm.zarr")
    make_store(fermium, [Atoms("Fm2", positions=[[0, 0, 0], [2.5, 0, 0]])], chunk_atoms=4)
    one_line_error(
        capsys,
        ["featurize", "--store", fermium, "--model", "sevennet-0"],
        "model sevennet-0 supports none of the structures",
    )
    assert list(Store.open(fermium).group["features"].group_keys()) == []


def test_library_bad_inputs(tmp_path):
    path = str(tmp_path / "s.zarr")
    make_store(path, [bulk("Si", "diamond", 5.43)], chunk_atoms=4)
    with pytest.raises(DfreError, match="--batch-atoms must be a positive"):
        featurize(path, "chgnet-0.3.0", batch_atoms=0)
    with pytest.raises(DfreError, match="must be non-empty, without '/'"):
        featurize(path, "chgnet-0.3.0", name="a/b")
    featurize(path, "chgnet-0.3.0", name="mine", layers=["ll"])
    with pytest.raises(DfreError, match="feature set mine/ll .* was made with other weights"):
        featurize(path, "chgnet-r2scan", name="mine", layers=["ll"])


def test_graphs_built_ahead_by_threads_or_processes_give_the_same_features():
    from dfre.featurize import featurize_frames

    extractor = load_extractor("chgnet-0.3.0")
    frames = mixed_frames()
    plain = featurize_frames(extractor, frames, ["ll"], batch_atoms=6)
    for kwargs in ({"prefetch": 2}, {"graph_processes": 1}):
        ahead = featurize_frames(extractor, frames, ["ll"], batch_atoms=6, **kwargs)
        np.testing.assert_allclose(ahead[0]["ll"], plain[0]["ll"], atol=TOL, equal_nan=True)
        np.testing.assert_array_equal(ahead[1], plain[1])
        assert ahead[2] == plain[2] and set(plain[2]) == set(MASKED)


def test_resources_send_every_task_to_the_workers_of_that_environment(tmp_path):
    """Models of another environment run only on workers started with a resource."""
    import subprocess
    import sys

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                cluster.scheduler_address,
                "--nthreads",
                "1",
                "--resources",
                "chgnet_env=1",
                "--no-dashboard",
                "--name",
                "chgnet-env",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            c.wait_for_workers(2, timeout=60)
            frames = [bulk("Si", "diamond", 5.43), molecule("H2O")] * 4
            store = make_store(tmp_path / "s.zarr", frames, chunk_atoms=4)
            report = featurize(
                store.path, "chgnet-0.3.0", layers=["ll"], resources={"chgnet_env": 1}
            )
            assert report.n_units_computed == report.n_units >= 2
            loaded = c.run(loaded_models)
            by_name = {c.scheduler_info()["workers"][a]["name"]: v for a, v in loaded.items()}
            assert by_name.pop("chgnet-env") == ["chgnet-0.3.0"]
            assert list(by_name.values()) == [[]]
            got = Store.open(store.path).features("chgnet-0.3.0/ll").compute()
            np.testing.assert_allclose(got, direct_features("chgnet-0.3.0", frames, "ll"), atol=TOL)
        finally:
            c.retire_workers()
            worker.terminate()
            worker.wait(timeout=30)


def test_resources_no_worker_offers_are_a_one_line_error(client, tmp_path):
    store = make_store(tmp_path / "s.zarr", [bulk("Si", "diamond", 5.43)], chunk_atoms=4)
    with pytest.raises(DfreError, match="no Dask worker offers the resources mace=1"):
        featurize(store.path, "chgnet-0.3.0", resources={"mace": 1})
    assert list(Store.open(store.path).group["features"].group_keys()) == []


def test_cli_no_worker_for_the_model_is_a_one_line_error(client, tmp_path, capsys):
    """A real scheduler whose one plain worker has neither the resource nor the package:
    dfre says so in one line and exits instead of waiting for a worker forever."""
    store = make_store(tmp_path / "s.zarr", [bulk("Si", "diamond", 5.43)], chunk_atoms=4)
    weights = tmp_path / "mp.model"
    weights.write_bytes(b"")
    base = ["featurize", "--store", store.path, "--model", "mace", "--weights", str(weights)]
    # a local cluster would start from this environment, which has no mace-torch
    one_line_error(capsys, base, "needs the Python package 'mace-torch'")
    base += ["--scheduler", client.scheduler.address]
    for argv, fragment in [
        ([*base, "--resources", "mace=1"], "no Dask worker offers the resources mace=1"),
        (
            base,
            "no Dask worker has mace-torch, which model mace needs: start workers from its "
            "environment (make env-mace): `.envs/mace/bin/dask worker SCHEDULER --resources "
            "mace=1`",
        ),
    ]:
        assert main(argv) == 2
        assert fragment in one_error_line(capsys.readouterr().err)
    assert list(Store.open(store.path).group["features"].group_keys()) == []


def test_run_stops_when_the_workers_with_its_resource_leave(tmp_path, monkeypatch):
    import dfre.featurize as featurize_module

    monkeypatch.setattr(featurize_module, "SERVED_CHECK_SECONDS", 0.5)
    frames = [bulk("Si", "diamond", 5.43), molecule("H2O")] * 6
    store = make_store(tmp_path / "s.zarr", frames, chunk_atoms=4)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
            resources={"chgnet_env": 1},
        ) as cluster,
        Client(cluster) as c,
    ):

        def leave(result):  # the only worker offering the resource is lost after one task
            (address,) = c.scheduler_info()["workers"]
            c.run_on_scheduler(_remove_worker, address=address)

        with pytest.raises(DfreError, match="workers that run model chgnet-0.3.0.*left the"):
            featurize(
                store.path,
                "chgnet-0.3.0",
                layers=["ll"],
                resources={"chgnet_env": 1},
                progress=leave,
            )


async def _remove_worker(dask_scheduler, address):
    """Drop a worker from the scheduler as if its process had died."""
    await dask_scheduler.remove_worker(address, stimulus_id="test-worker-lost", close=True)
