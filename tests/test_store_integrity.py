"""Stores whose arrays do not fit together or whose chunk files were damaged, on real
Zarr stores and real ``python -m dfre`` processes:

* a feature set with more or fewer rows than the store has atoms is refused wherever
  it is read, and ``dfre info`` shows its true shape and names the mismatch;
* ``dfre verify`` decodes every chunk and names each bad one (array, chunk index, file):
  garbage, truncated and empty chunk files, missing chunks that must exist;
* a metric that meets a corrupted chunk ends with one line naming it, exit status 2;
* ``dfre featurize`` run again recomputes corrupted or missing feature chunks (the
  real CHGNet model) and gives the same arrays as an undamaged run;
* ``dfre ingest`` refuses to append to a store whose structure arrays are damaged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from ase.build import bulk, molecule
from ase.io import write
from conftest import one_error_line

from dfre.errors import DfreError
from dfre.featurize import featurize
from dfre.lock import LOCK_NAME
from dfre.store import Store, StructureBlock


def dfre(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfre", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
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


def feature_store(sample_store, path: Path) -> Store:
    """A copy of the sample store with two random feature sets in chunks of 128 rows."""
    shutil.copytree(sample_store, path)
    store = Store.open(path, mode="r+")
    rng = np.random.default_rng(1)
    for name, dim in {"a/x": 5, "b/x": 3}.items():
        arr = store.create_feature(name, dim, chunk_atoms=128)
        arr[...] = rng.normal(size=(store.n_atoms, dim)).astype(np.float32)
    return store


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "garbage":
        file.write_bytes(b"\x00not a zstd frame\xff" * 4)
    elif how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "missing":
        file.unlink()
    else:
        raise ValueError(how)


# ---------------------------------------------------------------------- row counts
@pytest.mark.parametrize("rows", [5000, 100])
def test_feature_set_of_another_length_is_refused_and_shown(sample_store, tmp_path, rows):
    store = feature_store(sample_store, tmp_path / "s.zarr")
    model = store.group["features"].require_group("c")
    model.create_array("x", shape=(rows, 8), chunks=(128, 8), dtype="float32")[...] = 1.0
    n = store.n_atoms
    problem = f"has {rows} rows but the store has {n} atoms"

    with pytest.raises(DfreError, match=f"feature set c/x in .* {problem}: it does not belong"):
        store.features("c/x")
    with pytest.raises(DfreError, match=problem):
        store.feature_mask("c/x")

    info = dfre("info", store.path)
    assert info.returncode == 0, info.stderr
    line = next(line for line in info.stdout.splitlines() if line.strip().startswith("c/x"))
    assert f"{rows} x 8 float32, UNUSABLE: {problem}" in line
    assert "complete" not in line

    before = tree_hashes(Path(store.path))
    gfre = dfre("gfre", "--store", store.path, "--features", "a/x", "c/x", "--selection",
                "random:20", "--workers", "1", "--dashboard-address", ":0")  # fmt: skip
    assert error_line(gfre) == (
        f"dfre: error: feature set c/x in {store.path} {problem}: it does not belong to these "
        "structures; remove features/c and featurize again"
    )
    assert tree_hashes(Path(store.path)) == before  # no result written

    verify = dfre("verify", "--store", store.path)
    assert verify.stdout.splitlines() == [f"features/c/x has {rows} rows, the store has {n} atoms"]
    assert error_line(verify).startswith(f"dfre: error: store {store.path}: features/c/x has ")


def test_descriptor_of_another_length_is_refused(sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    store.group["descriptors"].create_array("d", shape=(3, 2), dtype="float64")[...] = 0.0
    with pytest.raises(DfreError, match="descriptor d in .* has 3 rows but the store has 27"):
        store.descriptor("d")
    assert store.summary()["descriptors"][0]["problem"] == (
        "has 3 rows but the store has 27 structures"
    )


# ---------------------------------------------------------------------- dfre verify
def test_verify_names_every_bad_chunk(sample_store, tmp_path):
    store = feature_store(sample_store, tmp_path / "s.zarr")
    root = Path(store.path)
    clean = dfre("verify", root)
    assert clean.returncode == 0 and clean.stdout.startswith(f"store {root}: no problems")

    damage(root / "features/a/x/c/2/0", "garbage")
    damage(root / "features/b/x/c/1/0", "truncated")
    damage(root / "structures/positions/c/3/0", "empty")
    damage(root / "structures/numbers/c/1", "missing")  # would read as Z = 0
    done = dfre("verify", "--store", root)
    assert done.stdout.splitlines() == [
        f"chunk 1 of structures/numbers (file {root}/structures/numbers/c/1) is missing "
        "(its file is gone)",
        f"chunk 2,0 of features/a/x (file {root}/features/a/x/c/2/0) does not decode "
        "(Zstd decompression error: invalid input data)",
        f"chunk 1,0 of features/b/x (file {root}/features/b/x/c/1/0) does not decode "
        "(Zstd decompression error: invalid input data)",
        f"chunk 3,0 of structures/positions (file {root}/structures/positions/c/3/0) does not "
        "decode (Zstd decompression error: invalid input data)",
    ]
    assert error_line(done) == (
        f"dfre: error: store {root}: chunk 1 of structures/numbers (file "
        f"{root}/structures/numbers/c/1) is missing (its file is gone) (and 3 more problems: "
        f"see `dfre verify --store {root}`): restore the store from a copy, or ingest the "
        "structures into a new store"
    )
    os.chmod(root, 0o555)  # the check only reads
    try:
        assert dfre("verify", root).stdout == done.stdout
    finally:
        os.chmod(root, 0o755)


def test_metric_on_a_corrupted_chunk_is_one_line_and_releases_the_lock(sample_store, tmp_path):
    store = feature_store(sample_store, tmp_path / "s.zarr")
    root = Path(store.path)
    damage(root / "features/a/x/c/2/0", "garbage")
    before = tree_hashes(root)
    gfre = dfre("gfre", "--store", root, "--features", "a/x", "b/x", "--selection", "random:20",
                "--workers", "1", "--dashboard-address", ":0")  # fmt: skip
    assert error_line(gfre) == (
        f"dfre: error: store {root}: chunk 2,0 of features/a/x (file {root}/features/a/x/c/2/0) "
        "does not decode (Zstd decompression error: invalid input data): run `dfre featurize "
        f"--store {root} --model a` to recompute it"
    )
    assert tree_hashes(root) == before and not (root / LOCK_NAME).exists()


# ---------------------------------------------------------------------- repair and refusal
def small_structures(n: int = 12) -> list:
    """``3 n`` structures of 2 or 3 atoms."""
    frames = []
    for i in range(n):
        for atoms in (bulk("Si", "diamond", 5.43), molecule("H2O"), bulk("NaCl", "rocksalt", 5.64)):
            atoms = atoms.copy()
            atoms.rattle(0.02, seed=i)
            frames.append(atoms)
    return frames


def model_arrays(path) -> dict[str, np.ndarray]:
    group = Store.open(path).group["features"]["chgnet-0.3.0"]
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def test_featurize_again_recomputes_corrupted_and_missing_chunks(tmp_path):
    reference, damaged = tmp_path / "reference.zarr", tmp_path / "damaged.zarr"
    frames = small_structures(40)  # 280 atoms: 9 units of one 32-row chunk each
    Store.create(reference, chunk_atoms=32).append(StructureBlock.from_atoms(frames))
    settings = dict(layers=["ll"], chunk_atoms=32, batch_atoms=64, torch_threads=1)
    first = featurize(str(reference), "chgnet-0.3.0", **settings)
    assert first.n_units >= 6 and not first.repaired
    shutil.copytree(reference, damaged)
    root = damaged / "features/chgnet-0.3.0"
    damage(root / "ll/c/1/0", "garbage")
    damage(root / "ll/c/3/0", "missing")  # recorded done, but gone: would read as NaN
    damage(root / "_done_ll/c/4", "truncated")  # (no mask chunk is stored: nothing is masked)
    damage(root / "_done_ll/c/5", "empty")

    again = featurize(str(damaged), "chgnet-0.3.0", **settings)
    assert [problem.split(" (file")[0] for problem in again.repaired] == [
        "chunk 1,0 of features/chgnet-0.3.0/ll",
        "chunk 4 of features/chgnet-0.3.0/_done_ll",
        "chunk 5 of features/chgnet-0.3.0/_done_ll",
        "chunk 3,0 of features/chgnet-0.3.0/ll",
    ]
    assert again.n_units_computed == 4
    assert "4 corrupted or missing chunk(s) recomputed:" in again.summary()
    got, want = model_arrays(damaged), model_arrays(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert dfre("verify", damaged).returncode == 0
    assert featurize(str(damaged), "chgnet-0.3.0", **settings).n_units_computed == 0


def test_complete_features_with_a_chunk_file_gone_are_not_taken_as_done(tmp_path):
    path = tmp_path / "s.zarr"
    Store.create(path, chunk_atoms=32).append(StructureBlock.from_atoms(small_structures(12)))
    settings = dict(layers=["ll"], chunk_atoms=32, batch_atoms=64, torch_threads=1)
    featurize(str(path), "chgnet-0.3.0", **settings)
    want = model_arrays(path)
    damage(path / "features/chgnet-0.3.0/ll/c/1/0", "missing")  # every done flag still set

    again = featurize(str(path), "chgnet-0.3.0", **settings)
    assert again.n_units_computed == 1
    assert [p.split(" (file")[0] for p in again.repaired] == [
        "chunk 1,0 of features/chgnet-0.3.0/ll"
    ]
    np.testing.assert_array_equal(model_arrays(path)["ll"], want["ll"])


def test_featurize_on_corrupted_structures_is_one_line(tmp_path):
    path = tmp_path / "s.zarr"
    Store.create(path, chunk_atoms=16).append(StructureBlock.from_atoms(small_structures()))
    damage(path / "structures/positions/c/2/0", "garbage")
    done = dfre("featurize", "--store", path, "--model", "chgnet-0.3.0", "--layers", "ll",
                "--workers", "1", "--dashboard-address", ":0")  # fmt: skip
    assert error_line(done) == (
        f"dfre: error: store {path}: chunk 2,0 of structures/positions (file "
        f"{path}/structures/positions/c/2/0) does not decode (Zstd decompression error: invalid "
        "input data): restore the store from a copy, or ingest the structures into a new store"
    )
    assert not (path / LOCK_NAME).exists()


def test_ingest_refuses_to_append_to_damaged_structures(tmp_path):
    first, second = tmp_path / "first.xyz", tmp_path / "second.xyz"
    write(first, small_structures())
    write(second, [bulk("Cu", "fcc", 3.6)] * 3)
    path = tmp_path / "s.zarr"
    assert dfre("ingest", first, "--store", path, "--chunk-atoms", "16").returncode == 0
    last = max((path / "structures/positions/c").iterdir(), key=lambda p: int(p.name))
    damage(last / "0", "truncated")
    before = tree_hashes(path)
    done = dfre("ingest", second, "--store", path)
    assert error_line(done) == (
        f"dfre: error: cannot append to store {path}: chunk {last.name},0 of structures/positions "
        f"(file {path}/structures/positions/c/{last.name}/0) does not decode (Zstd decompression "
        "error: invalid input data): restore the store from a copy, or ingest the structures "
        "into a new store"
    )
    assert tree_hashes(path) == before
    assert zarr.open_group(path, mode="r").attrs["n_structures"] == len(small_structures())
