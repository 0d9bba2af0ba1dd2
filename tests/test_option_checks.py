"""Options are checked in the main process before any work: results names that are not
one group under ``results/`` and out-of-range numbers end with exit status 2, one line
``dfre: error: ...`` and the store unchanged, byte for byte (real ``python -m dfre``
subprocesses on copies of the bad-input catalogue's store). Every numeric option of
every command has a range.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input_catalogue import prepare, tree_hashes

from dfre.cli import build_parser
from dfre.cli.checks import CHECKED_BY_COMMAND, RANGES
from dfre.errors import DfreError
from dfre.store import Store

RUN_NAME = (
    "run name {name} is not allowed: use letters, digits, '_', '.' and '-' "
    "(not empty, no '/', not '.' or '..'), e.g. --run gfre-ll"
)
GFRE = "gfre --store {S} --features a/x b/x --selection random:20"
FEATURIZE = "featurize --store {S} --model chgnet-0.3.0"

#: (case id, arguments, the exact error message after "dfre: error: ")
CASES = [
    ("run-empty", f"{GFRE} --run ''", RUN_NAME.format(name="''")),
    ("run-nested", f"{GFRE} --run a/b", RUN_NAME.format(name="'a/b'")),
    ("run-parent", f"{GFRE} --run ../x", RUN_NAME.format(name="'../x'")),
    ("run-dotdot", "lfre --store {S} --features a/x b/x --run ..", RUN_NAME.format(name="'..'")),
    ("run-dot", "pcovr --store {S} --descriptor cumulants-a-x-M2 --run .",
     RUN_NAME.format(name="'.'")),
    ("report-runs", "report --store {S} --out {D}/r --run gfre --run ../x",
     RUN_NAME.format(name="'../x'")),
    ("run-prefix", "checkpoints --store {S} --features a/x b/x --run-prefix x/",
     "--run-prefix 'x/' is not allowed: use letters, digits, '_', '.' and '-' (no '/')"),
    ("torch-threads", f"{FEATURIZE} --torch-threads -3", "--torch-threads must be >= 1, got -3"),
    ("torch-threads-0", f"{FEATURIZE} --torch-threads 0", "--torch-threads must be >= 1, got 0"),
    ("prefetch", f"{FEATURIZE} --prefetch -1", "--prefetch must be >= 0, got -1"),
    ("graph-processes", f"{FEATURIZE} --graph-processes -2",
     "--graph-processes must be >= 0, got -2"),
    ("seed", f"{GFRE} --seed -1", "--seed must be >= 0, got -1"),
    ("scheduler-timeout", f"{GFRE} --scheduler-timeout 0",
     "--scheduler-timeout must be > 0, got 0.0"),
    ("scheduler-timeout-nan", f"{GFRE} --scheduler-timeout nan",
     "--scheduler-timeout must be a number, got nan"),
    ("worker-timeout", f"{GFRE} --worker-timeout -5", "--worker-timeout must be >= 0, got -5.0"),
    ("max-structures", "export-chemiscope --store {S} --out {D}/m.json --max-structures 0",
     "--max-structures must be >= 1, got 0"),
    ("cluster-info-wait", "cluster info --wait 0", "--wait must be >= 1, got 0"),
    ("epochs-inf", "checkpoints --store {S} --features a/x b/x --epochs 0 inf",
     "--epochs must be a finite number, got inf"),
    ("cluster-start-check-every", "cluster start --jobqueue slurm --workers 1 "
     "--scheduler-file {D}/s.json --check-every 0", "--check-every must be > 0, got 0.0"),
    ("cluster-start-failures", "cluster start --jobqueue slurm --workers 1 "
     "--scheduler-file {D}/s.json --max-job-failures 0", "--max-job-failures must be >= 1, got 0"),
]  # fmt: skip


def run_case(folder: Path, base: Path, case_id: str, args: str) -> dict:
    store = folder / f"{case_id}.zarr"
    shutil.copytree(base, store)
    done = subprocess.run(
        [sys.executable, "-m", "dfre", *shlex.split(args.format(S=store, D=folder))],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DFRE_SCHEDULER": ""},
        cwd=folder,
    )  # fmt: skip
    return {"store": store, "returncode": done.returncode, "stderr": done.stderr,
            "hashes": tree_hashes(store)}  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options")
    base = prepare(folder)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {
            case_id: pool.submit(run_case, folder, base, case_id, args)
            for case_id, args, _ in CASES
        }
        results = {case_id: future.result() for case_id, future in futures.items()}
    return folder, tree_hashes(base), results


@pytest.mark.parametrize("case_id, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_option(outcomes, case_id, args, message):
    folder, base_hashes, results = outcomes
    got = results[case_id]
    assert got["returncode"] == 2, got["stderr"]
    assert got["stderr"] == "dfre: error: " + message.format(S=got["store"], D=folder) + "\n"
    assert got["hashes"] == base_hashes  # earlier results and everything else untouched


def _numeric_options(parser: argparse.ArgumentParser, path: str = "dfre"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, f"{path} {name}")
        elif action.type in (int, float):
            yield path, action.dest


def test_every_numeric_option_has_a_range():
    options = list(_numeric_options(build_parser()))
    assert len(options) > 20
    unchecked = [f"{cmd} --{d}" for cmd, d in options if d not in {*RANGES, *CHECKED_BY_COMMAND}]
    assert unchecked == []


def test_results_names_in_the_library(sample_store_copy):
    from dfre.metrics.gfre import gfre_store

    store = Store.open(sample_store_copy, mode="r+")
    for bad in ["", ".", "..", "a/b", "../x", "x y", "é"]:
        with pytest.raises(DfreError, match="is not allowed"):
            store.create_result(bad)
        with pytest.raises(DfreError, match="is not allowed"):
            gfre_store(store, ["a/x", "b/x"], run=bad)  # before the feature sets are looked at
    group = store.create_result("gfre.v2_ll-bb", {"complete": False})  # as dfre's writers do
    assert store.result_names() == [] and store.result_names(incomplete=True) == ["gfre.v2_ll-bb"]
    with pytest.raises(DfreError, match=r"results/gfre.v2_ll-bb of .* is incomplete"):
        store.result("gfre.v2_ll-bb")
    store.finish_result(group)
    assert store.result("gfre.v2_ll-bb").attrs["complete"] is True
