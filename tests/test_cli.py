"""One consistent, fast and quiet command line: ``--store`` and ``--features A B`` in every
command, "did you mean" for names, selections checked before any cluster starts, no heavy
imports for ``--help`` and ``dfre models``, a featurize with nothing to do that loads no
model, and output in dfre's own words only."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from dfre.cli import main
from dfre.store import Store, StructureBlock

LOCAL = ["--workers", "1", "--dashboard-address", ":0", "--no-gpu"]
#: Lines dfre writes to stderr: timestamped progress and stage lines, or one-line errors.
DFRE_LINE = re.compile(r"^(\d\d:\d\d:\d\d dfre( demo| run)?: |dfre: error: )")
HEAVY = ("numpy", "dask", "distributed", "zarr", "torch", "matplotlib", "sklearn", "pandas")


@pytest.fixture
def store_path(tmp_path) -> str:
    """120 structures in two subsets with two random feature sets ma/x (5) and mb/y (3)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 6, 120)
    n = int(counts.sum())
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=64)
    store.append(
        StructureBlock(
            numbers=rng.integers(1, 30, n).astype(np.int16),
            positions=rng.normal(size=(n, 3)),
            counts=counts,
            cell=np.zeros((120, 3, 3)),
            pbc=np.zeros((120, 3), bool),
            info={"subset": ["a" if i % 4 else "b" for i in range(120)]},
        )
    )
    store.create_feature("ma/x", 5)[:] = rng.normal(size=(n, 5)).astype(np.float32)
    store.create_feature("mb/y", 3)[:] = rng.normal(size=(n, 3)).astype(np.float32)
    return str(store.path)


def run_dfre(*argv: str, code: str = "") -> subprocess.CompletedProcess:
    """``python -m dfre ARGV`` in a fresh interpreter (``code`` runs after it, if given)."""
    script = (
        "import sys\nfrom dfre.cli import main\n"
        f"try:\n    status = main({list(argv)!r})\nexcept SystemExit as e:\n    status = e.code\n"
        f"{code}\nsys.exit(status)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )


def imported(result: subprocess.CompletedProcess) -> set[str]:
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


PRINT_HEAVY = f"import json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"


# ---------------------------------------------------------------------- fast start
def test_help_and_models_import_nothing_heavy():
    helped = run_dfre("--help", code=PRINT_HEAVY)
    assert helped.returncode == 0 and "featurize" in helped.stdout
    assert imported(helped) == set()
    for command in ("gfre", "featurize", "demo", "report"):
        sub = run_dfre(command, "--help", code=PRINT_HEAVY)
        assert sub.returncode == 0 and imported(sub) == set(), command
    models = run_dfre("models", code=PRINT_HEAVY)
    assert models.returncode == 0 and "sevennet-mf-0-r2scan" in models.stdout
    assert imported(models) <= {"numpy"}  # no torch, Dask, Zarr or matplotlib


def test_featurize_with_nothing_to_do_loads_no_model_and_starts_no_cluster(
    sample_store_copy, capsys
):
    argv = ["featurize", "--store", sample_store_copy, "--model", "chgnet-0.3.0"]
    assert main([*argv, "--layers", "ll", *LOCAL]) == 0
    first = capsys.readouterr()
    assert "chgnet-0.3.0: layers ll; computed" in first.out
    assert "CHGNet" not in first.out + first.err  # the model's load message stays quiet
    again = run_dfre(*argv, "--layers", "ll", *LOCAL, code=PRINT_HEAVY)
    assert again.returncode == 0, again.stderr
    done = "features/chgnet-0.3.0/{ll}: complete with the weights of chgnet-0.3.0, nothing to do"
    assert done in again.stderr and "Dask dashboard" not in again.stderr
    assert "torch" not in imported(again)
    # other layers are still to do: that is not "nothing"
    rest = run_dfre(*argv, "--layers", "bb,ll", *LOCAL)
    assert rest.returncode == 0 and "nothing to do" not in rest.stderr


# ---------------------------------------------------------------------- consistency
def test_features_take_several_names_or_repeat(store_path, capsys):
    assert main(["cumulants", "--store", store_path, "--features", "ma/x", "mb/y",
                 "--order", "2", *LOCAL]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "ma/x -> descriptors/cumulants-ma-x-M2" in out
    assert "mb/y -> descriptors/cumulants-mb-y-M2" in out
    argv = ["gfre", "--store", store_path, "--selection", "random:40", "--json"]
    assert main([*argv, "--features", "ma/x", "--features", "mb/y", *LOCAL]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["names"] == ["ma/x", "mb/y"]


def test_info_takes_the_store_as_option_or_argument(store_path, capsys):
    assert main(["info", "--store", store_path]) == 0
    by_option = capsys.readouterr().out
    assert main(["info", store_path]) == 0
    assert capsys.readouterr().out == by_option and "ma/x" in by_option
    assert main(["info", store_path, "--store", store_path + "x"]) == 2
    assert "two stores given" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("dfre: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gfre", "--features", "ma/x", "mb/yy"], "no feature set 'mb/yy' (did you mean 'mb/y'?)"),
        (["report", "--out", "{tmp}/r", "--run", "gfre-crossmodel"], "no results"),
        (["featurize", "--model", "chgnet-030"], "unknown model 'chgnet-030' (did you mean "
         "'chgnet-0.3.0'?)"),
        (["pcovr", "--descriptor", "cumulants-ma-x-M3"], "(did you mean 'cumulants-ma-x-M2'?)"),
    ],
)  # fmt: skip
def test_names_get_a_did_you_mean(store_path, tmp_path, capsys, argv, message):
    store = Store.open(store_path, mode="r+")
    store.write_descriptor("cumulants-ma-x-M2", np.zeros((store.n_structures, 10)))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([argv[0], "--store", store_path, *argv[1:]]) == 2
    assert message in one_line_error(capsys)


def test_a_mistyped_run_name_gets_a_suggestion(store_path, tmp_path, capsys):
    argv = ["gfre", "--store", store_path, "--features", "ma/x", "mb/y", "--selection"]
    assert main([*argv, "random:30", "--run", "gfre-cross-model", *LOCAL]) == 0
    capsys.readouterr()
    out = str(tmp_path / "r")
    assert main(["report", "--store", store_path, "--out", out, "--run", "gfre-crossmodel"]) == 2
    assert "(did you mean 'gfre-cross-model'?)" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gfre", "--features", "ma/x", "mb/y", "--selection", "stratified:{all}"],
         "selection 'stratified:{all}' leaves 0 train rows but GFRE's 2-fold "
         "cross-validation needs at least 2: ask for fewer test rows"),
        (["lfre", "--features", "ma/x", "mb/y", "--selection", "random:{most}"],
         "selection 'random:{most}' leaves 3 train rows but LFRE with k = 5 neighbours "
         "needs at least 5: lower k (--k) or ask for fewer test rows"),
        (["lfre", "--features", "ma/x", "mb/y", "--selection", "kfold:5000"],
         "selection 'kfold:5000' asks for 5000 folds but only {all} valid rows exist: ask "
         "for at most {all} folds (kfold:2 to kfold:{all})"),
        (["cumulants", "--features", "ma/x", "--order", "2", "--study", "gfre", "--selection",
          "random:119"],
         "selection 'random:119' leaves 1 train rows but GFRE's 2-fold cross-validation "
         "needs at least 2"),
        (["checkpoints", "--features", "ma/x", "mb/y", "--selection", "stratified:{all}"],
         "leaves 0 train rows but GFRE of the checkpoints needs at least 2"),
    ],
)  # fmt: skip
def test_selections_are_checked_before_a_cluster_starts(store_path, capsys, argv, message):
    n = Store.open(store_path).n_atoms
    fill = {"{all}": str(n), "{most}": str(n - 3)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        message = message.replace(key, value)
    before = sorted(Store.open(store_path).result_names())
    assert main([argv[0], "--store", store_path, *argv[1:], *LOCAL]) == 2
    line = one_line_error(capsys)  # one line and nothing else: no dashboard, no progress
    assert message in line
    assert sorted(Store.open(store_path).result_names()) == before


# ---------------------------------------------------------------------- quiet
@contextlib.contextmanager
def port_taken(port: int):
    """Hold ``port`` (unless something else already does)."""
    holder = socket.socket()
    try:
        holder.bind(("", port))
        holder.listen()
    except OSError:
        pass  # already taken: just as good
    try:
        yield
    finally:
        holder.close()


def test_a_computing_command_says_only_what_matters(store_path):
    with port_taken(8787):  # dfre picks another dashboard port without Dask's warning
        result = run_dfre(
            "lfre", "--store", store_path, "--features", "ma/x", "mb/y", "--selection",
            "random:30", "--workers", "2", "--no-gpu",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(DFRE_LINE.match(line) for line in lines), result.stderr
    assert "Dask dashboard http://" in result.stderr
    assert ":8787/" not in result.stderr
    assert any("LFRE: local ridge of 30 test rows" in line for line in lines)
