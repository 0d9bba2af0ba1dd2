"""Worker loss: a Dask worker process is SIGKILLed in the middle of featurize, of the
GFRE pass and of LFRE; the run completes and the store ends exactly as after an
undisturbed run.

The kill comes from a scheduler plugin (the scheduler of a ``LocalCluster`` runs in
this process): when the n-th task reaches a given state, the worker that runs or
holds it is killed. Its nanny starts a new worker and the scheduler recomputes what
was lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import numpy as np
import pytest
from ase.build import bulk, molecule
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from dfre.featurize import featurize
from dfre.metrics.gfre import gfre_store
from dfre.metrics.lfre import lfre_store
from dfre.store import Store, StructureBlock


class KillWorkerOnce(SchedulerPlugin):
    """SIGKILL the worker of the ``nth`` task whose key starts with ``prefix`` when it
    reaches state ``when`` ("memory": the worker holds its result, which is lost, and
    is already running its next task)."""

    name = "dfre-test-kill-worker-once"

    def __init__(self, scheduler, prefix: str, nth: int, when: str):
        self.scheduler, self.prefix, self.nth, self.when = scheduler, prefix, nth, when
        self.seen = 0
        self.killed: int | None = None

    def transition(self, key, start, finish, *args, **kwargs):
        if self.killed is not None or finish != self.when:
            return
        name = key[0] if isinstance(key, tuple) else key
        if not str(name).startswith(self.prefix):
            return
        task = self.scheduler.tasks[key]
        if task.run_spec is None:
            # scattered data (dfre.cluster.shared): it reaches memory on one worker
            # before the scheduler replicates it, and no task can recompute it, so a kill
            # in that window loses it for good; the faults tested here are lost results
            return
        self.seen += 1
        if self.seen < self.nth:
            return
        worker = task.processing_on if finish == "processing" else next(iter(task.who_has), None)
        if worker is None or not worker.pid:
            return
        os.kill(worker.pid, signal.SIGKILL)
        self.killed = worker.pid


@pytest.fixture(scope="module")
def cluster():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client


@contextlib.contextmanager
def worker_killed_during(cluster, client, *, prefix: str = "", nth: int = 3, when: str):
    """Run the block with a worker killed once it is under way; check that it was."""
    client.wait_for_workers(2, timeout=60)
    before = set(client.run(os.getpid).values())
    plugin = KillWorkerOnce(cluster.scheduler, prefix, nth, when)
    cluster.scheduler.add_plugin(plugin, name=plugin.name)
    try:
        yield plugin
    finally:
        cluster.scheduler.remove_plugin(name=plugin.name)
    assert plugin.killed in before, f"the fault was never injected ({plugin.seen} seen)"
    client.wait_for_workers(2, timeout=60)
    assert plugin.killed not in set(client.run(os.getpid).values())


def arrays_of(group, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array under a Zarr group, by path."""
    out = {}
    for name, arr in group.arrays():
        out[prefix + name] = np.asarray(arr[...])
    for name, sub in group.groups():
        out.update(arrays_of(sub, f"{prefix}{name}/"))
    return out


def assert_same_arrays(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def small_structures() -> list:
    """Many small structures (1 to 5 atoms), so that a tiny store has many units."""
    frames = []
    for i in range(24):
        for atoms in (bulk("Si", "diamond", 5.43), molecule("H2O"), bulk("NaCl", "rocksalt", 5.64)):
            atoms = atoms.copy()
            atoms.rattle(0.02, seed=i)
            frames.append(atoms)
    return frames


def test_featurize_survives_a_killed_worker(cluster, tmp_path):
    local, client = cluster
    undisturbed, disturbed = tmp_path / "undisturbed.zarr", tmp_path / "disturbed.zarr"
    for path in (undisturbed, disturbed):
        Store.create(path, chunk_atoms=32).append(StructureBlock.from_atoms(small_structures()))
    settings = dict(layers=["ll", "bb"], chunk_atoms=16, batch_atoms=8, torch_threads=1)
    want = featurize(str(undisturbed), "chgnet-0.3.0", **settings)
    # the worker holding the second finished unit is killed (by then running the next one)
    with worker_killed_during(local, client, prefix="featurize-", nth=2, when="memory"):
        got = featurize(str(disturbed), "chgnet-0.3.0", **settings)
    assert got.n_units == want.n_units >= 8
    assert got.n_units_computed == want.n_units  # every unit reported once
    group = lambda p: Store.open(p).group["features"]["chgnet-0.3.0"]  # noqa: E731
    features = arrays_of(group(disturbed))
    assert features["_done_ll"].all() and features["_done_bb"].all()
    assert not np.isnan(features["ll"]).any()
    assert_same_arrays(features, arrays_of(group(undisturbed)))


def synthetic_feature_store(sample_store, path, chunk: int = 32) -> list[str]:
    """A copy of the sample store with three correlated float32 feature sets."""
    shutil.copytree(sample_store, path)
    store = Store.open(path, mode="r+")
    rng = np.random.default_rng(7)
    base = rng.normal(size=(store.n_atoms, 6))
    sets = {
        "a/x": base @ rng.normal(size=(6, 8)),
        "b/x": np.tanh(base[:, :4]) @ rng.normal(size=(4, 5)) + 0.1 * rng.normal(size=(1, 5)),
        "c/x": base[:, :3] ** 2,
    }
    for name, values in sets.items():
        arr = store.create_feature(name, values.shape[1], chunk_atoms=chunk)
        arr[...] = values.astype(np.float32)
    return list(sets)


@pytest.mark.parametrize("metric", ["gfre", "lfre"])
def test_metric_pass_survives_a_killed_worker(cluster, sample_store, tmp_path, metric):
    local, client = cluster
    names = synthetic_feature_store(sample_store, tmp_path / "undisturbed.zarr")
    shutil.copytree(tmp_path / "undisturbed.zarr", tmp_path / "disturbed.zarr")
    run = gfre_store if metric == "gfre" else lfre_store
    run(str(tmp_path / "undisturbed.zarr"), names, "stratified:60", seed=3)
    # results held by the killed worker are lost and recomputed
    with worker_killed_during(local, client, nth=12, when="memory"):
        run(str(tmp_path / "disturbed.zarr"), names, "stratified:60", seed=3)
    got = Store.open(tmp_path / "disturbed.zarr").result(metric)
    want = Store.open(tmp_path / "undisturbed.zarr").result(metric)
    assert_same_arrays(arrays_of(got), arrays_of(want))
    assert np.isfinite(np.asarray(got["matrix"][...])).all()
