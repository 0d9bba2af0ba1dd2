import json
import os

import numpy as np
import pytest
from ase.build import bulk, molecule

from dfre.cli import main
from dfre.errors import DfreError
from dfre.store import SCHEMA_VERSION, Store, StructureBlock


def _block(n: int = 3, **info) -> StructureBlock:
    frames = [bulk("Cu", cubic=True).repeat((1, 1, k + 1)) for k in range(n)]
    return StructureBlock.from_atoms(frames, info)


def test_append_and_read_back(tmp_path):
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=5, chunk_structures=2)
    water = molecule("H2O")
    block = StructureBlock.from_atoms(
        [bulk("Si"), water], {"energy": [-1.0, None], "subset": ["solid", "gas"]}
    )
    store.append(block)
    store.append(_block(2, subset=["x", "y"], extra=[1, 2]))
    store = Store.open(tmp_path / "s.zarr")
    assert store.n_structures == 4 and store.n_atoms == 2 + 3 + 4 + 8
    assert store.counts.tolist() == [2, 3, 4, 8]
    assert store.structure_index().tolist() == [0] * 2 + [1] * 3 + [2] * 4 + [3] * 8
    np.testing.assert_array_equal(store.atoms(1).positions, water.positions)
    np.testing.assert_array_equal(store.positions()[2:5].compute(), water.positions)
    assert store.atoms(1).pbc.tolist() == [False] * 3
    np.testing.assert_array_equal(store.info("energy"), [-1.0, np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(store.info("extra"), [np.nan, np.nan, 1.0, 2.0])
    assert store.subsets().tolist() == ["solid", "gas", "x", "y"]
    assert store.atoms(0).info == {"energy": -1.0, "subset": "solid"}
    assert store.positions().chunks[0][0] == 5


def test_concatenate_blocks():
    a, b = _block(2, energy=[1.0, 2.0]), _block(1, subset=["s"])
    both = StructureBlock.concatenate([a, b])
    assert both.counts.tolist() == [4, 8, 4]
    assert both.info == {"energy": [1.0, 2.0, None], "subset": [None, None, "s"]}
    np.testing.assert_array_equal(both.positions[-4:], b.positions)


def test_mixed_info_types_refused_before_any_write(tmp_path):
    store = Store.create(tmp_path / "s.zarr")
    store.append(_block(1, kind=[1.5]))
    with pytest.raises(DfreError, match="info 'kind' mixes numbers and text"):
        store.append(_block(2, kind=["a", "b"], new=[1, 2]))
    assert store.n_structures == 1
    assert store.info_keys() == ["kind"]
    assert store.structures["numbers"].shape == (4,)


def test_fsspec_url(tmp_path):
    store = Store.create("memory://dfre-test-store/s.zarr")
    store.append(_block(2, energy=[1.0, 2.0]))
    again = Store.open("memory://dfre-test-store/s.zarr")
    assert again.n_atoms == 12
    np.testing.assert_array_equal(again.info("energy"), [1.0, 2.0])


def test_open_errors(tmp_path):
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    with pytest.raises(DfreError, match="is a file, not a Zarr store"):
        Store.open(plain)
    with pytest.raises(DfreError, match="is a file, not a Zarr store"):
        Store.create(plain)
    with pytest.raises(DfreError, match="no dfre store"):
        Store.open(tmp_path / "missing.zarr")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(DfreError, match="not empty"):
        Store.create(tmp_path / "full")
    Store.create(tmp_path / "old.zarr")
    meta = tmp_path / "old.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["dfre_schema_version"] = SCHEMA_VERSION + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(DfreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store.open(tmp_path / "old.zarr")


def test_feature_completeness(sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    arr = store.create_feature("toy/ll", 3, chunk_atoms=100)
    assert store.feature_completeness("toy/ll") == 0.0
    arr[:200] = 1.0
    n_chunks = -(-store.n_atoms // 100)
    assert store.feature_completeness("toy/ll") == pytest.approx(2 / n_chunks)
    done = store.group["features"]["toy"].create_array(
        "_done_ll", shape=(n_chunks,), chunks=(1,), dtype="bool", fill_value=False
    )
    done[:3] = True
    assert store.feature_completeness("toy/ll") == pytest.approx(3 / n_chunks)


def test_summary_and_info_cli(sample_store_copy, capsys):
    store = Store.open(sample_store_copy, mode="r+")
    store.create_feature("toy/ll", 4)[:] = 0.5
    store.write_descriptor("toy-mean", np.zeros((store.n_structures, 4)))
    result = store.create_result("gfre", {"kind": "gfre", "names": ["toy/ll"], "selection": "x"})
    assert result is not None
    summary = store.summary()
    assert summary["n_atoms"] == store.n_atoms
    assert sum(summary["elements"].values()) == store.n_atoms
    numbers = store.numbers()
    assert summary["elements"]["Cu"] == int((numbers == 29).sum())
    assert sum(s["structures"] for s in summary["subsets"].values()) == store.n_structures
    assert sum(s["atoms"] for s in summary["subsets"].values()) == store.n_atoms
    assert summary["features"] == [
        {
            "name": "toy/ll",
            "shape": [store.n_atoms, 4],
            "dtype": "float32",
            "complete": 1.0,
            "masked_rows": 0,
            "problem": None,
        }
    ]
    assert summary["descriptors"] == [
        {"name": "toy-mean", "shape": [store.n_structures, 4], "problem": None}
    ]
    assert summary["results"][0]["kind"] == "gfre"
    assert summary["info"]["energy"]["missing"] == int(np.isnan(store.info("energy")).sum())

    assert main(["info", sample_store_copy, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subsets"] == summary["subsets"]
    assert main(["info", sample_store_copy]) == 0
    out = capsys.readouterr().out
    assert "toy/ll" in out and "100.0% complete" in out and "toy-mean" in out


def test_info_of_a_plain_file(tmp_path, capsys):
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    assert main(["info", str(plain)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfre: error: store path") and err.count("\n") == 1
    assert os.path.getsize(plain) == 1


def test_append_refused_once_features_exist(sample_store_copy, tmp_path, capsys):
    store = Store.open(sample_store_copy, mode="r+")
    store.create_feature("toy/ll", 2)
    n_atoms = store.n_atoms
    with pytest.raises(DfreError, match="already has features or descriptors \\(toy/ll\\)"):
        store.append(_block(1))
    xyz = tmp_path / "more.xyz"
    bulk("Cu").write(xyz)
    assert main(["ingest", str(xyz), "--store", sample_store_copy]) == 2
    assert "add the structures to a new store" in capsys.readouterr().err
    assert Store.open(sample_store_copy).n_atoms == n_atoms


@pytest.mark.parametrize("order", [[0, 26, 13, 26, 5], list(range(27)), [20, 21, 19]])
def test_iter_atoms_matches_the_arrays(sample_store, order):
    store = Store.open(sample_store)
    offsets = store.offsets
    numbers, positions = store.numbers(), store.positions().compute()
    energy, subset = store.info("energy"), store.subsets()
    got = list(store.iter_atoms(order, batch=4))
    assert len(got) == len(order)
    for i, atoms in zip(order, got, strict=True):
        lo, hi = offsets[i], offsets[i + 1]
        assert atoms.numbers.tolist() == numbers[lo:hi].tolist()
        np.testing.assert_array_equal(atoms.positions, positions[lo:hi])
        np.testing.assert_array_equal(atoms.cell[:], store.cells()[i])
        assert atoms.pbc.tolist() == store.pbcs()[i].tolist()
        assert atoms.info["subset"] == subset[i]
        if np.isnan(energy[i]):
            assert "energy" not in atoms.info
        else:
            assert atoms.info["energy"] == energy[i]
    with pytest.raises(IndexError):
        next(store.iter_atoms([store.n_structures]))
