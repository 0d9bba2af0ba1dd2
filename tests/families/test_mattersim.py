"""MatterSim adapter against mattersim itself, in the ``mattersim`` environment.

A randomly initialised M3GNet of MatterSim's default architecture is built with
mattersim's own ``M3Gnet`` and saved by ``Potential.save``, the format of the released
``mattersim-v1.0.0-*.pth`` files. Run:
``.envs/mattersim/bin/python -m pytest tests/families/test_mattersim.py``.
"""

import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

pytest.importorskip("mattersim", reason="runs in the mattersim environment")

import torch  # noqa: E402

from dfre.errors import DfreError  # noqa: E402
from dfre.featurize import featurize  # noqa: E402
from dfre.models.base import load_extractor  # noqa: E402
from dfre.store import Store, StructureBlock  # noqa: E402

TOL = 1e-5


def random_mattersim_checkpoint(path) -> str:
    """A random M3GNet of MatterSim's default architecture, saved by ``Potential.save``."""
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
    from mattersim.forcefield.potential import Potential

    torch.manual_seed(0)
    Potential(M3Gnet(device="cpu"), device="cpu").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return random_mattersim_checkpoint(tmp_path_factory.mktemp("mattersim") / "ms-random.pth")


def frames() -> list:
    nacl = bulk("NaCl", "rocksalt", 5.64)
    nacl.rattle(0.05, seed=4)
    return [bulk("Si", "diamond", 5.43), molecule("H2O"), nacl, molecule("CH3CH2OH")]


def mattersim_reference(path: str, structures: list) -> np.ndarray:
    """bb by a pre-hook on the readout inside MatterSim's own ASE calculator (energy,
    forces and stress computed as usual), one structure at a time."""
    from mattersim.forcefield.potential import MatterSimCalculator

    calculator = MatterSimCalculator.from_checkpoint(path, device="cpu")
    seen = []
    handle = calculator.potential.model.final.register_forward_pre_hook(
        lambda m, inputs: seen.append(inputs[0].detach().numpy())
    )
    try:
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calculator
            atoms.get_potential_energy()
    finally:
        handle.remove()
    return np.concatenate(seen)


def test_bb_equals_a_hook_on_mattersims_own_calculator(checkpoint):
    structures = frames()
    extractor = load_extractor("mattersim", path=checkpoint)
    assert list(extractor.layers) == ["bb"] and extractor.layers["bb"].dim == 128
    assert extractor.cutoff == 5.0
    features = extractor.featurize(structures)  # one batch
    expected = mattersim_reference(checkpoint, structures)
    np.testing.assert_allclose(features["bb"], expected, atol=TOL, rtol=0)


def test_weights_of_another_family_are_a_one_line_error(tmp_path):
    path = tmp_path / "orb.ckpt"
    torch.save({"model.atom_emb.embeddings.weight": torch.zeros(119, 8)}, path)
    with pytest.raises(DfreError, match="not a MatterSim checkpoint") as error:
        load_extractor("mattersim", path=str(path))
    assert "\n" not in str(error.value)


def test_elements_outside_the_model_are_masked_with_the_reason(checkpoint, tmp_path):
    americium = Atoms("Am2", positions=[[0, 0, 0], [0, 0, 2.8]])  # Z = 95 > max_z = 94
    structures = [molecule("H2O"), americium, bulk("Si", "diamond", 5.43)]
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=8)
    store.append(StructureBlock.from_atoms(structures))
    report = featurize(store.path, "mattersim", options={"path": checkpoint})
    assert report.masked == {1: "unsupported element(s) Am"}
    bb = Store.open(store.path).features("mattersim/bb").compute()
    assert np.isnan(bb[3:5]).all()
    expected = mattersim_reference(checkpoint, [structures[0], structures[2]])
    np.testing.assert_allclose(bb[np.r_[0:3, 5:7]], expected, atol=TOL, rtol=0)


def test_command_line_featurize(checkpoint, tmp_path):
    import ase.io

    structures = frames()
    ase.io.write(tmp_path / "frames.extxyz", structures)
    store = str(tmp_path / "s.zarr")
    dfre = [sys.executable, "-m", "dfre"]
    subprocess.run([*dfre, "ingest", "--store", store, str(tmp_path / "frames.extxyz")], check=True)
    argv = [*dfre, "featurize", "--store", store, "--model", "mattersim", "--weights", checkpoint]
    local = ["--workers", "1", "--no-gpu", "--dashboard-address", ":0"]
    done = subprocess.run([*argv, *local], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stored = Store.open(store).features("mattersim/bb").compute()
    np.testing.assert_allclose(
        stored, mattersim_reference(checkpoint, structures), atol=TOL, rtol=0
    )


def test_a_slab_periodic_along_two_axes_gets_the_same_graph_as_a_padded_cell(checkpoint):
    from ase.build import fcc111

    slab = fcc111("Cu", (2, 2, 3), vacuum=8.0)
    slab.cell[2] = 0.0  # a slab given without a third cell vector
    slab.pbc = [True, True, False]
    padded = fcc111("Cu", (2, 2, 3), vacuum=8.0)
    padded.pbc = True  # 16 Å of vacuum between images: more than the 5 Å cutoff
    features = load_extractor("mattersim", path=checkpoint).featurize([slab])
    expected = mattersim_reference(checkpoint, [padded])
    np.testing.assert_allclose(features["bb"], expected, atol=TOL, rtol=0)
