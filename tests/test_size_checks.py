"""Size and sanity checks before any work: a sample that cannot fit on the store's file
system is refused at once, with the estimated size; a structure with two atoms at the
same position is refused by ingest, naming file, frame, atoms and distance (periodic
images included; the close-pair search agrees with ASE's neighbour list)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import write
from ase.neighborlist import neighbor_list

from dfre.data.overlap import first_overlap
from dfre.data.sample import BYTES_PER_ATOM
from dfre.store import Store, StructureBlock


def dfre(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfre", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("atoms", ["1e12", "100000000000000000000"])
def test_sample_larger_than_the_disk_is_refused_at_once(tmp_path, atoms):
    n = int(float(atoms))
    free = shutil.disk_usage(tmp_path).free
    assert n * BYTES_PER_ATOM > free, "this machine has room for the sample: use a larger one"
    store = tmp_path / "s.zarr"
    done = dfre("sample", "--atoms", atoms, "--store", store)
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"dfre: error: a sample of {n} atoms needs about "
    ) and done.stderr.endswith(
        f" in {store} but its file system has {done.stderr.split(' has ')[-1].split(' free')[0]}"
        " free: ask for less, or use a store on a larger file system\n"
    )
    assert done.stderr.count("\n") == 1
    assert not store.exists()


def test_sample_estimate_is_an_upper_bound(tmp_path):
    from dfre.data.sample import write_sample

    store = write_sample(tmp_path / "s.zarr", 20000, seed=3)
    size = sum(p.stat().st_size for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    assert size <= store.n_atoms * BYTES_PER_ATOM


def block(frames):
    b = StructureBlock.from_atoms(frames)
    return b.positions, b.counts, b.cell, b.pbc


def test_close_pairs_agree_with_ase_neighbour_lists():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cell = bulk("Cu", "fcc", 3.6).cell @ (np.eye(3) + 0.2 * rng.normal(size=(3, 3)))
        atoms = Atoms(
            "Cu6", cell=cell, pbc=rng.random(3) < 0.7, scaled_positions=rng.random((6, 3))
        )
        i, j, d = neighbor_list("ijd", atoms, 0.6)
        want = d[i != j].min() if (i != j).any() else None
        got = first_overlap(*block([bulk("Si", "diamond", 5.43), atoms]), 0.6)
        assert (got is None) == (want is None)
        if got is not None:
            assert got.structure == 1 and got.distance == pytest.approx(want, abs=1e-12)


def test_ingest_refuses_atoms_at_the_same_position(tmp_path):
    water = molecule("H2O")
    doubled = water + Atoms("H", positions=[water.positions[2] + [0.004, 0, 0]])
    copper = bulk("Cu", "fcc", 3.61, cubic=True)
    image = copper + Atoms("Cu", positions=[copper.positions[1] + copper.cell[2]])
    cases = {
        "doubled.xyz": ([bulk("Si", "diamond", 5.43), doubled], 1, 2, 3, "0.004"),
        "image.xyz": ([water, water, image], 2, 1, 4, "0.000"),
    }
    for name, (frames, frame, i, j, distance) in cases.items():
        write(tmp_path / name, frames)
        store = tmp_path / f"{name}.zarr"
        done = dfre("ingest", tmp_path / name, "--store", store)
        assert done.returncode == 2
        assert done.stderr == (
            f"dfre: error: {tmp_path / name} frame {frame} has atoms {i} and {j} at the same "
            f"position ({distance} Å apart, closer than 0.1 Å): fix or remove that structure "
            "(or lower --min-distance)\n"
        )
        assert not store.exists()
    store = tmp_path / "accepted.zarr"
    done = dfre("ingest", tmp_path / "doubled.xyz", "--store", store, "--min-distance", "0")
    assert done.returncode == 0, done.stderr
    assert Store.open(store).n_structures == 2
