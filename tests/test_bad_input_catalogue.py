"""A catalogue of bad inputs across the commands: each runs as a real ``python -m dfre``
subprocess and must end with exit status 2, exactly one line on stderr (the expected
``dfre: error: ...``, no traceback) and the store's files unchanged, byte for byte.

Every case gets its own copy of one prepared store; the subprocesses run a few at a
time in a module fixture (starting Python with dfre's imports dominates the cost).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import write

from dfre.data.sample import write_sample
from dfre.descriptors.cumulants import compute_cumulants
from dfre.store import Store

MODELS = (
    "chgnet-0.3.0, chgnet-0.2.0, chgnet-r2scan, sevennet-0, sevennet-0-22may2024, "
    "sevennet-mf-0-pbe, sevennet-mf-0-r2scan, sevennet-l3i5, mace, metatomic, uma, dpa, orb, "
    "mattersim, generic"
)
NO_STORE = (
    "no dfre store at {D}/nostore.zarr: create one with `dfre ingest FILES --store "
    "{D}/nostore.zarr` or `dfre sample --store {D}/nostore.zarr`"
)
GFRE = "gfre --store {S} --features a/x b/x --selection random:20"

#: (case id, arguments, the exact error message after "dfre: error: ").
#: {S}: the case's store, {D}: the folder of the prepared input files.
CASES = [
    # files
    ("ingest-missing-file", "ingest {D}/nope.xyz --store {S}",
     "input file {D}/nope.xyz does not exist"),
    ("ingest-binary-junk", "ingest {D}/junk.xyz --store {S}",
     "cannot read {D}/junk.xyz frame 0 as extxyz: ase.io.extxyz: Expected xyz header but got: "
     "invalid literal for int() with base 10: 'not a structure file\\x00\\x01\\x02'; fix or "
     "remove that frame, or give the right --format"),
    ("ingest-folder-as-file", "ingest {D}/adir --store {S}",
     "input {D}/adir is not a file: give structure files"),
    ("ingest-unknown-format", "ingest {D}/si.xyz --format nosuchformat --store {S}",
     "unknown format 'nosuchformat' for {D}/si.xyz: give an ASE format that can be read "
     "(see `ase info --formats`), e.g. extxyz, db, cif, vasp"),
    ("run-missing-study", "run {D}/nostudy.toml", "study file {D}/nostudy.toml does not exist"),
    ("run-broken-toml", "run {D}/broken.toml",
     "study file {D}/broken.toml is not valid TOML: Expected ']' at the end of a table "
     "declaration (at line 1, column 9)"),
    ("run-unknown-key", "run {D}/unknown.toml",
     "study file {D}/unknown.toml: unknown table or key frobnicate; known: store, dataset, "
     "features, compare, checkpoints, cumulants, pcovr, report"),
    # stores
    ("store-is-a-file", "ingest {D}/si.xyz --store {D}/afile",
     "store path {D}/afile is a file, not a Zarr store: give the store directory"),
    ("info-no-store", "info {D}/nostore.zarr", NO_STORE),
    ("report-no-results", "report --store {S} --out {D}/report",
     "store {S} has no results: run `dfre gfre`, `dfre lfre` or `dfre pcovr` first"),
    ("sample-no-atoms", "sample --atoms 0 --store {S}",
     "--atoms must be a positive number of atoms, not 0"),
    ("sample-mistyped-subset", "sample --atoms 10 --store {D}/new.zarr --subsets bulk=1,molecule=1",
     "--subsets: no subset 'molecule' in the sample dataset (did you mean 'molecules'?); choose "
     "from bulk, rattled-bulk, vacancies, surfaces, clusters, molecules, random-alloys"),
    ("sample-subsets-syntax", "sample --atoms 10 --store {D}/new.zarr --subsets bulk:1",
     "--subsets 'bulk:1': write NAME=WEIGHT pairs separated by commas, e.g. bulk=2,molecules=1"),
    ("sample-subsets-zero", "sample --atoms 10 --store {D}/new.zarr --subsets bulk=0",
     "--subsets: give at least one subset a positive weight"),
    # feature sets and descriptors
    ("gfre-unknown-feature-set", "gfre --store {S} --features a/x zz/y",
     "store {S} has no feature set 'zz/y'; available: a/x, b/x"),
    ("gfre-mistyped-feature-set", "gfre --store {S} --features a/x b/xx",
     "store {S} has no feature set 'b/xx' (did you mean 'b/x'?); available: a/x, b/x"),
    ("info-two-stores", "info {S} --store {D}/other.zarr",
     "two stores given ({S} and --store {D}/other.zarr): give one"),
    ("gfre-one-feature-set", "gfre --store {S} --features a/x",
     "give at least two feature sets to compare (got ['a/x'])"),
    ("gfre-repeated-feature-set", "gfre --store {S} --features a/x a/x",
     "feature sets are repeated in ['a/x', 'a/x']: give each once"),
    ("lfre-k-1", "lfre --store {S} --features a/x b/x --k 1",
     "--k 1: the local 2-fold ridge needs at least 2 neighbours"),
    ("cumulants-order-0", "cumulants --store {S} --features a/x --order 0",
     "cumulant order must be an integer >= 1 (got 0): use order 1 or more"),
    ("pcovr-unknown-descriptor", "pcovr --store {S} --descriptor nope",
     "store {S} has no descriptor 'nope'; available: cumulants-a-x-M2"),
    ("pcovr-mixing", "pcovr --store {S} --descriptor cumulants-a-x-M2 --mixing 1.5",
     "--mixing must lie in [0, 1] (got 1.5)"),
    ("checkpoints-epochs", "checkpoints --store {S} --features a/x b/x --epochs 1",
     "1 --epochs for 2 --features: give one each"),
    # selections
    ("selection-unknown-kind", "gfre --store {S} --features a/x b/x --selection foo:3",
     "unknown selection 'foo:3': use random:N, stratified:N, structure:N or kfold:K"),
    ("selection-too-large", "gfre --store {S} --features a/x b/x --selection stratified:100000",
     "selection 'stratified:100000' asks for 100000 test items but only 202 valid rows exist: "
     "ask for fewer"),
    ("selection-one-fold", "lfre --store {S} --features a/x b/x --selection kfold:1",
     "selection 'kfold:1' needs at least 2 folds"),
    ("selection-structures", "cumulants --store {S} --features a/x --order 2 --study gfre "
     "--selection kfold:100",
     "selection 'kfold:100' asks for 100 folds but only 10 valid rows exist: ask for at most "
     "10 folds (kfold:2 to kfold:10)"),
    ("selection-no-train-rows", "gfre --store {S} --features a/x b/x --selection random:202",
     "selection 'random:202' leaves 0 train rows but GFRE's 2-fold cross-validation needs at "
     "least 2: ask for fewer test rows"),
    # models
    ("model-unknown", "featurize --store {S} --model nosuch-model",
     f"unknown model 'nosuch-model'; known models: {MODELS} (see `dfre models`)"),
    ("model-mistyped", "featurize --store {S} --model sevennet-l3i4",
     f"unknown model 'sevennet-l3i4' (did you mean 'sevennet-l3i5'?); known models: {MODELS} "
     "(see `dfre models`)"),
    ("model-unknown-layer", "featurize --store {S} --model chgnet-0.3.0 --layers xx",
     "model chgnet-0.3.0 has no layer xx; it offers: bb, ll"),
    ("model-unknown-option", "featurize --store {S} --model sevennet-0 --option nope=1",
     "model sevennet-0 does not take the option(s) nope; it takes no options "
     "(see `dfre models`)"),
    ("model-batch-atoms-0", "featurize --store {S} --model chgnet-0.3.0 --batch-atoms 0",
     "--batch-atoms must be a positive number of atoms, got 0"),
    ("model-store-name", "featurize --store {S} --model chgnet-0.3.0 --name _bad",
     "model name '_bad' in the store must be non-empty, without '/' or a leading '_'"),
    ("model-generic-without-runner",
     "featurize --store {S} --model generic --weights {D}/afile --hook ll=a.b",
     "the generic model needs base=REGISTRY_NAME, or --weights PATH and "
     "--option runner=package.module:function"),
    ("model-pickled-checkpoint",
     "featurize --store {S} --model generic --weights {D}/pickled.pt --hook ll=a "
     "--option runner=dfre.models.base:registry",
     "generic model file {D}/pickled.pt is a full Python pickle: opening it can run any code "
     "it holds; pass --trust-checkpoint (trust_checkpoint=True) only if you trust its source"),
    # cluster settings
    ("cluster-missing-scheduler-file", GFRE + " --scheduler-file {D}/nosched.json",
     "scheduler file {D}/nosched.json does not exist: start the scheduler first (`dask "
     "scheduler --scheduler-file {D}/nosched.json` or `dfre cluster start ... "
     "--scheduler-file {D}/nosched.json`) or fix the path"),
    ("cluster-unreachable-scheduler",
     GFRE + " --scheduler tcp://127.0.0.1:9 --scheduler-timeout 1",
     "cannot reach the Dask scheduler at tcp://127.0.0.1:9 (--scheduler) within 1 s: check "
     "the address and that the scheduler is running"),
    ("cluster-report-folder", GFRE + " --performance-report {D}/nodir/r.html",
     "--performance-report {D}/nodir/r.html: folder {D}/nodir does not exist; create it first"),
]  # fmt: skip


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def prepare(folder: Path) -> Path:
    """Input files and a store: sample structures, two feature sets, one descriptor."""
    (folder / "junk.xyz").write_bytes(b"not a structure file\x00\x01\x02")
    (folder / "adir").mkdir()
    (folder / "afile").write_text("x")
    (folder / "f.txt").write_text("grid")
    (folder / "broken.toml").write_text("[dataset\nstore=")
    (folder / "unknown.toml").write_text('store = "s.zarr"\nfrobnicate = 1\n')
    write(folder / "si.xyz", [bulk("Si", "diamond", 5.43)] * 2)
    torch.save({"payload": Evil()}, folder / "pickled.pt")
    path = folder / "base.zarr"
    write_sample(path, 200, seed=0, chunk_atoms=64)
    store = Store.open(path, mode="r+")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(store.n_atoms, 4))
    for name, values in {"a/x": x @ rng.normal(size=(4, 5)), "b/x": np.tanh(x[:, :3])}.items():
        store.create_feature(name, values.shape[1])[...] = values.astype(np.float32)
    compute_cumulants(store, "a/x", 2)
    return path


def run_case(folder: Path, base: Path, case_id: str, args: str) -> dict:
    store = folder / f"{case_id}.zarr"
    shutil.copytree(base, store)
    argv = args.format(S=store, D=folder).split()
    env = {**os.environ, "DFRE_SCHEDULER": ""}
    done = subprocess.run(
        [sys.executable, "-m", "dfre", *argv],
        capture_output=True, text=True, timeout=300, env=env, cwd=folder,
    )  # fmt: skip
    return {"store": store, "returncode": done.returncode, "stderr": done.stderr,
            "hashes": tree_hashes(store)}  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    base = prepare(folder)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {
            case_id: pool.submit(run_case, folder, base, case_id, args)
            for case_id, args, _ in CASES
        }
        results = {case_id: future.result() for case_id, future in futures.items()}
    return folder, tree_hashes(base), results


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(outcomes, case_id, args, message):
    folder, base_hashes, results = outcomes
    got = results[case_id]
    expected = "dfre: error: " + message.format(S=got["store"], D=folder) + "\n"
    assert got["returncode"] == 2
    assert "Traceback" not in got["stderr"]
    assert got["stderr"].count("\n") == 1, got["stderr"]
    assert got["stderr"] == expected
    assert got["hashes"] == base_hashes  # the store is untouched
    assert not (folder / "nostore.zarr").exists()
    assert not re.search(r"unpickled", got["stderr"])
