"""Reuse of up-to-date results: a second run with the same inputs and settings reuses the
stored result without starting a cluster; a changed setting, a rewritten feature chunk, a
changed mask or ``--force`` recomputes it. Also for cumulant descriptors and studies."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest

from dfre.cli import main
from dfre.reuse import array_identity, input_key
from dfre.store import Store, StructureBlock
from dfre.studies.steps import Steps

LOCAL = ["--workers", "1", "--dashboard-address", ":0", "--no-gpu"]
NAMES = ["ma/x", "mb/y"]


@pytest.fixture
def store_path(tmp_path) -> str:
    """200 structures of 1-6 atoms in two subsets, two random feature sets."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 7, 200)
    n = int(counts.sum())
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=128)
    store.append(
        StructureBlock(
            numbers=rng.integers(1, 30, n).astype(np.int16),
            positions=rng.normal(size=(n, 3)),
            counts=counts,
            cell=np.zeros((200, 3, 3)),
            pbc=np.zeros((200, 3), bool),
            info={"subset": ["a" if i % 3 else "b" for i in range(200)]},
        )
    )
    base = rng.normal(size=(n, 5))
    store.create_feature("ma/x", 5)[:] = base.astype(np.float32)
    store.create_feature("mb/y", 3)[:] = np.tanh(base[:, :3] + 0.1 * rng.normal(size=(n, 3)))
    return str(store.path)


def files_of(path: str, run: str) -> list:
    return array_identity(Store.open(path), f"results/{run}")


def gfre(store_path, capsys, *extra) -> tuple[str, str]:
    argv = ["gfre", "--store", store_path, "--features", *NAMES, "--selection", "random:60"]
    assert main([*argv, *extra, *LOCAL]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_gfre_is_reused_until_an_input_or_a_setting_changes(store_path, capsys):
    first_out, first_err = gfre(store_path, capsys)
    assert "GFRE statistics pass" in first_err and "Dask dashboard" in first_err
    made = files_of(store_path, "gfre")

    again_out, again_err = gfre(store_path, capsys)
    reused = "results/gfre: GFRE of 2 feature sets: inputs and settings unchanged, reused"
    assert f"{reused} (--force recomputes)" in again_err
    assert "Dask dashboard" not in again_err  # no cluster was started
    assert again_out == first_out and files_of(store_path, "gfre") == made

    _, err = gfre(store_path, capsys, "--seed", "1")  # another setting
    assert "reused" not in err and "GFRE statistics pass" in err
    seeded = files_of(store_path, "gfre")
    assert gfre(store_path, capsys, "--seed", "1")[1].count("reused") == 1

    store = Store.open(store_path, mode="r+")
    chunk = store.feature_array("mb/y")
    chunk[:128] = np.asarray(chunk[:128]) * 2  # one chunk of an input rewritten
    out, err = gfre(store_path, capsys, "--seed", "1")
    assert "reused" not in err and out != first_out and files_of(store_path, "gfre") != seeded

    _, err = gfre(store_path, capsys, "--seed", "1", "--force")
    assert "reused" not in err and "GFRE statistics pass" in err


def test_lfre_is_reused_and_a_new_mask_recomputes_it(store_path, capsys):
    argv = ["lfre", "--store", store_path, "--features", *NAMES, "--selection", "random:40"]
    assert main([*argv, *LOCAL]) == 0
    first = capsys.readouterr()
    assert main([*argv, *LOCAL]) == 0
    again = capsys.readouterr()
    reused = "results/lfre: LFRE of 2 feature sets: inputs and settings unchanged, reused"
    assert reused in again.err
    assert again.out == first.out
    store = Store.open(store_path, mode="r+")
    group = store.group["features"]["ma"]
    mask = group.create_array("_mask", shape=(store.n_atoms,), dtype="bool", fill_value=False)
    mask[:10] = True  # the model could not handle the first atoms after all
    assert main([*argv, *LOCAL]) == 0
    assert "reused" not in capsys.readouterr().err


def test_input_key_follows_array_files_settings_and_names(store_path):
    store = Store.open(store_path, mode="r+")
    key = input_key(store, "gfre", NAMES, {"seed": 0})
    assert key == input_key(Store.open(store_path), "gfre", NAMES, {"seed": 0})
    assert key != input_key(store, "gfre", NAMES, {"seed": 1})
    assert key != input_key(store, "lfre", NAMES, {"seed": 0})
    assert key != input_key(store, "gfre", NAMES[::-1], {"seed": 0})
    store.feature_array("ma/x").attrs["note"] = "changed attributes"
    assert key != input_key(store, "gfre", NAMES, {"seed": 0})


def test_steps_reuse_descriptors_and_studies_without_a_cluster(store_path):
    started = []

    @contextlib.contextmanager
    def cluster():
        started.append(True)
        yield

    def run_all(force=False):
        store = Store.open(store_path, mode="r+")
        with Steps(store, cluster=cluster, force=force) as steps:
            name = steps.cumulants("ma/x", 2)
            steps.order_study(name, selection="random:20")
            steps.compare("gfre", NAMES, "random:30", run="g")
        return steps.records

    first = run_all()
    assert [r.reused for r in first] == [False, False, False] and len(started) == 1
    descriptor = array_identity(Store.open(store_path), "descriptors/cumulants-ma-x-M2")
    again = run_all()
    assert [r.reused for r in again] == [True, True, True] and len(started) == 1
    assert array_identity(Store.open(store_path), "descriptors/cumulants-ma-x-M2") == descriptor
    forced = run_all(force=True)
    assert [r.reused for r in forced] == [False, False, False] and len(started) == 2
    assert re.match(r"results/g: GFRE of 2 feature sets", forced[-1].what)
