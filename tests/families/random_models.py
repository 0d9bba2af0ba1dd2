"""Randomly initialised models of the paper's families, built with each package's own code.

Used by the family tests (tiny sizes) and by ``benchmarks/bench_family_featurize.py``
(``--random``: the sizes of the released models). Each builder imports its package
inside, so this module imports in any environment.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

#: Hyperparameters of released models (the benchmark's ``--random`` sizes).
MACE_MP_MEDIUM = {"hidden": "128x0e+128x1o", "max_ell": 3, "r_max": 6.0, "num_bessel": 10}
DPA3_3M = {"n_dim": 128, "e_dim": 64, "a_dim": 32, "nlayers": 16, "fitting": [240, 240, 240]}


def build_mace(
    path: str | Path,
    atomic_numbers: list[int],
    *,
    heads: list[str] | None = None,
    seed: int = 0,
    last_readout_only: bool = False,
    r_max: float = 4.5,
    hidden: str = "8x0e+8x1o",
    max_ell: int = 2,
    num_bessel: int = 6,
) -> str:
    """A random ``ScaleShiftMACE`` (the MACE foundation models' class) with random atomic
    energies, scales and shifts per head, saved as MACE saves ``.model`` files
    (``torch.save`` of the module); returns the path."""
    import mace  # noqa: F401  (before e3nn: see dfre.models.mace)
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_heads = len(heads or ["Default"])
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=r_max,
        num_bessel=num_bessel,
        num_polynomial_cutoff=5,
        max_ell=max_ell,
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=2,
        num_elements=len(atomic_numbers),
        hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps("16x0e"),
        gate=torch.nn.functional.silu,
        atomic_energies=rng.normal(size=(n_heads, len(atomic_numbers))),
        avg_num_neighbors=6.0,
        atomic_numbers=list(atomic_numbers),
        correlation=3,
        heads=heads,
        use_last_readout_only=last_readout_only,
        atomic_inter_scale=list(rng.uniform(0.5, 2.0, size=n_heads)),
        atomic_inter_shift=list(rng.normal(size=n_heads)),
    )
    torch.save(model, path)
    return str(path)


def dpa3_config(
    heads: list[str],
    type_map: list[str],
    *,
    n_dim: int = 16,
    e_dim: int = 8,
    a_dim: int = 8,
    nlayers: int = 2,
    fitting: list[int] | None = None,
) -> dict:
    """A multi-task DPA-3 in deepmd-kit's input format: one descriptor and type map
    shared by all heads, one energy fitting net per head."""
    repflow = {
        "n_dim": n_dim,
        "e_dim": e_dim,
        "a_dim": a_dim,
        "nlayers": nlayers,
        "e_rcut": 4.5,
        "e_rcut_smth": 4.0,
        "e_sel": 40,
        "a_rcut": 3.5,
        "a_rcut_smth": 3.0,
        "a_sel": 12,
        "axis_neuron": 4,
    }
    return {
        "shared_dict": {
            "type_map_all": list(type_map),
            "dpa3_descriptor": {"type": "dpa3", "repflow": repflow, "seed": 1},
        },
        "model_dict": {
            head: {
                "type_map": "type_map_all",
                "descriptor": "dpa3_descriptor",
                "fitting_net": {"neuron": list(fitting or [16, 16]), "seed": 10 + i},
            }
            for i, head in enumerate(heads)
        },
    }


def build_dpa3(
    folder: str | Path,
    heads: list[str],
    type_map: list[str],
    *,
    freeze_heads: tuple[str, ...] = (),
    seed: int = 0,
    **sizes,
) -> dict:
    """A random multi-task DPA-3 built as deepmd-kit's trainer builds one (shared
    parameters linked by ``ModelWrapper.share_params``), with random per-type energy
    biases; saved as a training checkpoint ``dpa3-multi.pt`` and frozen per head in
    ``freeze_heads`` to ``dpa3-HEAD.pth`` with deepmd-kit's ``freeze``.

    Returns ``{"modules": {head: torch module}, "pt": path, "pth": {head: path}}``.
    """
    import torch
    from deepmd.pt.entrypoints.main import freeze
    from deepmd.pt.model.model import get_model
    from deepmd.pt.train.wrapper import ModelWrapper
    from deepmd.pt.utils.multi_task import preprocess_shared_params

    folder = Path(folder)
    torch.manual_seed(seed)
    config = dpa3_config(heads, type_map, **sizes)
    params, links = preprocess_shared_params(copy.deepcopy(config))
    modules = {head: get_model(copy.deepcopy(params["model_dict"][head])) for head in heads}
    wrapper = ModelWrapper(modules, model_params=params)
    wrapper.share_params(links, model_key_prob_map={h: 1 / len(heads) for h in heads}, resume=True)
    for module in modules.values():
        bias = module.atomic_model.out_bias
        bias.copy_(torch.randn(bias.shape, dtype=bias.dtype))
    checkpoint = str(folder / "dpa3-multi.pt")
    torch.save({"model": wrapper.state_dict()}, checkpoint)
    frozen = {}
    for head in freeze_heads:
        frozen[head] = str(folder / f"dpa3-{head}.pth")
        freeze(model=checkpoint, output=frozen[head], head=head)
    return {"modules": modules, "pt": checkpoint, "pth": frozen}
