"""Feature extractors against the models called directly, structure by structure.

The references below use only the packages' own APIs (``CHGNet.load``, its graph
converter, ``sevenn.util.model_from_checkpoint`` in single-structure mode as
SevenNet's ASE calculator runs it) with forward pre-hooks written here.
"""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from dfre.cli import main
from dfre.errors import DfreError
from dfre.models import base
from dfre.models.base import load_extractor, registry

TOL = 1e-5


def periodic_frames():
    si = bulk("Si", "diamond", 5.43, cubic=True)
    si.rattle(0.05, seed=1)
    nacl = bulk("NaCl", "rocksalt", 5.64)
    cu = bulk("Cu", "fcc", 3.61).repeat((2, 1, 1))
    cu.rattle(0.03, seed=2)
    return [si, nacl, cu]


def molecular_frames():
    water = molecule("H2O")
    methane = molecule("CH4")
    methane.rattle(0.02, seed=3)
    return [water, methane]


def slab_frames():
    slab = fcc111("Al", (1, 1, 3), vacuum=4.0)  # periodic along the surface only
    slab.rattle(0.02, seed=4)
    return [slab]


# ---------------------------------------------------------------------- CHGNet
@pytest.fixture(scope="module")
def chgnet_direct():
    from chgnet.model import CHGNet

    return CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False).eval()


def chgnet_reference(model, atoms):
    """CHGNet on one structure; molecules in a 40 Å vacuum box (no image within 6 Å)."""
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    if not atoms.pbc.any():
        atoms = atoms.copy()
        atoms.set_cell(np.eye(3) * 40.0)
        atoms.center()
        atoms.pbc = True
    graph = model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
    seen = {}
    hooks = [
        model.mlp.register_forward_pre_hook(lambda m, i: seen.__setitem__("bb", i[0])),
        model.mlp.layers[-1].register_forward_pre_hook(lambda m, i: seen.__setitem__("ll", i[0])),
    ]
    with torch.no_grad():
        model([graph], task="e")
    for h in hooks:
        h.remove()
    return {k: v.numpy() for k, v in seen.items()}


@pytest.mark.parametrize("frames", [periodic_frames(), molecular_frames()], ids=["bulk", "mol"])
def test_chgnet_features_equal_direct_model_call(chgnet_direct, frames):
    extractor = load_extractor("chgnet-0.3.0")
    batched = extractor.featurize(frames)
    for layer in ("bb", "ll"):
        expected = np.concatenate([chgnet_reference(chgnet_direct, a)[layer] for a in frames])
        assert batched[layer].shape == (sum(len(a) for a in frames), 64)
        assert batched[layer].dtype == np.float32
        np.testing.assert_allclose(batched[layer], expected, atol=TOL, rtol=0)


def test_chgnet_slab_equals_slab_in_wide_vacuum(chgnet_direct):
    """A slab periodic in-plane only equals the same slab in a fully periodic cell
    with 40 Å along the normal (no image within the cutoff either way)."""
    (slab,) = slab_frames()
    wide = slab.copy()
    cell = wide.cell[:].copy()
    cell[2] = [0, 0, 40.0]
    wide.set_cell(cell)
    wide.pbc = True
    features = load_extractor("chgnet-0.3.0").featurize([slab])
    expected = chgnet_reference(chgnet_direct, wide)
    for layer in ("bb", "ll"):
        np.testing.assert_allclose(features[layer], expected[layer], atol=TOL, rtol=0)


def test_chgnet_features_do_not_depend_on_batch_composition():
    extractor = load_extractor("chgnet-0.3.0")
    frames = periodic_frames() + molecular_frames()
    together = extractor.featurize(frames)
    reversed_ = extractor.featurize(frames[::-1])
    counts = [len(a) for a in frames]
    starts = np.concatenate([[0], np.cumsum(counts)])
    rstarts = np.concatenate([[0], np.cumsum(counts[::-1])])
    for i in range(len(frames)):
        j = len(frames) - 1 - i
        np.testing.assert_allclose(
            together["ll"][starts[i] : starts[i + 1]],
            reversed_["ll"][rstarts[j] : rstarts[j + 1]],
            atol=TOL,
            rtol=0,
        )


def test_chgnet_variants_differ_and_record_their_weights():
    frames = periodic_frames()[:1]
    a = load_extractor("chgnet-0.3.0")
    b = load_extractor("chgnet-r2scan")
    assert np.abs(a.featurize(frames)["ll"] - b.featurize(frames)["ll"]).max() > 1e-3
    attrs_a, attrs_b = a.attrs("ll"), b.attrs("ll")
    assert attrs_a["weights_sha256"] != attrs_b["weights_sha256"]
    assert len(attrs_a["weights_sha256"]) == 64
    assert attrs_a["versions"]["chgnet"]
    assert attrs_a["layer_definition"].startswith("input of model.mlp.layers[-1]")


# ---------------------------------------------------------------------- SevenNet
def sevennet_reference(model, cutoff, atoms, modal=None):
    """SevenNet on one structure in single-structure mode, as its calculator runs it."""
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, cutoff))
    if modal:
        data[KEY.DATA_MODALITY] = modal
    seen = {}
    mods = model._modules
    hooks = [
        mods["reduce_input_to_hidden"].register_forward_pre_hook(
            lambda m, i: seen.__setitem__("bb", i[0]["x"].detach().clone())
        ),
        mods["reduce_hidden_to_energy"].register_forward_pre_hook(
            lambda m, i: seen.__setitem__("ll", i[0]["x"].detach().clone())
        ),
    ]
    model(data)  # the full forward pass, forces included
    for h in hooks:
        h.remove()
    return {k: v.numpy() for k, v in seen.items()}


@pytest.fixture(scope="module")
def sevennet_direct():
    import sevenn._keys as KEY
    from sevenn.util import model_from_checkpoint

    def load(name):
        model, config = model_from_checkpoint(name)
        model.set_is_batch_data(False)
        return model.eval(), config[KEY.CUTOFF]

    return load


def test_sevennet_features_equal_direct_model_call(sevennet_direct):
    """One batch of five structures against each structure alone: batch composition
    does not matter."""
    model, cutoff = sevennet_direct("7net-0")
    extractor = load_extractor("sevennet-0")
    frames = periodic_frames()[:2] + molecular_frames() + slab_frames()
    batched = extractor.featurize(frames)
    for layer, dim in (("bb", 128), ("ll", 64)):
        expected = np.concatenate([sevennet_reference(model, cutoff, a)[layer] for a in frames])
        assert batched[layer].shape == (sum(len(a) for a in frames), dim)
        np.testing.assert_allclose(batched[layer], expected, atol=TOL, rtol=0)


def test_sevennet_mf0_fidelities_are_separate_feature_sets(sevennet_direct):
    model, cutoff = sevennet_direct("7net-mf-0")
    frames = molecular_frames()[:1]
    features = {}
    for modal in ("PBE", "R2SCAN"):
        extractor = load_extractor(f"sevennet-mf-0-{modal.lower()}")
        features[modal] = extractor.featurize(frames)
        expected = np.concatenate(
            [sevennet_reference(model, cutoff, a, modal)["ll"] for a in frames]
        )
        np.testing.assert_allclose(features[modal]["ll"], expected, atol=TOL, rtol=0)
    assert np.abs(features["PBE"]["ll"] - features["R2SCAN"]["ll"]).max() > 1e-3
    assert np.abs(features["PBE"]["bb"] - features["R2SCAN"]["bb"]).max() > 1e-3


# ---------------------------------------------------------------------- generic
def test_generic_hooks_on_chgnet_equal_the_chgnet_adapter():
    frames = periodic_frames()[:1] + molecular_frames()[:1]
    generic = load_extractor(
        "generic", base="chgnet-0.3.0", hooks={"last": "mlp.layers.7", "back": "mlp:input"}
    )
    chgnet = load_extractor("chgnet-0.3.0").featurize(frames)
    features = generic.featurize(frames)
    np.testing.assert_allclose(features["last"], chgnet["ll"], atol=TOL, rtol=0)
    np.testing.assert_allclose(features["back"], chgnet["bb"], atol=TOL, rtol=0)
    assert generic.layers["last"].dim == 64


def test_generic_output_hook_reads_a_module_output():
    frames = periodic_frames()[:1]
    generic = load_extractor("generic", base="chgnet-0.3.0", hooks={"h": "mlp.layers.0:output"})
    chgnet = load_extractor("chgnet-0.3.0")
    bb = chgnet.featurize(frames)["bb"]
    layer0 = chgnet.model.mlp.layers[0]
    expected = bb @ layer0.weight.detach().numpy().T + layer0.bias.detach().numpy()
    np.testing.assert_allclose(generic.featurize(frames)["h"], expected, atol=1e-4, rtol=0)


def test_generic_bad_inputs(tmp_path):
    with pytest.raises(DfreError, match="has no module 'mlp.nope'"):
        load_extractor("generic", base="chgnet-0.3.0", hooks={"x": "mlp.nope"})
    with pytest.raises(DfreError, match="does not exist"):
        load_extractor("generic", path=str(tmp_path / "missing.pt"), runner="x:y", hooks={"a": "b"})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(DfreError, match="corrupt or not a torch model"):
        load_extractor("generic", path=str(corrupt), runner="x:y", hooks={"a": "b"})
    with pytest.raises(DfreError, match="at least one --hook"):
        load_extractor("generic", base="chgnet-0.3.0")


# ---------------------------------------------------------------------- checks and errors
def test_unsupported_structures_are_explained():
    extractor = load_extractor("chgnet-0.3.0")
    assert extractor.unsupported_reason(periodic_frames()[0]) is None
    assert extractor.unsupported_reason(Atoms("O")) == "single isolated atom"
    apart = Atoms("H2O", positions=[[0, 0, 0], [0.76, 0.59, 0], [12.0, 0, 0]])
    assert "1 atom(s) with no neighbour within the 6 Å cutoff" in extractor.unsupported_reason(
        apart
    )
    sevennet = load_extractor("sevennet-0")
    assert "no neighbour within the 5 Å" in sevennet.unsupported_reason(apart)
    fermium = Atoms("Fm2", positions=[[0, 0, 0], [2.5, 0, 0]])
    assert extractor.unsupported_reason(fermium) == "unsupported element(s) Fm"
    with pytest.raises(DfreError, match="cannot featurize structure 1: single isolated atom"):
        extractor.featurize([periodic_frames()[0], Atoms("O")])


def test_unknown_model_and_layer_are_one_line_errors():
    unknown = r"unknown model 'chgnet-9' \(did you mean 'chgnet-0.3.0'\?\); known models: chgnet"
    with pytest.raises(DfreError, match=unknown):
        load_extractor("chgnet-9")
    with pytest.raises(DfreError, match="has no layer xx; it offers: bb, ll"):
        load_extractor("chgnet-0.3.0").featurize(periodic_frames()[:1], ["xx"])


@pytest.mark.parametrize(
    "name,package",
    [
        ("mace", "mace-torch"),
        ("metatomic", "metatomic-torch"),
        ("uma", "fairchem-core"),
        ("dpa", "deepmd-kit"),
        ("orb", "orb-models"),
        ("mattersim", "mattersim"),
    ],
)
def test_adapters_without_their_package_name_it(name, package):
    spec = registry()[name]
    if spec.package_available():
        pytest.skip(f"{package} is installed here")
    with pytest.raises(
        DfreError, match=f"needs the Python package '{package}'.*(pip install|make env-)"
    ):
        load_extractor(name, path="model.file")


def test_models_command_lists_the_registry(capsys):
    assert main(["models", "--json"]) == 0
    import json

    table = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name in (
        "chgnet-0.3.0",
        "chgnet-0.2.0",
        "chgnet-r2scan",
        "sevennet-0",
        "sevennet-0-22may2024",
        "sevennet-mf-0-pbe",
        "sevennet-mf-0-r2scan",
        "sevennet-l3i5",
    ):
        assert table[name]["weights"] == "yes"
    assert table["sevennet-0"]["layers"] == {"bb": 128, "ll": 64}
    assert table["generic"]["weights"] == "user file"
    assert table["chgnet-0.3.0"]["env"] == table["sevennet-0"]["env"] == "main"
    assert table["mace"]["env"] == "mace" and table["dpa"]["env"] == "dpa"


def test_extractor_is_loaded_once_per_process():
    assert load_extractor("chgnet-0.3.0") is load_extractor("chgnet-0.3.0")
    assert ("chgnet-0.3.0", "cpu", ()) in base._CACHE
