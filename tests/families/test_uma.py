"""UMA (fairchem-core) adapter against fairchem itself, in the ``uma`` environment.

A small randomly initialised UMA of the released architecture (eSCN-MD backbone with
mixture-of-linear-experts, composition embedding, one energy/force/stress head shared
by five datasets) is built with fairchem's own code and saved as the inference
checkpoint that fairchem's ``load_predict_unit`` reads, with the five tasks of
UMA-S-1P1. Run: ``.envs/uma/bin/python -m pytest tests/families/test_uma.py``.
"""

import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule

pytest.importorskip("fairchem.core", reason="runs in the uma environment (make env-uma)")

import torch  # noqa: E402

from dfre.errors import DfreError  # noqa: E402
from dfre.featurize import featurize  # noqa: E402
from dfre.models.base import load_extractor  # noqa: E402
from dfre.store import Store, StructureBlock  # noqa: E402

TASKS = ["omat", "omol", "oc20", "odac", "omc"]
TOL = 1e-5
RMSD = 1.7  # the energy normaliser of every task: E = RMSD * sum_i E_i + element references


def random_uma_checkpoint(path) -> str:
    """A random UMA-S-shaped model, saved as an ``MLIPInferenceCheckpoint``."""
    import hydra
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    backbone = {
        "model": "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone",
        "max_num_elements": 100,
        "sphere_channels": 16,
        "lmax": 2,
        "mmax": 2,
        "otf_graph": True,
        "max_neighbors": 30,
        "cutoff": 6.0,
        "edge_channels": 16,
        "distance_function": "gaussian",
        "num_distance_basis": 32,
        "direct_forces": False,
        "regress_forces": True,
        "regress_stress": True,
        "num_layers": 2,
        "hidden_channels": 12,
        "norm_type": "rms_norm_sh",
        "act_type": "gate",
        "ff_type": "spectral",
        "chg_spin_emb_type": "rand_emb",
        "cs_emb_grad": True,
        "dataset_emb_grad": True,
        "dataset_mapping": {task: task for task in TASKS},
        "use_dataset_embedding": True,
        "num_experts": 4,
        "use_composition_embedding": True,
        "moe_expert_coefficient_norm": "softmax",
        "model_version": 1.1,
        "moe_layer_type": "pytorch",
        "moe_type": "so2",
    }
    heads = {
        "energyandforcehead": {
            "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificSingleHeadWrapper",
            "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
            "dataset_names": TASKS,
            "head_kwargs": {"wrap_property": False},
        }
    }
    model_config = {
        "_target_": "fairchem.core.models.base.HydraModel",
        "backbone": backbone,
        "heads": heads,
        "pass_through_head_outputs": True,
        "otf_graph": True,
    }
    references = torch.linspace(-3.0, 1.0, 100).tolist()

    def task(dataset, prop, level, dim):
        config = {
            "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task",
            "name": f"{dataset}_{prop}",
            "level": level,
            "property": prop,
            "out_spec": {
                "_target_": "fairchem.core.units.mlip_unit.mlip_unit.OutputSpec",
                "dim": dim,
                "dtype": "float32",
            },
            "normalizer": {
                "_target_": "fairchem.core.modules.normalization.normalizer.Normalizer",
                "mean": 0.0,
                "rmsd": RMSD,
            },
            "datasets": [dataset],
        }
        if prop == "energy":
            config["element_references"] = {
                "_target_": "fairchem.core.modules.normalization.element_references."
                "ElementReferences",
                "element_references": {"_target_": "torch.tensor", "data": references},
            }
        return config

    tasks = [
        task(dataset, prop, level, dim)
        for dataset in TASKS
        for prop, level, dim in [("energy", "system", [1]), ("forces", "atom", [3])]
        + [("stress", "system", [1, 9])]
    ]
    torch.manual_seed(0)
    model = hydra.utils.instantiate(model_config)
    ema = torch.optim.swa_utils.AveragedModel(model)
    checkpoint = MLIPInferenceCheckpoint(
        model_config=model_config,
        model_state_dict=model.state_dict(),
        ema_state_dict=ema.state_dict(),
        tasks_config=tasks,
    )
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return random_uma_checkpoint(tmp_path_factory.mktemp("uma") / "uma-random.pt")


def frames() -> list:
    """Bulk, a slab, molecules: periodic and not, several compositions."""
    nacl = bulk("NaCl", "rocksalt", 5.64)
    nacl.rattle(0.05, seed=1)
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    return [bulk("Si", "diamond", 5.43) * (2, 1, 1), molecule("H2O"), nacl, slab, molecule("CH4")]


def fairchem_reference(path: str, task: str, structures: list) -> tuple:
    """bb, ll and energies by hooks on fairchem's own calculator (``predict`` inside),
    one structure at a time, with inference settings other than the adapter's."""
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit

    predictor = load_predict_unit(path, inference_settings="traineval", device="cpu")
    calculator = FAIRChemCalculator(predictor, task_name=task)
    model = predictor.model.module
    last = model.output_heads["energyandforcehead"].head.energy_block[-1]
    seen: dict = {}
    handles = [
        model.backbone.register_forward_hook(
            lambda m, i, out: seen.__setitem__("bb", out["node_embedding"][:, 0, :].detach())
        ),
        last.register_forward_pre_hook(lambda m, i: seen.__setitem__("ll", i[0].detach())),
    ]
    bb, ll, energies = [], [], []
    try:
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calculator
            energies.append(atoms.get_potential_energy())
            bb.append(seen["bb"].numpy())
            ll.append(seen["ll"].numpy())
    finally:
        for handle in handles:
            handle.remove()
    w = last.weight.detach().double().numpy()[0]
    b = float(last.bias.detach())
    return np.concatenate(bb), np.concatenate(ll), np.array(energies), w, b


@pytest.mark.parametrize("task", TASKS)
def test_bb_and_ll_equal_hooks_on_fairchems_predict(checkpoint, task):
    structures = frames()
    extractor = load_extractor("uma", path=checkpoint, task=task, trust_checkpoint=True)
    features = extractor.featurize(structures)  # one batch of all five structures
    bb, ll, energies, w, b = fairchem_reference(checkpoint, task, structures)
    assert features["bb"].shape == (sum(map(len, structures)), 16)
    assert features["ll"].shape == (sum(map(len, structures)), 12)
    assert extractor.layers["bb"].dim == 16 and extractor.layers["ll"].dim == 12
    np.testing.assert_allclose(features["bb"], bb, atol=TOL, rtol=0)
    np.testing.assert_allclose(features["ll"], ll, atol=TOL, rtol=0)
    # the architecture makes E = RMSD * sum_i (w . ll_i + b) + element references
    atomic = features["ll"].astype(np.float64) @ w + b
    references = np.linspace(-3.0, 1.0, 100)
    start = 0
    for atoms, energy in zip(structures, energies, strict=True):
        stop = start + len(atoms)
        expected = RMSD * atomic[start:stop].sum() + references[atoms.numbers].sum()
        assert energy == pytest.approx(expected, abs=1e-4)
        start = stop


def test_every_task_gives_its_own_features(checkpoint):
    structures = frames()[:2]
    bb = {
        task: load_extractor("uma", path=checkpoint, task=task, trust_checkpoint=True).featurize(
            structures, ["bb"]
        )["bb"]
        for task in TASKS
    }
    for first in TASKS:
        for second in TASKS:
            if first < second:
                assert np.abs(bb[first] - bb[second]).max() > 1e-3, (first, second)


def test_unknown_task_lists_the_known_ones(checkpoint):
    with pytest.raises(
        DfreError, match=r"no task 'omat24'; its tasks: oc20, odac, omat, omc, omol"
    ):
        load_extractor("uma", path=checkpoint, task="omat24", trust_checkpoint=True)


def test_checkpoint_needing_unpickling_is_refused_without_trust(checkpoint):
    with pytest.raises(DfreError, match="full Python pickle.*--trust-checkpoint"):
        load_extractor("uma", path=checkpoint, task="omat")


def test_weights_of_another_family_are_a_one_line_error(tmp_path):
    path = tmp_path / "not-uma.pt"
    torch.save({"weight": torch.zeros(3, 3)}, path)  # a plain state dict (e.g. of a MACE)
    with pytest.raises(DfreError, match="not a fairchem inference checkpoint") as error:
        load_extractor("uma", path=str(path), trust_checkpoint=True)
    assert "\n" not in str(error.value)


def test_elements_outside_the_model_are_masked_with_the_reason(checkpoint, tmp_path):
    fermium = Atoms("Fm2", positions=[[0, 0, 0], [0, 0, 2.5]])  # Z = 100: no embedding
    structures = [molecule("H2O"), fermium, molecule("CH4")]
    store = Store.create(tmp_path / "s.zarr", chunk_atoms=8)
    store.append(StructureBlock.from_atoms(structures))
    report = featurize(store.path, "uma", options={"path": checkpoint, "trust_checkpoint": True})
    assert report.masked == {1: "unsupported element(s) Fm"}
    stored = Store.open(store.path)
    bb = stored.features("uma/bb").compute()
    assert np.isnan(bb[3:5]).all() and not np.isnan(bb[:3]).any() and not np.isnan(bb[5:]).any()
    expected = load_extractor("uma", path=checkpoint, trust_checkpoint=True).featurize(
        [structures[0], structures[2]]
    )
    np.testing.assert_allclose(bb[np.r_[0:3, 5:10]], expected["bb"], atol=TOL, rtol=0)


def one_line_error(result) -> str:
    """The one ``dfre: error:`` line of a failed command (exit 2, no traceback; the model
    package may print its own notices on import)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("dfre: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_command_line_featurize_with_a_task(checkpoint, tmp_path):
    import ase.io

    structures = frames()
    ase.io.write(tmp_path / "frames.extxyz", structures)
    store = str(tmp_path / "s.zarr")
    dfre = [sys.executable, "-m", "dfre"]
    subprocess.run([*dfre, "ingest", "--store", store, str(tmp_path / "frames.extxyz")], check=True)
    argv = [*dfre, "featurize", "--store", store, "--model", "uma", "--weights", checkpoint]
    local = ["--workers", "1", "--no-gpu", "--dashboard-address", ":0"]
    refused = subprocess.run([*argv, *local], capture_output=True, text=True)
    assert "--trust-checkpoint" in one_line_error(refused)
    unknown = subprocess.run(
        [*argv, "--trust-checkpoint", "--option", "task=omat24", *local],
        capture_output=True,
        text=True,
    )
    assert "its tasks: oc20, odac, omat, omc, omol" in one_line_error(unknown)
    done = subprocess.run(
        [*argv, "--trust-checkpoint", "--option", "task=omat", *local],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    bb, ll, _, _, _ = fairchem_reference(checkpoint, "omat", structures)
    stored = Store.open(store)
    np.testing.assert_allclose(stored.features("uma/bb").compute(), bb, atol=TOL, rtol=0)
    np.testing.assert_allclose(stored.features("uma/ll").compute(), ll, atol=TOL, rtol=0)
