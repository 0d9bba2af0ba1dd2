import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

from dfre.cli import main
from dfre.data.sample import (
    EMT_METALS,
    SUBSETS,
    sample_source,
    sample_structures,
    write_sample,
)
from dfre.store import Store


def _arrays(path) -> dict:
    store = Store.open(path)
    return {
        "numbers": store.numbers(),
        "positions": store.positions().compute(),
        "offsets": store.offsets,
        "cell": store.cells(),
        "pbc": store.pbcs(),
        **{k: _plain(store.info(k)) for k in store.info_keys()},
    }


def _plain(values: np.ndarray) -> np.ndarray:
    return values if values.dtype.kind == "f" else values.astype(object)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.kind == "f":
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key].tolist() == b[key].tolist(), key


def test_sample_store_fixture(sample_store):
    store = Store.open(sample_store)
    assert 500 <= store.n_atoms < 700
    assert set(store.subsets()) == set(SUBSETS)
    assert {"subset", "energy", "source", "frame"} <= set(store.info_keys())
    assert store.provenance[-1]["complete"]


def test_same_seed_same_data_whatever_the_chunking(tmp_path):
    write_sample(tmp_path / "a.zarr", 3000, seed=5, chunk_atoms=512)
    write_sample(tmp_path / "b.zarr", 3000, seed=5, chunk_atoms=4096)
    write_sample(tmp_path / "c.zarr", 3000, seed=6, chunk_atoms=4096)
    a, b, c = (_arrays(tmp_path / n) for n in ("a.zarr", "b.zarr", "c.zarr"))
    _assert_same(a, b)
    assert a["numbers"].shape != c["numbers"].shape or not np.array_equal(
        a["positions"], c["positions"]
    )
    assert 3000 <= len(a["numbers"]) < 3000 + 200


def test_distributed_cluster_builds_the_same_sample(tmp_path):
    from distributed import Client, LocalCluster

    # two segments of 16384 atoms and one of 100, computed on real workers
    n_atoms = 2 * 16384 + 100
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster),
    ):
        write_sample(tmp_path / "dist.zarr", n_atoms, seed=3, energies=False)
    write_sample(tmp_path / "local.zarr", n_atoms, seed=3, energies=False)
    _assert_same(_arrays(tmp_path / "dist.zarr"), _arrays(tmp_path / "local.zarr"))


def _reference_distance(symbol: str) -> float:
    from dfre.data.sample import _crystals, _nearest_distance

    return _nearest_distance(symbol) if symbol in _crystals() else np.inf


def test_structures_are_reasonable():
    frames = list(sample_structures(4000, seed=1))
    assert {a.info["subset"] for a in frames} == set(SUBSETS)
    for atoms in frames:
        assert 1 <= len(atoms) <= 100
        assert atoms.numbers.max() <= 83 and not {84, 86} & set(atoms.numbers)
        if atoms.info["subset"] in ("clusters", "molecules"):
            assert not atoms.pbc.any()
        i, j, d = neighbor_list("ijd", atoms, 3.5)
        if len(d):
            # bond length: the smaller of the covalent radii sum and the mean of the two
            # elements' nearest-neighbour distances in their crystals (molecules: bonds)
            symbols = np.array(atoms.get_chemical_symbols())
            nearest = np.array([_reference_distance(s) for s in symbols])
            bond = np.minimum(
                covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]],
                (nearest[i] + nearest[j]) / 2,
            )
            assert (d / bond).min() > 0.8, atoms.info["subset"]


def test_energies_are_emt_for_emt_metals_only():
    frames = list(sample_structures(3000, seed=2))
    with_energy = [a for a in frames if np.isfinite(a.info["energy"])]
    assert 0.2 < len(with_energy) / len(frames) < 0.8
    for atoms in frames:
        emt_only = set(atoms.get_chemical_symbols()) <= set(EMT_METALS)
        assert np.isfinite(atoms.info["energy"]) == emt_only
    for atoms in with_energy[:5]:
        reference = atoms.copy()
        reference.calc = EMT()
        assert atoms.info["energy"] == pytest.approx(reference.get_potential_energy(), abs=1e-12)


def test_cli_sample_and_info(tmp_path, capsys):
    path = str(tmp_path / "s.zarr")
    assert main(["sample", "--store", path, "--atoms", "800", "--seed", "4"]) == 0
    assert "structures" in capsys.readouterr().out
    store = Store.open(path)
    assert store.n_atoms >= 800
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert f"atoms       {store.n_atoms}" in out and "random-alloys" in out
    assert main(["sample", "--store", path, "--atoms", "0"]) == 2
    assert "--atoms must be a positive" in capsys.readouterr().err


def test_interrupted_sample_resumes_and_repeats_do_nothing(tmp_path):
    n_atoms = 16384 + 500  # two segments, each committed on its own with small chunks
    whole, resumed = tmp_path / "whole.zarr", tmp_path / "resumed.zarr"
    write_sample(whole, n_atoms, seed=8, chunk_atoms=1000, energies=False)

    def stop_after_first_commit(n_written):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_sample(
            resumed,
            n_atoms,
            seed=8,
            chunk_atoms=1000,
            energies=False,
            progress=stop_after_first_commit,
        )
    partial = Store.open(resumed)
    assert 0 < partial.n_atoms < n_atoms
    assert partial.provenance[0]["complete"] is False
    write_sample(resumed, n_atoms, seed=8, energies=False)
    _assert_same(_arrays(resumed), _arrays(whole))
    assert Store.open(resumed).provenance == Store.open(whole).provenance

    lines = []
    write_sample(resumed, n_atoms, seed=8, energies=False, log=lines.append)
    assert "nothing to do" in lines[0]
    _assert_same(_arrays(resumed), _arrays(whole))


def test_subset_weights_draw_only_the_subsets_named(tmp_path):
    default = list(sample_structures(2000, seed=3, energies=False))
    same = list(sample_structures(2000, seed=3, energies=False, subsets=None))
    assert [a.info["subset"] for a in same] == [a.info["subset"] for a in default]
    small = list(
        sample_structures(2000, seed=3, energies=False, subsets={"bulk": 3, "molecules": 1})
    )
    counts = {s: sum(a.info["subset"] == s for a in small) for s in SUBSETS}
    assert set(s for s, n in counts.items() if n) == {"bulk", "molecules"}
    assert 2 < counts["bulk"] / counts["molecules"] < 4.5  # 3:1 over about 230 structures
    assert len(small) > 2 * len(default)  # small cells: more structures for the same atoms

    path = tmp_path / "s.zarr"
    assert main(["sample", "--store", str(path), "--atoms", "300", "--seed", "3",
                 "--no-energies", "--subsets", "bulk=3, molecules=1"]) == 0  # fmt: skip
    store = Store.open(path)
    assert set(store.subsets()) == {"bulk", "molecules"}
    source = sample_source(3, 300, energies=False, subsets={"molecules": 1, "bulk": 3})
    assert source == "dfre sample seed=3 atoms=300 subsets=bulk:0.75,molecules:0.25 no-energies"
    assert store.provenance[0]["source"] == source
