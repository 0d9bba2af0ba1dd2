"""Orb adapter against orb-models itself, in the ``orb`` environment.

A randomly initialised Orb-v3 conservative model of the released architecture (built
by orb-models' own ``orb_v3_conservative_architecture``, 25.5 M parameters) is saved
as a plain state dict, the format of the released ``.ckpt`` files, and loaded by its
release name. Run: ``.envs/orb/bin/python -m pytest tests/families/test_orb.py``.
"""

import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

pytest.importorskip("orb_models", reason="runs in the orb environment (make env-orb)")

import torch  # noqa: E402

from dfre.errors import DfreError  # noqa: E402
from dfre.featurize import featurize  # noqa: E402
from dfre.models.base import load_extractor  # noqa: E402
from dfre.store import Store, StructureBlock  # noqa: E402

TOL = 1e-5
ARCHITECTURE = "orb-v3-conservative-inf-omat"


def random_orb_weights(path) -> str:
    """A random Orb-v3 conservative model (the release architecture), as a state dict."""
    from orb_models.forcefield.atomic_system import SystemConfig
    from orb_models.forcefield.pretrained import orb_v3_conservative_architecture

    torch.manual_seed(0)
    config = SystemConfig(radius=6.0, max_num_neighbors=120)
    model = orb_v3_conservative_architecture(system_config=config)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return random_orb_weights(tmp_path_factory.mktemp("orb") / "orb-v3-random.ckpt")


def frames() -> list:
    nacl = bulk("NaCl", "rocksalt", 5.64)
    nacl.rattle(0.05, seed=3)
    return [bulk("Si", "diamond", 5.43), molecule("H2O"), nacl, molecule("CH4")]


def orb_reference(path: str, structures: list) -> np.ndarray:
    """Node features by a hook on the graph network inside orb-models' own calculator
    (energy, forces and stress computed as usual), one structure at a time."""
    from orb_models.forcefield.calculator import ORBCalculator
    from orb_models.forcefield.pretrained import ORB_PRETRAINED_MODELS

    model = ORB_PRETRAINED_MODELS[ARCHITECTURE](
        weights_path=path, device="cpu", precision="float32-highest", compile=False
    )
    calculator = ORBCalculator(model, device="cpu")
    seen = []
    handle = model.model.register_forward_hook(
        lambda m, i, out: seen.append(out["node_features"].detach().numpy())
    )
    try:
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calculator
            atoms.get_potential_energy()
    finally:
        handle.remove()
    return np.concatenate(seen)


def test_bb_equals_a_hook_on_orbs_own_calculator(weights):
    structures = frames()
    extractor = load_extractor("orb", path=weights)
    assert list(extractor.layers) == ["bb"] and extractor.layers["bb"].dim == 256
    assert extractor.cutoff == 6.0
    features = extractor.featurize(structures)  # one batch
    np.testing.assert_allclose(features["bb"], orb_reference(weights, structures), atol=TOL, rtol=0)


def test_unknown_architecture_lists_the_known_ones(weights):
    with pytest.raises(DfreError, match="unknown Orb architecture 'orb-v9'; known: orb-v3-"):
        load_extractor("orb", path=weights, architecture="orb-v9")


def test_weights_of_another_release_or_family_are_one_line_errors(weights, tmp_path):
    with pytest.raises(DfreError, match="give --option architecture=NAME") as error:
        load_extractor("orb", path=weights, architecture="orb-v2")  # Orb-v2 shapes differ
    assert "\n" not in str(error.value)
    other = tmp_path / "mace.model"
    torch.save({"readouts.0.linear.weight": torch.zeros(1, 8)}, other)
    with pytest.raises(DfreError, match="of another model family"):
        load_extractor("orb", path=str(other))


def test_structures_the_model_cannot_take_are_masked_with_the_reason(weights, tmp_path):
    """Orb embeds every element (Z = 1..118), so no element is outside its type map; an
    atom without neighbours within the 6 Å graph cutoff is what a real store meets."""
    lone = Atoms("H2", positions=[[0, 0, 0], [0, 0, 7.0]])
    structures = [molecule("H2O"), lone, molecule("CH4")]
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=8)
    store.append(StructureBlock.from_atoms(structures))
    report = featurize(store.path, "orb", options={"path": weights})
    assert report.masked == {1: "2 atom(s) with no neighbour within the 6 Å cutoff"}
    bb = Store.open(store.path).features("orb/bb").compute()
    assert np.isnan(bb[3:5]).all()
    expected = orb_reference(weights, [structures[0], structures[2]])
    np.testing.assert_allclose(bb[np.r_[0:3, 5:10]], expected, atol=TOL, rtol=0)


def one_line_error(result) -> str:
    """The one ``dfre: error:`` line of a failed command (exit 2, no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("dfre: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_command_line_featurize(weights, tmp_path):
    import ase.io

    structures = frames()
    ase.io.write(tmp_path / "frames.extxyz", structures)
    store = str(tmp_path / "s.zarr")
    dfre = [sys.executable, "-m", "dfre"]
    subprocess.run([*dfre, "ingest", "--store", store, str(tmp_path / "frames.extxyz")], check=True)
    argv = [*dfre, "featurize", "--store", store, "--model", "orb", "--weights", weights]
    local = ["--workers", "1", "--no-gpu", "--dashboard-address", ":0"]
    wrong = subprocess.run([*argv, "--layers", "ll", *local], capture_output=True, text=True)
    assert "has no layer ll; it offers: bb" in one_line_error(wrong)
    done = subprocess.run(
        [*argv, "--option", f"architecture={ARCHITECTURE}", *local], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    stored = Store.open(store).features("orb/bb").compute()
    np.testing.assert_allclose(stored, orb_reference(weights, structures), atol=TOL, rtol=0)


def test_a_slab_periodic_along_two_axes_gets_the_same_graph_as_a_padded_cell(weights):
    from ase.build import fcc111

    slab = fcc111("Cu", (2, 2, 3), vacuum=8.0)  # pbc (True, True, False), which Orb refuses
    assert list(slab.pbc) == [True, True, False]
    padded = slab.copy()
    padded.pbc = True  # 16 Å of vacuum between images: more than the 6 Å cutoff
    features = load_extractor("orb", path=weights).featurize([slab])
    np.testing.assert_allclose(features["bb"], orb_reference(weights, [padded]), atol=TOL, rtol=0)
