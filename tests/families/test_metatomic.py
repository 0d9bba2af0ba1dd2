"""metatomic adapter (PET-MAD, PET-MAD-DOS, UPET) against metatrain and metatomic itself,
in the ``metatomic`` environment (upet, metatrain, metatomic-torch, metatomic-ase).

Small randomly initialised PET models of the released architecture are built with
metatrain's own code, one with an energy head (as PET-MAD and UPET) and one with a
density-of-states head (as PET-MAD-DOS), and exported to metatomic ``.pt`` files.
Run: ``.envs/metatomic/bin/python -m pytest tests/families/test_metatomic.py``.
"""

import copy
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

pytest.importorskip("metatrain.pet", reason="runs in the metatomic environment")

import torch  # noqa: E402

from dfre.errors import DfreError  # noqa: E402
from dfre.featurize import featurize  # noqa: E402
from dfre.models.base import load_extractor  # noqa: E402
from dfre.store import Store, StructureBlock  # noqa: E402

TOL = 1e-5
TYPES = [1, 6, 8, 11, 14, 17]
N_DOS = 20


def random_pet(targets: dict, types=TYPES):
    """A small random PET (metatrain's default hypers, narrower) for ``targets``."""
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo

    hypers = copy.deepcopy(get_default_hypers("pet")["model"])
    hypers.update(d_pet=16, d_head=8, d_node=16, d_feedforward=16, num_heads=2)
    hypers.update(num_attention_layers=1, num_gnn_layers=2, cutoff=4.5)
    info = DatasetInfo(length_unit="Angstrom", atomic_types=list(types), targets=targets)
    return PET(hypers, info).eval()


def energy_pet(types=TYPES):
    from metatrain.utils.data.target_info import get_energy_target_info
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    energy = get_energy_target_info(
        "energy", OmegaConf.create({"quantity": "energy", "unit": "eV"})
    )
    model = random_pet({"energy": energy}, types)
    with torch.no_grad():  # zero edge biases: then E_i = w . ll_i + b exactly
        for layer in model.backend.edge_last_layers["energy"]:
            for linear in layer.values():
                linear.bias.zero_()
    return model


def random_pet_export(path, types=TYPES) -> str:
    """A random PET with an energy head for atomic ``types``, exported to ``path``."""
    energy_pet(types).export().save(str(path))
    return str(path)


def dos_pet():
    from metatrain.utils.data.target_info import get_generic_target_info
    from omegaconf import OmegaConf

    torch.manual_seed(1)
    config = {"quantity": "", "unit": "", "type": "scalar", "num_subtargets": N_DOS}
    config.update(sample_kind="system", description="density of states")
    return random_pet({"mtt::dos": get_generic_target_info("mtt::dos", OmegaConf.create(config))})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (unexported metatrain module, path of its metatomic export)."""
    folder = tmp_path_factory.mktemp("pet")
    out = {}
    for name, model in (("pet-energy", energy_pet()), ("pet-dos", dos_pet())):
        path = str(folder / f"{name}.pt")
        model.export().save(path)
        out[name] = (model, path)
    return out


def frames() -> list:
    nacl = bulk("NaCl", "rocksalt", 5.64) * (2, 1, 1)
    nacl.rattle(0.05, seed=2)
    return [molecule("H2O"), bulk("Si", "diamond", 5.43), nacl, molecule("CH3CH2OH")]


def module_outputs(model, structures, names) -> dict:
    """Per-atom outputs of the unexported module, one structure at a time."""
    from metatomic.torch import ModelOutput, systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    rows = {name: [] for name in names}
    for atoms in structures:
        system = systems_to_torch(atoms, dtype=torch.float32)
        system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
        with torch.no_grad():
            out = model([system], {n: ModelOutput(sample_kind="atom") for n in names})
        for name in names:
            rows[name].append(out[name].block().values.numpy())
    return {name: np.concatenate(values) for name, values in rows.items()}


def test_energy_model_bb_ll_equal_the_unexported_module(models):
    model, path = models["pet-energy"]
    structures = frames()
    extractor = load_extractor("metatomic", path=path)
    features = extractor.featurize(structures)  # one batch
    expected = module_outputs(
        model, structures, ["feature", "mtt::aux::energy_last_layer_features"]
    )
    np.testing.assert_allclose(features["bb"], expected["feature"], atol=TOL, rtol=0)
    np.testing.assert_allclose(
        features["ll"], expected["mtt::aux::energy_last_layer_features"], atol=TOL, rtol=0
    )
    assert features["ll"].shape[1] == 2 * 8  # (node, edge) x d_head, one readout layer


def test_energy_is_w_dot_ll_plus_b_by_metatomics_own_calculator(models):
    from metatomic_ase import MetatomicCalculator

    model, path = models["pet-energy"]
    structures = frames()
    ll = load_extractor("metatomic", path=path).featurize(structures, ["ll"])["ll"]
    backend = model.backend
    weights, bias = [], 0.0
    for node, edge in zip(
        backend.node_last_layers["energy"], backend.edge_last_layers["energy"], strict=True
    ):
        (node,) = node.values()  # one block: the scalar energy
        (edge,) = edge.values()
        weights += [node.weight[0], edge.weight[0]]
        bias += float(node.bias[0] + edge.bias[0])
    w = torch.cat(weights).detach().double().numpy()
    calculator = MetatomicCalculator(path, device="cpu")
    energies = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator
        energies.append(atoms.get_potential_energies())
    np.testing.assert_allclose(np.concatenate(energies), ll @ w + bias, atol=1e-4, rtol=0)


def test_neighbour_lists_are_the_models_own_not_its_interaction_range(models):
    _, path = models["pet-energy"]
    extractor = load_extractor("metatomic", path=path)
    model = extractor.calculator.model()
    assert model.capabilities().interaction_range == pytest.approx(9.0)
    assert extractor.cutoff == pytest.approx(4.5)
    assert [o.cutoff for o in model.requested_neighbor_lists()] == [pytest.approx(4.5)]
    # the feature output is asked for by its current name
    assert extractor.outputs == {
        "bb": "feature",
        "ll": "mtt::aux::energy_last_layer_features",
    }


def test_dos_model_through_the_same_adapter(models):
    model, path = models["pet-dos"]
    structures = frames()
    extractor = load_extractor("metatomic", path=path)
    assert extractor.target == "dos"
    features = extractor.featurize(structures)
    expected = module_outputs(model, structures, ["feature", "mtt::aux::dos_last_layer_features"])
    np.testing.assert_allclose(features["bb"], expected["feature"], atol=TOL, rtol=0)
    np.testing.assert_allclose(
        features["ll"], expected["mtt::aux::dos_last_layer_features"], atol=TOL, rtol=0
    )
    same = load_extractor("metatomic", path=path, target="mtt::dos").featurize(structures[:1])
    np.testing.assert_allclose(same["ll"], features["ll"][:3], atol=TOL, rtol=0)


def test_unknown_target_lists_the_known_ones(models):
    with pytest.raises(
        DfreError, match="no last-layer features of target 'energy'; its targets: dos"
    ):
        load_extractor("metatomic", path=models["pet-dos"][1], target="energy")


def test_weights_of_another_family_are_a_one_line_error(tmp_path):
    path = tmp_path / "uma.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, path)  # not TorchScript
    with pytest.raises(DfreError, match="not an exported metatomic model") as error:
        load_extractor("metatomic", path=str(path))
    assert "\n" not in str(error.value)


def test_elements_outside_the_type_map_are_masked_with_the_reason(models, tmp_path):
    _, path = models["pet-energy"]
    copper = bulk("Cu", "fcc", 3.6)  # Cu is not in the model's atomic types
    structures = [molecule("H2O"), copper, bulk("Si", "diamond", 5.43)]
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=8)
    store.append(StructureBlock.from_atoms(structures))
    report = featurize(store.path, "metatomic", options={"path": path})
    assert report.masked == {1: "unsupported element(s) Cu"}
    ll = Store.open(store.path).features("metatomic/ll").compute()
    assert np.isnan(ll[3]).all()
    expected = load_extractor("metatomic", path=path).featurize([structures[0], structures[2]])
    np.testing.assert_allclose(ll[np.r_[0:3, 4:6]], expected["ll"], atol=TOL, rtol=0)


def one_line_error(result) -> str:
    """The one ``dfre: error:`` line of a failed command (exit 2, no traceback; the model
    package may print its own notices on import)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("dfre: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_command_line_featurize(models, tmp_path):
    import ase.io

    model, path = models["pet-dos"]
    structures = frames()
    ase.io.write(tmp_path / "frames.extxyz", structures)
    store = str(tmp_path / "s.zarr")
    dfre = [sys.executable, "-m", "dfre"]
    subprocess.run([*dfre, "ingest", "--store", store, str(tmp_path / "frames.extxyz")], check=True)
    argv = [*dfre, "featurize", "--store", store, "--model", "metatomic", "--weights", path]
    local = ["--workers", "1", "--no-gpu", "--dashboard-address", ":0"]
    unknown = subprocess.run(
        [*argv, "--option", "target=energy", *local], capture_output=True, text=True
    )
    assert "its targets: dos" in one_line_error(unknown)
    done = subprocess.run([*argv, "--option", "target=dos", *local], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = module_outputs(model, structures, ["feature", "mtt::aux::dos_last_layer_features"])
    stored = Store.open(store)
    np.testing.assert_allclose(
        stored.features("metatomic/bb").compute(), expected["feature"], atol=TOL, rtol=0
    )
    np.testing.assert_allclose(
        stored.features("metatomic/ll").compute(),
        expected["mtt::aux::dos_last_layer_features"],
        atol=TOL,
        rtol=0,
    )


def test_isolated_atom_molecule_is_masked_not_a_crash(models):
    _, path = models["pet-energy"]
    extractor = load_extractor("metatomic", path=path)
    apart = Atoms("H2", positions=[[0, 0, 0], [0, 0, 6.0]])  # beyond the 4.5 Å graph cutoff
    assert "no neighbour within the 4.5 Å cutoff" in extractor.unsupported_reason(apart)
