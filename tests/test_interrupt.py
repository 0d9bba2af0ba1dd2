"""Interruption: a whole ``dfre featurize`` (the command, its local cluster and its
workers) is SIGKILLed half-way, as a batch system does at the wall-time limit. A
re-run clears the stale lock, computes only the units not recorded done, and the
store ends identical, array by array, to an uninterrupted run.

(The same for ``dfre ingest``: tests/test_ingest.py::test_killed_ingest_resumes_without_duplicates.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
from ase.build import bulk, molecule

from dfre.featurize import featurize, plan_units
from dfre.lock import LOCK_NAME
from dfre.store import Store, StructureBlock

MODEL = "chgnet-0.3.0"
CHUNK = 16


def small_structures() -> list:
    frames = []
    for i in range(40):
        for atoms in (bulk("Si", "diamond", 5.43), molecule("H2O"), bulk("NaCl", "rocksalt", 5.64)):
            atoms = atoms.copy()
            atoms.rattle(0.02, seed=i)
            frames.append(atoms)
    return frames


def make_store(path) -> Store:
    store = Store.create(path, chunk_atoms=CHUNK)
    store.append(StructureBlock.from_atoms(small_structures()))
    return store


def featurize_command(path) -> list[str]:
    return [
        sys.executable, "-m", "dfre", "featurize", "--store", str(path), "--model", MODEL,
        "--layers", "ll,bb", "--batch-atoms", "4", "--torch-threads", "1",
        "--workers", "1", "--no-gpu", "--dashboard-address", ":0",
    ]  # fmt: skip


def units_done(path, units) -> int:
    """Units whose chunks are all recorded done for both layers (read while it runs)."""
    try:
        group = Store.open(path).group["features"][MODEL]
        done = np.asarray(group["_done_ll"][...]) & np.asarray(group["_done_bb"][...])
    except (KeyError, FileNotFoundError, ValueError):  # not created yet
        return 0
    return sum(bool(done[u.c_lo : u.c_hi].all()) for u in units)


def model_arrays(path) -> dict[str, np.ndarray]:
    group = Store.open(path).group["features"][MODEL]
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def test_killed_featurize_resumes_with_only_the_missing_units(tmp_path):
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    units = plan_units(make_store(killed).offsets, CHUNK)
    n_units = len(units)
    assert n_units >= 12

    process = subprocess.Popen(
        featurize_command(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    finished = 0
    while finished < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # kill the whole process group once three units are done
        finished = units_done(killed, units)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert finished >= 3
    time.sleep(0.5)  # the kernel reaps the killed workers

    assert (killed / LOCK_NAME).exists()  # left behind by the killed command
    before = model_arrays(killed)
    done = before["_done_ll"] & before["_done_bb"]
    missing = {
        (u.c_lo, u.c_hi)
        for u in plan_units(Store.open(killed).offsets, CHUNK)
        if not done[u.c_lo : u.c_hi].all()
    }
    assert 0 < len(missing) <= n_units - finished
    # rows of a unit not recorded done may hold anything; rows of done units are final
    done_rows = np.repeat(before["_done_ll"], CHUNK)[: len(before["ll"])]
    assert not np.isnan(before["ll"][done_rows]).any()

    rerun = subprocess.run(featurize_command(killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock of" in rerun.stderr
    assert f"computed {len(missing)} of {n_units} units" in rerun.stdout
    assert not (killed / LOCK_NAME).exists()

    make_store(reference)
    featurize(str(reference), MODEL, layers=["ll", "bb"], batch_atoms=4, torch_threads=1)
    got, want = model_arrays(killed), model_arrays(reference)
    assert sorted(got) == sorted(want) == ["_done_bb", "_done_ll", "_mask", "bb", "ll"]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
