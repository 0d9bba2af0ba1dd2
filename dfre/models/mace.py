"""MACE (``mace-torch``): a foundation model from a user-given local file.

``mace-torch`` pins ``e3nn==0.4.4`` while ``sevenn`` needs ``e3nn>=0.5``, so MACE
cannot live in the environment of the shipped models: run it on workers of their
own environment (see ``docs``/README: a worker pool started from a MACE venv with
``dask worker ... --resources mace=1``, and ``dfre featurize --model mace
--weights FILE`` with that scheduler).

* ``bb`` = the invariant (``l = 0``) node features of every interaction layer,
  concatenated: MACE's own ``extract_invariant`` on the ``node_feats`` output, as
  ``MACECalculator.get_descriptors(invariants_only=True)`` computes them;
* ``ll`` = the input of the last linear map of the last readout block
  (``model.readouts[-1]``), read with a forward pre-hook.

Options: ``path`` (the ``.model`` file), ``head`` (for multi-head models).
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
    "ll": Layer("ll", None, "input of the last linear map of readouts[-1]"),
}


class MACEExtractor(FeatureExtractor):
    """Backbone and last-layer features of a MACE model."""

    packages = ("torch", "mace-torch", "e3nn")

    def __init__(self, name: str, model: Any, device: str, weights: str | None, head: str | None):
        from e3nn import o3
        from mace.tools import utils

        self.name = name
        self.model = model
        self.device = device
        self.weights_path = weights
        self.head = head
        self.cutoff = float(model.r_max)
        self.z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
        self.supported_elements = frozenset(int(z) for z in model.atomic_numbers)
        self.num_interactions = int(model.num_interactions)
        irreps_out = o3.Irreps(str(model.products[0].linear.irreps_out))
        self.l_max = irreps_out.lmax
        self.num_invariant = irreps_out.dim // (self.l_max + 1) ** 2
        self.readout_last = _last_linear(model.readouts[-1])
        self.layers = {
            "bb": Layer("bb", self.num_invariant * self.num_interactions, LAYERS["bb"].definition),
            "ll": Layer("ll", int(self.readout_last.in_features), LAYERS["ll"].definition)
            if hasattr(self.readout_last, "in_features")
            else LAYERS["ll"],
        }

    def graph(self, atoms: Any) -> Any:
        from mace import data

        super().graph(atoms)  # isolated atoms
        config = data.config_from_atoms(atoms)
        kwargs = {"heads": [self.head]} if self.head else {}
        if self.head:
            config.head = self.head
        return data.AtomicData.from_config(
            config, z_table=self.z_table, cutoff=self.cutoff, **kwargs
        )

    def collate(self, graphs: Sequence[Any]) -> Any:
        from mace.tools import torch_geometric

        loader = torch_geometric.dataloader.DataLoader(
            dataset=list(graphs), batch_size=len(graphs), shuffle=False, drop_last=False
        )
        return next(iter(loader))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        from mace.modules.utils import extract_invariant

        captured: dict[str, Any] = {}
        handle = None
        if "ll" in layers:

            def hook(module, inputs):
                captured["ll"] = inputs[0].detach()

            handle = self.readout_last.register_forward_pre_hook(hook)
        device = next(self.model.parameters()).device
        try:
            out = self.model(batch.to(device).to_dict(), compute_force=False, compute_stress=False)
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
            result["bb"] = invariant.detach().float().cpu().numpy()
        if "ll" in layers:
            result["ll"] = captured["ll"].float().cpu().numpy()
        return result


def _last_linear(module: Any) -> Any:
    """The last submodule of ``module`` with a weight matrix (its final linear map)."""
    last = None
    for sub in module.modules():
        if sub is not module and hasattr(sub, "weight") and sub.weight is not None:
            last = sub
    if last is None:
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
        raise DfreError(f"{path} does not hold a MACE model (no readouts / r_max)")
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
        install_hint="pip install mace-torch in a separate worker environment (it pins "
        "e3nn==0.4.4, which sevenn cannot use)",
        needs_file=True,
    )
)
