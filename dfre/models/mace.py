"""MACE (``mace-torch``): a foundation model from a user-given local file.

``mace-torch`` pins ``e3nn==0.4.4`` while ``sevenn`` needs ``e3nn>=0.5``, so MACE
cannot live in the main environment: it runs in ``.envs/mace`` (``make env-mace``),
on Dask workers started there with ``--resources mace=1`` (README, "Models in their
own environments").

* ``bb`` = the invariant (``l = 0``) node features of every interaction layer,
  concatenated: MACE's own ``extract_invariant`` on the ``node_feats`` output, as
  ``MACECalculator.get_descriptors(invariants_only=True)`` computes them;
* ``ll`` = the input of the last linear map of the last readout block
  (``model.readouts[-1]``), read with a forward pre-hook. In a model with ``H``
  heads that input has ``H`` blocks of equal width and MACE zeroes all but the
  block of the atom's head, so ``ll`` is that head's block: the readout output of
  head ``h`` is then ``w_h · ll`` with ``w_h`` the block of column ``h`` of the map.

Options: ``path`` (the ``.model`` file), ``head`` (for multi-head models: MACE-MH-1,
fine-tuned models; default the only head, else the head named ``default``),
``trust_checkpoint`` (a ``.model`` file is a full pickle).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfre.errors import DfreError
from dfre.models.base import (
    FeatureExtractor,
    Layer,
    ModelSpec,
    check_checkpoint,
    register,
    require_file,
    torch_device,
)

LAYERS = {
    "bb": Layer("bb", None, "invariant node features of all interaction layers (node_feats)"),
    "ll": Layer("ll", None, "input of the last linear map of readouts[-1], the head's block"),
}


class MACEExtractor(FeatureExtractor):
    """Backbone and last-layer features of a MACE model, for one of its heads."""

    packages = ("torch", "mace-torch", "e3nn")

    def __init__(self, name: str, model: Any, device: str, weights: str | None, head: str | None):
        # mace first: e3nn 0.4.4 reads its constants with a plain torch.load, which
        # torch >= 2.6 refuses, and importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        # for it (dfre's own torch.load calls always pass weights_only explicitly)
        import mace  # noqa: F401
        from e3nn import o3
        from mace.tools import utils

        self.name = name
        self.model = model
        self.device = device
        self.weights_path = weights
        self.heads = [str(h) for h in getattr(model, "heads", None) or ["Default"]]
        self.head = choose_head(self.heads, head, weights)
        self.cutoff = float(model.r_max)
        self.z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
        self.supported_elements = frozenset(int(z) for z in model.atomic_numbers)
        self.num_interactions = int(model.num_interactions)
        irreps_out = o3.Irreps(str(model.products[0].linear.irreps_out))
        self.l_max = irreps_out.lmax
        self.num_invariant = irreps_out.dim // (self.l_max + 1) ** 2
        self.readout_last = _last_linear(model.readouts[-1])
        width = o3.Irreps(str(self.readout_last.irreps_in)).dim // len(self.heads)
        index = self.heads.index(self.head)
        self.ll_columns = slice(index * width, (index + 1) * width)
        self.layers = {
            "bb": Layer("bb", self.num_invariant * self.num_interactions, LAYERS["bb"].definition),
            "ll": Layer("ll", width, LAYERS["ll"].definition),
        }

    def graph(self, atoms: Any) -> Any:
        from mace import data

        super().graph(atoms)  # isolated atoms
        config = data.config_from_atoms(atoms, head_name=self.head)
        return data.AtomicData.from_config(
            config, z_table=self.z_table, cutoff=self.cutoff, heads=self.heads
        )

    def collate(self, graphs: Sequence[Any]) -> Any:
        from mace.tools import torch_geometric

        loader = torch_geometric.dataloader.DataLoader(
            dataset=list(graphs), batch_size=len(graphs), shuffle=False, drop_last=False
        )
        return next(iter(loader))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        import torch
        from mace.modules.utils import extract_invariant

        captured: dict[str, Any] = {}
        handle = None
        if "ll" in layers:

            def hook(module, inputs):
                captured["ll"] = inputs[0][:, self.ll_columns]

            handle = self.readout_last.register_forward_pre_hook(hook)
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():  # features only: no autograd graph is kept
                out = self.model(
                    batch.to(device).to_dict(), compute_force=False, compute_stress=False
                )
        finally:
            if handle is not None:
                handle.remove()
        result = {}
        if "bb" in layers:
            invariant = extract_invariant(
                out["node_feats"],
                num_layers=self.num_interactions,
                num_features=self.num_invariant,
                l_max=self.l_max,
            )
            result["bb"] = invariant.float().cpu().numpy()
        if "ll" in layers:
            result["ll"] = captured["ll"].float().cpu().numpy()
        return result


def choose_head(heads: Sequence[str], head: str | None, path: str | None) -> str:
    """The head to featurize: ``head`` if the model has it; by default the only head, or
    the one named ``default`` (any case), as MACE's calculator chooses. A one-line
    DfreError lists the heads otherwise."""
    if head is None:
        if len(heads) == 1:
            return heads[0]
        defaults = [h for h in heads if h.lower() == "default"]
        if defaults:
            return defaults[0]
        raise DfreError(
            f"MACE model {path} has several heads and none is 'default': choose one with "
            f"--option head=NAME; its heads: {', '.join(heads)}"
        )
    if head not in heads:
        raise DfreError(
            f"MACE model {path} has no head '{head}'; its heads: {', '.join(heads)} "
            "(--option head=NAME)"
        )
    return head


def _last_linear(module: Any) -> Any:
    """The last submodule of ``module`` with a weight matrix (its final linear map)."""
    last = None
    for sub in module.modules():
        if sub is not module and hasattr(sub, "weight") and sub.weight is not None:
            last = sub
    if last is None or not hasattr(last, "irreps_in"):
        raise DfreError("cannot find the last linear map of the MACE readout")
    return last


def load_mace(
    device: str = "cpu",
    *,
    path: str | None = None,
    head: str | None = None,
    trust_checkpoint: bool = False,
):
    """Load a MACE model file (``torch.load`` of a ``.model`` file, a full pickle: only
    with ``trust_checkpoint``, see :func:`dfre.models.base.check_checkpoint`)."""
    import mace  # noqa: F401  (before torch.load: the pickle names mace's classes)
    import torch

    path = require_file(path, "MACE")
    check_checkpoint(path, "MACE model", trust_checkpoint)
    try:
        model = torch.load(path, map_location=torch_device(device), weights_only=False)
    except Exception as error:
        raise DfreError(
            f"cannot load MACE model {path} ({type(error).__name__}): the file is corrupt or "
            "not a MACE .model file"
        ) from None
    if not hasattr(model, "readouts") or not hasattr(model, "r_max"):
        raise DfreError(
            f"{path} is not a MACE model file (it holds a {type(model).__name__}, not a MACE "
            "model with readouts and r_max): for another family's file use its --model "
            "(see `dfre models`)"
        )
    model = model.float().eval()
    name = os.path.splitext(os.path.basename(path))[0]
    return MACEExtractor(f"mace:{name}", model, device, os.path.abspath(path), head)


register(
    ModelSpec(
        name="mace",
        family="mace",
        description="MACE foundation model from a local file (--weights FILE.model)",
        layers=LAYERS,
        loader=load_mace,
        package="mace-torch",
        install_hint="it lives in its own environment (it pins e3nn==0.4.4, which sevenn "
        "cannot use): `make env-mace`, then run workers from .envs/mace with --resources mace=1",
        needs_file=True,
        env="mace",
    )
)
