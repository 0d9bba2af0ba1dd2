"""The MACE adapter against mace-torch itself, in the MACE environment (``make env-mace``).

Small randomly initialised ``ScaleShiftMACE`` models are built with mace's own code and
saved as ``.model`` files (a pickled module, as MACE saves them); the features the
adapter reads from such a file are compared with an independent capture through
MACE's own calculator: ``get_descriptors`` for ``bb`` and a forward hook on the last
readout's ``linear_2`` while the calculator computes the energy for ``ll``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

pytest.importorskip("mace", reason="run in the MACE environment: make test-families")

import mace  # noqa: E402,F401  (before e3nn, see dfre.models.mace)
import torch  # noqa: E402
from mace.calculators import MACECalculator  # noqa: E402
from random_models import build_mace  # noqa: E402

from dfre.cli import main  # noqa: E402
from dfre.errors import DfreError  # noqa: E402
from dfre.featurize import featurize  # noqa: E402
from dfre.models.base import load_extractor, loaded_models  # noqa: E402
from dfre.store import Store, StructureBlock  # noqa: E402

TOL = 1e-5
HEADS = ["omat_pbe", "matpes_r2scan", "spice_wB97M"]


def frames():
    si = bulk("Si", "diamond", 5.43).repeat((2, 1, 1))
    si.rattle(0.05, seed=1)
    sic = bulk("SiC", "zincblende", 4.36)
    sic.rattle(0.05, seed=2)
    return [molecule("H2O"), si, molecule("CH3CH2OH"), sic]


def reference(path, atoms, head=None):
    """bb, ll (every head's block) and the last readout's output, through MACE's own
    calculator and forward hooks on its model (nothing from dfre)."""
    kwargs = {"head": head} if head else {}
    calc = MACECalculator(model_paths=path, device="cpu", default_dtype="float32", **kwargs)
    model = calc.models[0]
    captured = {}
    readout = model.readouts[-1]
    hooks = [
        readout.linear_2.register_forward_pre_hook(
            lambda m, inputs: captured.__setitem__("ll", inputs[0].detach().clone())
        ),
        readout.register_forward_hook(
            lambda m, inputs, out: captured.__setitem__("out", out.detach().clone())
        ),
    ]
    try:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
    finally:
        for hook in hooks:
            hook.remove()
    bb = calc.get_descriptors(atoms, invariants_only=True)
    w = readout.linear_2(torch.eye(readout.linear_2.irreps_in.dim)).detach()
    return {"bb": bb, "ll": captured["ll"].numpy(), "out": captured["out"].numpy(), "w": w.numpy()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mace")
    return {
        "single": build_mace(folder / "mp.model", [1, 6, 8, 14], seed=0),
        "multi": build_mace(folder / "mh.model", [1, 6, 8, 14], heads=HEADS, seed=1),
        "off": build_mace(folder / "off.model", [1, 6, 7, 8], seed=2, r_max=5.0),
        "last-only": build_mace(folder / "lo.model", [1, 6, 8, 14], seed=3, last_readout_only=True),
    }


def test_single_head_bb_and_ll_equal_mace_own_capture(models):
    extractor = load_extractor("mace", path=models["single"], trust_checkpoint=True)
    assert extractor.layers["bb"].dim == 16 and extractor.layers["ll"].dim == 16
    grad_enabled = []
    hook = extractor.model.readouts[-1].register_forward_hook(
        lambda m, i, out: grad_enabled.append(torch.is_grad_enabled() or out.requires_grad)
    )
    try:
        got = extractor.featurize(frames())
    finally:
        hook.remove()
    assert grad_enabled == [False]  # one batched pass, no autograd graph kept
    ref = [reference(models["single"], atoms) for atoms in frames()]
    np.testing.assert_allclose(got["bb"], np.concatenate([r["bb"] for r in ref]), atol=TOL, rtol=0)
    np.testing.assert_allclose(got["ll"], np.concatenate([r["ll"] for r in ref]), atol=TOL, rtol=0)
    # the last readout's energy is w · ll
    np.testing.assert_allclose(
        got["ll"] @ ref[0]["w"], np.concatenate([r["out"] for r in ref]), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("head", HEADS)
def test_each_head_gives_mace_own_features_of_that_head(models, head):
    path = models["multi"]
    index = HEADS.index(head)
    got = load_extractor("mace", path=path, head=head, trust_checkpoint=True).featurize(frames())
    ref = [reference(path, atoms, head=head) for atoms in frames()]
    ll = np.concatenate([r["ll"] for r in ref])  # all heads' blocks; MACE zeroes the others
    width = ll.shape[1] // len(HEADS)
    block = slice(index * width, (index + 1) * width)
    assert got["ll"].shape[1] == width == 16
    np.testing.assert_allclose(got["ll"], ll[:, block], atol=TOL, rtol=0)
    assert np.abs(np.delete(ll, np.r_[block], axis=1)).max() == 0
    np.testing.assert_allclose(got["bb"], np.concatenate([r["bb"] for r in ref]), atol=TOL, rtol=0)
    # the readout output of this head is w_h · ll
    out = np.concatenate([r["out"] for r in ref])[:, index]
    np.testing.assert_allclose(got["ll"] @ ref[0]["w"][block, index], out, atol=TOL, rtol=0)


def test_heads_differ_and_the_default_needs_a_choice(models):
    path = models["multi"]
    lls = [
        load_extractor("mace", path=path, head=h, trust_checkpoint=True).featurize(frames())["ll"]
        for h in HEADS[:2]
    ]
    assert np.abs(lls[0] - lls[1]).max() > 1e-3
    with pytest.raises(DfreError, match="has several heads and none is 'default'.*omat_pbe, "):
        load_extractor("mace", path=path, trust_checkpoint=True)


def test_unknown_head_is_a_one_line_error_listing_the_heads(models):
    with pytest.raises(DfreError) as error:
        load_extractor("mace", path=models["multi"], head="omol", trust_checkpoint=True)
    message = str(error.value)
    assert "has no head 'omol'; its heads: omat_pbe, matpes_r2scan, spice_wB97M" in message
    assert "\n" not in message


def test_atomic_energy_is_linear_in_ll_when_only_the_last_readout_counts(models):
    """With ``use_last_readout_only`` the atomic energy is E0[z] + s (w · ll) + shift."""
    path = models["last-only"]
    model = torch.load(path, weights_only=False)
    extractor = load_extractor("mace", path=path, trust_checkpoint=True)
    calc = MACECalculator(model_paths=path, device="cpu", default_dtype="float32")
    for atoms in frames():
        ll = extractor.featurize([atoms])["ll"]
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
        node_energy = calc.results["energies"]  # per atom, E0 included
        w = model.readouts[-1].linear_2(torch.eye(16)).detach().numpy()[:, 0]
        scale, shift = float(model.scale_shift.scale), float(model.scale_shift.shift)
        e0 = model.atomic_energies_fn.atomic_energies.detach().numpy().reshape(-1)
        z = [list(model.atomic_numbers).index(n) for n in atoms.numbers]
        np.testing.assert_allclose(
            node_energy, e0[z] + scale * (ll @ w) + shift, atol=1e-4, rtol=1e-5
        )


def make_store(path, structures):
    store = Store.create(path, chunk_atoms=8)
    store.append(StructureBlock.from_atoms(structures))
    return store


def test_mace_off_and_mace_mp_as_two_checkpoints_in_one_store(models, tmp_path):
    """Two model files through one adapter land as two feature sets; elements outside a
    model's z table (Si for the organic model) are masked with the reason."""
    structures = frames()
    store = make_store(tmp_path / "s.zarr", structures)
    for name in ("mp", "off"):
        key = "single" if name == "mp" else "off"
        options = {"path": models[key], "trust_checkpoint": True}
        report = featurize(store.path, "mace", name=f"mace-{name}", options=options)
        assert report.n_atoms_computed == store.n_atoms
    opened = Store.open(store.path)
    mp = opened.features("mace-mp/ll").compute()
    off = opened.features("mace-off/ll").compute()
    np.testing.assert_allclose(
        mp, np.concatenate([reference(models["single"], a)["ll"] for a in structures]), atol=TOL
    )
    masked = opened.group["features/mace-off"].attrs["masked"]
    assert masked == {"1": "unsupported element(s) Si", "3": "unsupported element(s) Si"}
    rows = np.repeat(np.arange(len(structures)), [len(a) for a in structures])
    kept = np.isin(rows, [0, 2])
    np.testing.assert_allclose(
        off[kept],
        np.concatenate([reference(models["off"], structures[i])["ll"] for i in (0, 2)]),
        atol=TOL,
    )
    assert np.isnan(off[~kept]).all()
    assert opened.group["features/mace-off/ll"].attrs["weights_file"] == "off.model"


def test_cli_featurizes_a_head_and_refuses_an_untrusted_pickle(models, tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", frames())
    base = ["featurize", "--store", store.path, "--model", "mace", "--weights", models["multi"]]
    base += ["--option", "head=matpes_r2scan", "--workers", "1", "--dashboard-address", ":0"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a full Python pickle" in err, err
    assert "--trust-checkpoint" in err
    assert main([*base, "--trust-checkpoint"]) == 0
    got = Store.open(store.path).features("mace/ll").compute()
    ref = [reference(models["multi"], atoms, head="matpes_r2scan") for atoms in frames()]
    np.testing.assert_allclose(got, np.concatenate([r["ll"][:, 16:32] for r in ref]), atol=TOL)


def test_a_file_of_another_family_is_a_one_line_error(tmp_path):
    weights = tmp_path / "state.pt"  # a plain state dict (loads without unpickling code)
    torch.save({"layer.weight": torch.zeros(2, 2)}, weights)
    scripted = tmp_path / "frozen.pth"  # a TorchScript module, as deepmd-kit freezes them
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    for path in (weights, scripted):
        with pytest.raises(DfreError, match=f"{path} is not a MACE model file") as error:
            load_extractor("mace", path=str(path), trust_checkpoint=True)
        assert "\n" not in str(error.value)


def test_unsupported_and_isolated_structures_are_reasons(models):
    extractor = load_extractor("mace", path=models["off"], trust_checkpoint=True)
    assert extractor.unsupported_reason(bulk("Si", "diamond", 5.43)) == "unsupported element(s) Si"
    apart = Atoms("H2", positions=[[0, 0, 0], [0, 0, 9.0]])
    assert "no neighbour within the 5 Å cutoff" in extractor.unsupported_reason(apart)


# ----------------------------------------------------------- two environments, one store
REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = Path(os.environ.get("DFRE_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))


def start(argv, log):
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason="needs the main environment (make test)")
def test_main_and_mace_workers_fill_one_store(models, tmp_path):
    """A real scheduler with one worker of the main environment and one of the MACE
    environment (resources mace=1); `dfre featurize` of the main environment runs
    CHGNet (on the main worker: the only one with chgnet) and MACE (on the MACE worker,
    with --resources mace=1, and again chosen by its package alone) into one store."""
    from distributed import Client

    structures = frames()
    store = make_store(tmp_path / "s.zarr", structures)
    scheduler_file = str(tmp_path / "scheduler.json")
    log = open(tmp_path / "cluster.log", "w")
    worker = ["-m", "distributed.cli.dask_worker", "--scheduler-file", scheduler_file]
    worker += ["--nthreads", "1", "--no-dashboard"]
    processes = [
        start(
            [
                str(MAIN_PYTHON),
                "-m",
                "distributed.cli.dask_scheduler",
                "--scheduler-file",
                scheduler_file,
                "--port",
                "0",
                "--dashboard-address",
                ":0",
            ],
            log,
        ),
    ]
    try:
        for _ in range(600):
            if os.path.exists(scheduler_file):
                break
            time.sleep(0.1)
        processes.append(start([str(MAIN_PYTHON), *worker, "--name", "main"], log))
        processes.append(
            start([sys.executable, *worker, "--name", "mace", "--resources", "mace=1"], log)
        )
        with Client(scheduler_file=scheduler_file, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            dfre = [str(MAIN_PYTHON), "-m", "dfre", "featurize", "--store", store.path]
            dfre += ["--scheduler-file", scheduler_file]
            mace_args = ["--model", "mace", "--weights", models["single"], "--trust-checkpoint"]
            for argv in (
                [*dfre, "--model", "chgnet-0.3.0"],
                [*dfre, *mace_args, "--resources", "mace=1"],
                [*dfre, *mace_args, "--name", "mace-by-package"],
            ):
                run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                assert run.returncode == 0, run.stderr
            loaded = client.run(loaded_models)
            names = {client.scheduler_info()["workers"][a]["name"]: v for a, v in loaded.items()}
        assert names == {"main": ["chgnet-0.3.0"], "mace": ["mace"]}
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=60)
        log.close()

    opened = Store.open(store.path)
    assert set(opened.group["features"].group_keys()) == {"chgnet-0.3.0", "mace", "mace-by-package"}
    mace_direct = load_extractor("mace", path=models["single"], trust_checkpoint=True)
    for name in ("mace", "mace-by-package"):
        for layer in ("bb", "ll"):
            np.testing.assert_allclose(
                opened.features(f"{name}/{layer}").compute(),
                np.concatenate([mace_direct.featurize([a])[layer] for a in structures]),
                atol=TOL,
            )
    # CHGNet called directly in the main environment, structure by structure
    direct = tmp_path / "chgnet-ll.npy"
    script = (
        "import numpy as np; from dfre.models import load_extractor; "
        "from dfre.store import Store; from dfre.featurize import read_frames; "
        f"s = Store.open({store.path!r}); e = load_extractor('chgnet-0.3.0'); "
        "rows = [e.featurize([a])['ll'] for a in read_frames(s, 0, s.n_structures)]; "
        f"np.save({str(direct)!r}, np.concatenate(rows))"
    )
    subprocess.run([str(MAIN_PYTHON), "-c", script], check=True, timeout=600)
    np.testing.assert_allclose(
        opened.features("chgnet-0.3.0/ll").compute(), np.load(direct), atol=TOL
    )
