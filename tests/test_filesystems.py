"""Stores on file systems that refuse writes: a read-only bind mount, a tmpfs that fills
up during ingest and featurize, and a mount that goes away during ingest. Real mounts
(the tests run as root, as in CI; they are skipped, with the reason, only where mounting
is impossible), real ``python -m dfre`` processes.

Each failure ends with exit status 2 and one ``dfre: error:`` line, the store stays
consistent (``dfre verify`` finds nothing), the batches and units committed before the
failure are kept, and running the command again continues from there to the same
store as an undisturbed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.io import write
from conftest import one_error_line

from dfre.store import Store

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting file systems needs root")


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}): needs root and mount rights")


def umount(path: Path, lazy: bool = False) -> None:
    subprocess.run(["umount", *(["-l"] if lazy else []), str(path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs at ``tmp_path/fs``; yields a function that sets its size."""
    point = tmp_path / "fs"
    point.mkdir()
    mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point))

    def resize(size: str) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)
        return point

    try:
        yield resize
    finally:
        umount(point, lazy=True)


def dfre(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfre", *map(str, args)],
        capture_output=True, text=True, timeout=600, **kwargs,
    )  # fmt: skip


def error_line(done: subprocess.CompletedProcess) -> str:
    """The single ``dfre: error:`` line of a failed command (other lines are progress)."""
    assert done.returncode == 2, done.stderr
    return one_error_line(done.stderr)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def structure_arrays(path) -> dict[str, np.ndarray]:
    store = Store.open(path)
    s = store.structures
    out = {k: np.asarray(s[k][: store.n_atoms]) for k in ("numbers", "positions")}
    out |= {k: np.asarray(s[k][: store.n_structures]) for k in ("cell", "pbc")}
    out["offsets"] = store.offsets
    for key in store.info_keys():
        out[f"info/{key}"] = store.info(key)
    return out


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def committed(path: Path) -> int:
    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["n_structures"])
    except (OSError, ValueError, KeyError):
        return 0


def frames(n: int) -> list:
    """``n`` rattled 8-atom copper cells (incompressible positions)."""
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", 3.61, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, seed=i)
        atoms.info["subset"] = "bulk" if i % 2 else "rattled"
        out.append(atoms)
    return out


# ---------------------------------------------------------------------- read-only
@ROOT_ONLY
def test_read_only_store(sample_store, tmp_path):
    data, view = tmp_path / "data", tmp_path / "ro"
    data.mkdir()
    view.mkdir()
    shutil.copytree(sample_store, data / "s.zarr")
    writable = Store.open(data / "s.zarr", mode="r+")
    rng = np.random.default_rng(0)
    for name in ("a/x", "b/x"):
        writable.create_feature(name, 3)[...] = rng.normal(size=(writable.n_atoms, 3))
    write(tmp_path / "more.xyz", [molecule("H2O")])
    before = tree_hashes(data)
    mount("--bind", str(data), str(view))
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        store = view / "s.zarr"
        info = dfre("info", store)
        assert info.returncode == 0 and "structures  27" in info.stdout, info.stderr
        verify = dfre("verify", store)
        assert verify.returncode == 0, verify.stderr
        refused = (
            f"dfre: error: store {store} is on a read-only file system: this command writes the "
            "store; run it on a writable copy (reading commands such as `dfre info` and `dfre "
            "verify` work here)"
        )
        for args in [
            ("ingest", tmp_path / "more.xyz", "--store", store),
            ("sample", "--store", store, "--atoms", "100"),
            ("featurize", "--store", store, "--model", "chgnet-0.3.0"),
            ("cumulants", "--store", store, "--order", "2"),
            ("gfre", "--store", store, "--features", "a/x", "b/x", "--selection", "random:20"),
        ]:
            assert error_line(dfre(*args)) == refused, args
        new = view / "new.zarr"
        assert error_line(dfre("ingest", tmp_path / "more.xyz", "--store", new)) == (
            refused.replace(str(store), str(new))
        )
    finally:
        umount(view)
    assert tree_hashes(data) == before


# ---------------------------------------------------------------------- full disk
@ROOT_ONLY
def test_full_disk_during_ingest_keeps_committed_batches(tmpfs, tmp_path):
    source = tmp_path / "cu.xyz"
    write(source, frames(1500))  # 12,000 atoms
    reference = tmp_path / "reference.zarr"
    assert dfre("ingest", source, "--store", reference, "--chunk-atoms", "512").returncode == 0

    disk = tmpfs("256k")
    store = disk / "s.zarr"
    full = dfre("ingest", source, "--store", store, "--chunk-atoms", "512")
    assert error_line(full) == (
        f"dfre: error: no space left for store {store} (No space left on device: "
        + full.stderr.split("(No space left on device: ")[1].split(")")[0]
        + "): free space or move the store; what was committed before the failure is kept; "
        "run the command again to continue"
    )
    kept = committed(store)
    assert 0 < kept < 1500, kept  # the batches before the failure, not rolled back
    assert dfre("verify", store).returncode == 0
    record = Store.open(store).provenance[0]
    assert not record["complete"] and record["frames_done"] == kept

    tmpfs("64m")
    again = dfre("ingest", source, "--store", store, "--chunk-atoms", "512")
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    assert_same(structure_arrays(store), structure_arrays(reference))
    assert dfre("verify", store).returncode == 0


def small_store_frames() -> list:
    out = []
    for i in range(40):
        for atoms in (bulk("Si", "diamond", 5.43), molecule("H2O"), bulk("NaCl", "rocksalt", 5.64)):
            atoms = atoms.copy()
            atoms.rattle(0.02, seed=i)
            out.append(atoms)
    return out


def used_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


@ROOT_ONLY
def test_full_disk_during_featurize_keeps_finished_units(tmpfs, tmp_path):
    source = tmp_path / "small.xyz"
    write(source, small_store_frames())  # 280 atoms
    reference = tmp_path / "reference.zarr"
    featurize = ("--model", "chgnet-0.3.0", "--layers", "ll", "--workers", "1",
                 "--dashboard-address", ":0", "--torch-threads", "1")  # fmt: skip
    assert dfre("ingest", source, "--store", reference, "--chunk-atoms", "32").returncode == 0
    from dfre.featurize import featurize as featurize_here  # the same units, in this process

    featurize_here(str(reference), "chgnet-0.3.0", layers=["ll"], torch_threads=1)

    disk = tmpfs("64m")
    store = disk / "s.zarr"
    assert dfre("ingest", source, "--store", store, "--chunk-atoms", "32").returncode == 0
    needed = 280 * 64 * 4  # bytes of float32 features, the estimate featurize checks first
    tmpfs(str(used_bytes(disk) + needed // 2))
    refused = dfre("featurize", "--store", store, *featurize)
    assert error_line(refused).startswith(
        f"dfre: error: features of chgnet-0.3.0 (9 units) needs about 71.7 kB in {store} but "
        "its file system has "
    )
    assert not np.asarray(
        Store.open(store).group["features"]["chgnet-0.3.0"]["_done_ll"][...]
    ).any()
    # enough for the estimate, not for the files (each takes whole 4 kB pages on a tmpfs)
    tmpfs(str(used_bytes(disk) + needed + 4096))
    full = dfre("featurize", "--store", store, *featurize)
    line = error_line(full)
    assert line.startswith(f"dfre: error: no space left for store {store} (No space left")
    assert line.endswith(
        "what was committed before the failure is kept; run the command again to continue"
    )
    group = Store.open(store).group["features"]["chgnet-0.3.0"]
    done = np.asarray(group["_done_ll"][...])
    assert 0 < done.sum() < len(done), done
    assert dfre("verify", store).returncode == 0

    tmpfs("64m")
    again = dfre("featurize", "--store", store, *featurize)
    assert again.returncode == 0, again.stderr
    assert f"computed {len(done) - done.sum()} of {len(done)} units" in again.stdout
    want = np.asarray(Store.open(reference).features("chgnet-0.3.0/ll"))
    np.testing.assert_array_equal(np.asarray(Store.open(store).features("chgnet-0.3.0/ll")), want)


# ---------------------------------------------------------------------- lost mount
@ROOT_ONLY
def test_mount_lost_during_ingest(tmp_path):
    """The store's file system is unmounted while ingest runs (lazily, as when a network
    mount drops): a one-line error; mounted again, the store is consistent and the same
    command continues after the committed batches."""
    source = tmp_path / "cu.xyz"
    write(source, frames(1000))
    reference = tmp_path / "reference.zarr"
    assert dfre("ingest", source, "--store", reference, "--chunk-atoms", "256").returncode == 0

    data, parent = tmp_path / "data", tmp_path / "parent"
    data.mkdir()
    parent.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(parent))  # holds only the mount point
    point = parent / "mnt"
    point.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(parent)], check=True)
    try:
        mount("--bind", str(data), str(point))
        store = point / "s.zarr"
        proc = subprocess.Popen(
            [sys.executable, "-m", "dfre", "ingest", str(source), "--store", str(store),
             "--chunk-atoms", "256"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while committed(store) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # so that the mount goes away in the middle of the run
        umount(point, lazy=True)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
        lost = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert error_line(lost) == (
            f"dfre: error: store {store} is no longer reachable: its file system was unmounted "
            "or the store was removed while the command ran; mount it again, then run the "
            "command again to continue (what was committed before is kept)"
        )
        mount("--bind", str(data), str(point))
        kept = committed(store)
        assert 0 < kept < 1000
        assert dfre("verify", store).returncode == 0
        again = dfre("ingest", source, "--store", store, "--chunk-atoms", "256")
        assert again.returncode == 0, again.stderr
        assert_same(structure_arrays(store), structure_arrays(reference))
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
        umount(parent, lazy=True)
