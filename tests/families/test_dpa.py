"""The DPA adapter against deepmd-kit itself, in the DPA environment (``make env-dpa``).

A small randomly initialised multi-task DPA-3 model is built with deepmd-kit's own
code (shared descriptor and type map, one fitting net per head, named like the heads
of DPA-3.1-3M-FT), saved as a training checkpoint ``.pt`` and frozen per head to
``.pth`` with deepmd-kit's ``freeze``. The adapter's features are compared with an
independent capture: forward hooks on the descriptor and on the last layer of the
fitting net of the head's PyTorch module, run through its own forward pass.
"""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

pytest.importorskip("deepmd", reason="run in the DPA environment: make test-families")

import torch  # noqa: E402
from random_models import build_dpa3  # noqa: E402

from dfre.cli import main  # noqa: E402
from dfre.errors import DfreError  # noqa: E402
from dfre.featurize import featurize  # noqa: E402
from dfre.models.base import load_extractor  # noqa: E402
from dfre.store import Store, StructureBlock  # noqa: E402

TOL = 1e-5
HEADS = ["OMat24", "MPtrj", "OC20", "ODAC", "SPICE"]
TYPE_MAP = ["H", "C", "O", "Si"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The heads' PyTorch modules, the multi-task checkpoint and two frozen heads."""
    folder = tmp_path_factory.mktemp("dpa")
    return build_dpa3(folder, HEADS, TYPE_MAP, freeze_heads=("MPtrj", "SPICE"))


def frames():
    si = bulk("Si", "diamond", 5.43).repeat((2, 1, 1))
    si.rattle(0.05, seed=1)
    sic = bulk("SiC", "zincblende", 4.36)
    sic.rattle(0.05, seed=2)
    return [molecule("H2O"), si, molecule("CH3CH2OH"), sic]


def reference(module, atoms) -> dict:
    """bb, ll and atomic energies from the head's own forward pass, read with hooks on
    its descriptor and on the last layer of its fitting net (nothing from dfre)."""
    captured = {}
    descriptor = module.atomic_model.descriptor
    last = module.atomic_model.fitting_net.filter_layers.networks[0].layers[-1]
    hooks = [
        descriptor.register_forward_hook(
            lambda m, i, out: captured.__setitem__("bb", out[0].detach().clone())
        ),
        last.register_forward_pre_hook(
            lambda m, inputs: captured.__setitem__("ll", inputs[0].detach().clone())
        ),
    ]
    index = {s: i for i, s in enumerate(TYPE_MAP)}
    coord = torch.tensor(atoms.positions[None], dtype=torch.float64)
    atype = torch.tensor([[index[s] for s in atoms.get_chemical_symbols()]])
    box = torch.tensor(atoms.cell[:][None], dtype=torch.float64) if atoms.pbc.any() else None
    try:
        out = module(coord, atype, box=box)
    finally:
        for hook in hooks:
            hook.remove()
    n = len(atoms)
    return {
        "bb": captured["bb"].reshape(n, -1).double().numpy(),
        "ll": captured["ll"].reshape(n, -1).double().numpy(),
        "atom_energy": out["atom_energy"].detach().reshape(n).double().numpy(),
        "types": atype[0].numpy(),
        "w": last.matrix.detach().double().numpy()[:, 0],
    }


def references(module, structures):
    refs = [reference(module, atoms) for atoms in structures]
    return {key: np.concatenate([r[key] for r in refs]) for key in ("bb", "ll", "types")} | {
        "atom_energy": np.concatenate([r["atom_energy"] for r in refs]),
        "w": refs[0]["w"],
    }


def test_frozen_head_bb_and_ll_equal_the_hooks_of_its_module(models):
    extractor = load_extractor("dpa", path=models["pth"]["MPtrj"])
    got = extractor.featurize(frames())
    ref = references(models["modules"]["MPtrj"], frames())
    assert got["bb"].shape == (len(ref["bb"]), 16) and got["ll"].shape[1] == 16
    np.testing.assert_allclose(got["bb"], ref["bb"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got["ll"], ref["ll"], atol=TOL, rtol=0)


@pytest.mark.parametrize("head", HEADS)
def test_each_head_of_the_checkpoint_equals_its_module(models, head):
    got = load_extractor("dpa", path=models["pt"], head=head).featurize(frames())
    ref = references(models["modules"][head], frames())
    np.testing.assert_allclose(got["bb"], ref["bb"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got["ll"], ref["ll"], atol=TOL, rtol=0)


def test_heads_share_bb_differ_in_ll_and_frozen_equals_checkpoint(models):
    pt = {h: load_extractor("dpa", path=models["pt"], head=h).featurize(frames()) for h in HEADS}
    pth = load_extractor("dpa", path=models["pth"]["SPICE"]).featurize(frames())
    for head in HEADS[1:]:
        np.testing.assert_allclose(pt[head]["bb"], pt[HEADS[0]]["bb"], atol=TOL, rtol=0)
        assert np.abs(pt[head]["ll"] - pt[HEADS[0]]["ll"]).max() > 1e-3
    np.testing.assert_allclose(pth["ll"], pt["SPICE"]["ll"], atol=TOL, rtol=0)


def test_atomic_energy_is_w_dot_ll_plus_a_bias_of_the_type(models):
    head = "OMat24"
    got = load_extractor("dpa", path=models["pt"], head=head).featurize(frames())
    ref = references(models["modules"][head], frames())
    residual = ref["atom_energy"] - got["ll"].astype(np.float64) @ ref["w"]
    for t in np.unique(ref["types"]):
        values = residual[ref["types"] == t]
        assert np.ptp(values) < 1e-4 * max(1.0, np.abs(values).max()), (t, values)


def test_unknown_or_missing_head_is_a_one_line_error_listing_the_heads(models):
    heads = "OMat24, MPtrj, OC20, ODAC, SPICE"
    with pytest.raises(DfreError, match=f"has no head 'OMol'; its heads: {heads}") as error:
        load_extractor("dpa", path=models["pt"], head="OMol")
    assert "\n" not in str(error.value)
    with pytest.raises(DfreError, match=f"multi-task checkpoint: choose a head.*{heads}"):
        load_extractor("dpa", path=models["pt"])
    with pytest.raises(DfreError, match="is a frozen model, which holds the one head"):
        load_extractor("dpa", path=models["pth"]["MPtrj"], head="MPtrj")


def make_store(path, structures):
    store = Store.create(path, chunk_atoms=8)
    store.append(StructureBlock.from_atoms(structures))
    return store


def test_elements_outside_the_type_map_are_masked_with_the_reason(models, tmp_path):
    structures = [*frames(), bulk("Cu", "fcc", 3.6), molecule("NH3")]
    store = make_store(tmp_path / "s.zarr", structures)
    featurize(store.path, "dpa", name="dpa3-omat", options={"path": models["pt"], "head": "OMat24"})
    opened = Store.open(store.path)
    assert opened.group["features/dpa3-omat"].attrs["masked"] == {
        "4": "unsupported element(s) Cu",
        "5": "unsupported element(s) N",
    }
    got = opened.features("dpa3-omat/ll").compute()
    n_kept = sum(len(a) for a in frames())
    ref = references(models["modules"]["OMat24"], frames())
    np.testing.assert_allclose(got[:n_kept], ref["ll"], atol=TOL, rtol=0)
    assert np.isnan(got[n_kept:]).all()


def test_cli_featurizes_a_head_of_the_checkpoint(models, tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", frames())
    argv = ["featurize", "--store", store.path, "--model", "dpa", "--weights", models["pt"]]
    argv += ["--option", "head=ODAC", "--workers", "1", "--dashboard-address", ":0"]
    assert main(argv) == 0
    got = Store.open(store.path).features("dpa/bb").compute()
    np.testing.assert_allclose(got, references(models["modules"]["ODAC"], frames())["bb"], atol=TOL)
    assert main([*argv[:-6], "--option", "head=OMol", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dfre: error: ") and "its heads: OMat24, MPtrj" in err


def test_a_file_of_another_family_is_a_one_line_error(tmp_path):
    mace_like = tmp_path / "mace-mp.model"
    mace_like.write_bytes(b"not read")
    weights = tmp_path / "weights.pt"  # a plain state dict, no deepmd-kit parameters
    torch.save({"layer.weight": torch.zeros(2, 2)}, weights)
    scripted = tmp_path / "other.pth"  # TorchScript of another package
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    cases = {
        mace_like: "is not a deepmd-kit PyTorch model",
        weights: "is not a deepmd-kit .pt checkpoint",
        scripted: "not a deepmd-kit model",
    }
    for path, fragment in cases.items():
        with pytest.raises(DfreError, match=fragment) as error:
            load_extractor("dpa", path=str(path))
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_device_is_honoured(models):
    from deepmd.pt.utils import env

    extractor = load_extractor("dpa", path=models["pth"]["MPtrj"], device="cpu")
    assert extractor.device == "cpu" and env.DEVICE.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DfreError, match="--device cuda asked for, but torch sees no CUDA"):
            load_extractor("dpa", path=models["pth"]["MPtrj"], device="cuda")


def test_isolated_atoms_are_a_reason(models):
    extractor = load_extractor("dpa", path=models["pth"]["MPtrj"])
    apart = Atoms("H2", positions=[[0, 0, 0], [0, 0, 9.0]])
    assert "no neighbour within the 4.5 Å cutoff" in extractor.unsupported_reason(apart)
