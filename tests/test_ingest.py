import json
import os
import signal
import subprocess
import sys
import time
from numbers import Number

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from dfre.cli import main
from dfre.data.ingest import ingest
from dfre.errors import DfreError
from dfre.store import Store


def _structures() -> list[Atoms]:
    """Periodic, slab (mixed pbc) and molecular structures with scalar and array info."""
    rng = np.random.default_rng(0)
    cu = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    cu.rattle(0.05, seed=1)
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    nacl.cell[0, 1] = 0.3  # triclinic
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    del slab.info["adsorbate_info"]
    water = molecule("H2O")
    water.center(vacuum=4.0)
    water.pbc = False
    benzene = molecule("C6H6")
    frames = [cu, nacl, slab, water, benzene]
    for i, atoms in enumerate(frames):
        atoms.info.update(
            {
                "config_type": "solid" if atoms.pbc.any() else "molecule",
                "temperature": 300.0 + i,
                "index": i,
                "tag": f"t{i}",
                "stress_like": np.ones(3),  # not scalar: not stored
            }
        )
        if i % 2 == 0:
            atoms.info["REF_energy"] = -3.0 - i  # kept as it is, beside the energy
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3))
        )
    return frames


def store_content(path) -> dict:
    """Everything a reader of the store can see (committed rows only)."""
    store = Store.open(path)
    n_s, n_a = store.n_structures, store.n_atoms
    s = store.structures
    content = {
        "attrs": {k: store.group.attrs[k] for k in ("n_structures", "n_atoms", "provenance")},
        "info_keys": store.info_keys(),
        "numbers": s["numbers"][:n_a].tolist(),
        "positions": s["positions"][:n_a].tolist(),
        "offsets": s["offsets"][: n_s + 1].tolist(),
        "cell": s["cell"][:n_s].tolist(),
        "pbc": s["pbc"][:n_s].tolist(),
    }
    for key in store.info_keys():
        values = np.asarray(store.info(key)).astype(object)
        content[f"info/{key}"] = [None if v != v else v for v in values.tolist()]
    return content


def _assert_same_structures(store: Store, frames: list[Atoms], first: int = 0) -> None:
    for i, ref in enumerate(frames):
        got = store.atoms(first + i)
        assert got.numbers.tolist() == ref.numbers.tolist()
        np.testing.assert_array_equal(got.positions, ref.positions)
        np.testing.assert_array_equal(got.cell[:], ref.cell[:])
        assert got.pbc.tolist() == ref.pbc.tolist()
        ref_energy = ref.calc.results.get("energy") if ref.calc is not None else None
        if ref_energy is not None:
            assert got.info["energy"] == ref_energy
        for key, value in ref.info.items():
            if isinstance(value, str):
                assert got.info[key] == value
            elif isinstance(value, Number) and key not in ("source", "frame"):
                assert got.info[key] == float(value)
            else:
                assert key not in got.info


@pytest.mark.parametrize("fmt, suffix", [("extxyz", ".xyz"), ("db", ".db")])
def test_round_trip_multi_frame_formats(tmp_path, fmt, suffix):
    frames = _structures()
    path = tmp_path / f"mixed{suffix}"
    if fmt == "db":
        with ase.db.connect(path) as db:
            for atoms in frames:
                scalars = {k: v for k, v in atoms.info.items() if isinstance(v, int | float | str)}
                db.write(atoms, key_value_pairs=scalars)
    else:
        ase.io.write(path, frames, format=fmt)
    reports = ingest([path], tmp_path / "s.zarr")
    assert reports[0].status == "ingested" and reports[0].frames == 5

    store = Store.open(tmp_path / "s.zarr")
    assert store.n_structures == 5
    assert store.n_atoms == sum(len(a) for a in frames)
    reference = list(ase.io.iread(path)) if fmt == "extxyz" else frames
    _assert_same_structures(store, reference)
    # extxyz keeps 8 decimals of the original positions
    for i, atoms in enumerate(frames):
        np.testing.assert_allclose(store.atoms(i).positions, atoms.positions, atol=1e-7)
        assert store.atoms(i).info["energy"] == pytest.approx(atoms.calc.results["energy"])
    assert store.subsets().tolist() == ["solid", "solid", "solid", "molecule", "molecule"]
    assert store.info("source").tolist() == [str(path)] * 5
    assert store.info("frame").tolist() == [0, 1, 2, 3, 4]
    assert "stress_like" not in store.info_keys()
    np.testing.assert_array_equal(store.info("REF_energy"), [-3.0, np.nan, -5.0, np.nan, -7.0])
    record = store.provenance[0]
    assert record["complete"] and record["frames_done"] == 5 and record["format"] == fmt
    assert record["size"] == os.path.getsize(path) and len(record["sha256"]) == 64


@pytest.mark.parametrize("fmt, name", [("cif", "nacl.cif"), ("vasp", "POSCAR")])
def test_round_trip_single_structure_formats(tmp_path, fmt, name):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.01, seed=2)
    path = tmp_path / name
    ase.io.write(path, atoms, format=fmt)
    ingest([path], tmp_path / "s.zarr")  # format guessed from the file
    store = Store.open(tmp_path / "s.zarr")
    reference = ase.io.read(path, format=fmt)
    got = store.atoms(0)
    assert got.get_chemical_formula() == reference.get_chemical_formula() == "Cl4Na4"
    np.testing.assert_array_equal(got.positions, reference.positions)
    np.testing.assert_array_equal(got.cell[:], reference.cell[:])
    assert got.pbc.all()
    np.testing.assert_allclose(got.cell.lengths(), [5.64] * 3)
    assert store.subsets().tolist() == [path.stem]  # no subset key: the file's stem


def test_append_two_files_and_skip_repeats(tmp_path, capsys):
    frames = _structures()
    first, second = tmp_path / "a.xyz", tmp_path / "b.xyz"
    ase.io.write(first, frames[:3])
    ase.io.write(second, frames[3:])
    store_path = tmp_path / "s.zarr"
    assert main(["ingest", str(first), "--store", str(store_path)]) == 0
    assert main(["ingest", str(second), "--store", str(store_path), "--subset-key", "tag"]) == 0
    store = Store.open(store_path)
    assert store.n_structures == 5
    counts = [len(a) for a in frames]
    assert store.offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert store.info("frame").tolist() == [0, 1, 2, 0, 1]
    assert store.info("source").tolist() == [str(first)] * 3 + [str(second)] * 2
    assert store.subsets().tolist() == ["solid", "solid", "solid", "t3", "t4"]
    _assert_same_structures(store, list(ase.io.iread(first)) + list(ase.io.iread(second)))

    before = store_content(store_path)
    capsys.readouterr()
    assert main(["ingest", str(first), str(second), "--store", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already ingested completely") == 2
    assert store_content(store_path) == before


def test_small_batches_give_the_same_store(tmp_path):
    frames = _structures() * 4
    path = tmp_path / "many.xyz"
    ase.io.write(path, frames)
    ingest([path], tmp_path / "one.zarr")
    ingest([path], tmp_path / "many.zarr", chunk_atoms=7)
    one, many = store_content(tmp_path / "one.zarr"), store_content(tmp_path / "many.zarr")
    for content in (one, many):
        content["attrs"]["provenance"][0].pop("mtime")
    assert one == many
    assert Store.open(tmp_path / "many.zarr").structures["numbers"].chunks == (7,)


# ---------------------------------------------------------------------- bad input
def _write_text(path, text: str) -> str:
    path.write_text(text)
    return str(path)


XYZ_HEADER = 'Lattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3 pbc="T T T"'
GOOD_FRAME = f"2\n{XYZ_HEADER}\nCu 0 0 0\nCu 2 2 0\n"


@pytest.fixture
def base_store(tmp_path):
    """A store holding one good file, to check that bad input leaves it unchanged."""
    good = _write_text(tmp_path / "good.xyz", GOOD_FRAME * 3)
    path = str(tmp_path / "s.zarr")
    ingest([good], path)
    return path


@pytest.mark.parametrize(
    "name, text, extra, message",
    [
        (
            "malformed.xyz",
            GOOD_FRAME * 4 + f"2\n{XYZ_HEADER}\nCu 0 0 0\nCu 2 x 0\n",
            [],
            "cannot read {path} frame 4 as extxyz",
        ),
        ("truncated.xyz", GOOD_FRAME + f"3\n{XYZ_HEADER}\nCu 0 0 0\n", [], "frame 1"),
        ("empty.xyz", "", [], "{path} is empty"),
        ("notes.txt", "just some words\n", [], "cannot read {path}"),
        ("good2.xyz", GOOD_FRAME, ["--format", "nosuchformat"], "unknown format 'nosuchformat'"),
        (
            "zero.xyz",
            GOOD_FRAME * 2 + f"0\n{XYZ_HEADER}\n",
            [],
            "{path} frame 2 has no atoms",
        ),
        (
            "nan.xyz",
            GOOD_FRAME * 5 + f"2\n{XYZ_HEADER}\nCu 0 0 0\nCu nan 2 0\n",
            [],
            "{path} frame 5 has NaN or inf positions",
        ),
        (
            "infcell.xyz",
            GOOD_FRAME + GOOD_FRAME.replace('Lattice="4 0', 'Lattice="inf 0'),
            [],
            "{path} frame 1 has a NaN or inf cell",
        ),
        (
            "mixed_types.xyz",
            GOOD_FRAME.replace('pbc="T T T"', 'pbc="T T T" kind=1.5')
            + GOOD_FRAME.replace('pbc="T T T"', 'pbc="T T T" kind=abc'),
            [],
            "info 'kind' mixes numbers and text",
        ),
        ("missing.xyz", None, [], "{path} does not exist"),
        ("garbage.xyz", "\x00\x01\x02 binary junk\n", [], "cannot read {path} frame 0"),
        (
            "unknown_element.xyz",
            GOOD_FRAME.replace("Cu 2 2 0", "Qq 2 2 0"),
            [],
            "{path} frame 0 as extxyz: unknown element symbol or key 'Qq'",
        ),
    ],
)
def test_bad_input_leaves_the_store_unchanged(
    tmp_path, base_store, capsys, name, text, extra, message
):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    before = store_content(base_store)
    capsys.readouterr()
    # a small batch size commits the good frames before the bad one is met
    code = main(["ingest", str(path), "--store", base_store, "--chunk-atoms", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dfre: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert message.format(path=path) in err
    assert store_content(base_store) == before


def test_bad_input_into_a_new_store_leaves_nothing(tmp_path, capsys):
    bad = _write_text(tmp_path / "bad.xyz", GOOD_FRAME * 3 + "2\nbroken\n")
    store_path = tmp_path / "new.zarr"
    assert main(["ingest", bad, "--store", str(store_path), "--chunk-atoms", "2"]) == 2
    assert "frame 3" in capsys.readouterr().err
    assert not store_path.exists()


def test_directory_as_input_file(tmp_path, capsys):
    (tmp_path / "folder.xyz").mkdir()
    assert main(["ingest", str(tmp_path / "folder.xyz"), "--store", str(tmp_path / "s")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_store_path_that_is_a_file(tmp_path, capsys):
    good = _write_text(tmp_path / "good.xyz", GOOD_FRAME)
    plain = tmp_path / "plain.txt"
    plain.write_text("not a store")
    assert main(["ingest", good, "--store", str(plain)]) == 2
    err = capsys.readouterr().err
    assert f"store path {plain} is a file" in err and err.count("\n") == 1
    assert plain.read_text() == "not a store"


def test_store_of_another_schema_version(tmp_path, base_store, capsys):
    meta = os.path.join(base_store, "zarr.json")
    with open(meta) as handle:
        doc = json.load(handle)
    doc["attributes"]["dfre_schema_version"] = 99
    with open(meta, "w") as handle:
        json.dump(doc, handle)
    before = open(meta).read()
    good = _write_text(tmp_path / "more.xyz", GOOD_FRAME)
    assert main(["ingest", good, "--store", base_store]) == 2
    err = capsys.readouterr().err
    assert "schema version 99" in err and "re-ingest" in err
    assert open(meta).read() == before
    assert main(["info", base_store]) == 2


def test_changed_file_after_interruption_is_refused(tmp_path, capsys):
    path = tmp_path / "f.xyz"
    path.write_text(GOOD_FRAME * 3)
    store_path = str(tmp_path / "s.zarr")
    ingest([path], store_path)
    path.write_text(GOOD_FRAME * 4)
    before = store_content(store_path)
    assert main(["ingest", str(path), "--store", store_path]) == 2
    assert "changed since its complete ingest" in capsys.readouterr().err
    assert store_content(store_path) == before


def _committed_structures(store_path) -> int:
    try:
        with open(os.path.join(store_path, "zarr.json")) as handle:
            return int(json.load(handle)["attributes"]["n_structures"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_ingest_resumes_without_duplicates(tmp_path):
    frames = [
        bulk("Cu", "fcc", a=3.6 + 0.001 * i, cubic=True)  # 4 atoms, one commit each
        for i in range(600)
    ]
    for i, atoms in enumerate(frames):
        atoms.info["step"] = i
    path = tmp_path / "traj.xyz"
    ase.io.write(path, frames)
    reference, killed = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    ingest([path], reference)

    command = [sys.executable, "-m", "dfre", "ingest", str(path), "--store", str(killed)]
    process = subprocess.Popen([*command, "--chunk-atoms", "4"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed_structures(killed) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()

    store = Store.open(killed)
    assert 3 <= store.n_structures < 600
    assert store.provenance[0]["complete"] is False
    assert store.provenance[0]["frames_done"] == store.n_structures

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    got, want = store_content(killed), store_content(reference)
    for content in (got, want):
        content["attrs"]["provenance"][0].pop("mtime")
    assert got == want
    assert Store.open(killed).info("step").tolist() == list(range(600))


def test_ingest_refuses_nothing_to_do():
    with pytest.raises(DfreError, match="no input files"):
        ingest([], "unused.zarr")


def test_ingest_and_sample_into_an_existing_empty_folder(tmp_path, capsys):
    good = _write_text(tmp_path / "good.xyz", GOOD_FRAME * 2)
    for command in (["ingest", good], ["sample", "--atoms", "50"]):
        folder = tmp_path / f"{command[0]}.zarr"
        folder.mkdir()  # the write lock goes in there before the store is created
        assert main([*command, "--store", str(folder)]) == 0, capsys.readouterr().err
        assert Store.open(folder).n_structures >= 1
        assert not (folder / ".dfre.lock").exists()


def test_bad_input_into_an_existing_empty_folder_keeps_the_folder(tmp_path, capsys):
    bad = _write_text(tmp_path / "bad.xyz", GOOD_FRAME * 3 + "2\nbroken\n")
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    assert main(["ingest", bad, "--store", str(folder), "--chunk-atoms", "2"]) == 2
    assert "frame 3" in capsys.readouterr().err
    assert folder.is_dir() and os.listdir(folder) == []


def test_many_small_files_share_batches(tmp_path):
    paths = []
    for i in range(30):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.01 * i)
        paths.append(tmp_path / f"POSCAR_{i:02d}")
        ase.io.write(paths[-1], atoms, format="vasp")
    store_path = tmp_path / "s.zarr"
    reports = ingest(paths, store_path, format="vasp", chunk_atoms=10)
    assert [r.status for r in reports] == ["ingested"] * 30
    store = Store.open(store_path)
    assert store.n_structures == 30
    assert [r["source"] for r in store.provenance] == [str(p) for p in paths]
    assert all(r["complete"] and r["frames_done"] == 1 for r in store.provenance)
    np.testing.assert_allclose(store.cells()[:, 0, 1], [(3.6 + 0.01 * i) / 2 for i in range(30)])
    assert store.subsets().tolist() == [p.stem for p in paths]


def test_failure_in_a_later_file_rolls_back_the_earlier_ones(tmp_path, base_store, capsys):
    first = _write_text(tmp_path / "first.xyz", GOOD_FRAME * 5)
    second = _write_text(tmp_path / "second.xyz", GOOD_FRAME + "2\nbroken\n")
    before = store_content(base_store)
    code = main(["ingest", first, second, "--store", base_store, "--chunk-atoms", "2"])
    assert code == 2
    assert f"{second} frame 1" in capsys.readouterr().err
    assert store_content(base_store) == before
