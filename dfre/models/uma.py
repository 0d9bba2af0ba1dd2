"""UMA (``fairchem-core``): a user-given checkpoint of a Universal Model for Atoms.

* ``bb`` = the ``l = 0`` channel of the backbone's ``node_embedding`` (the
  invariant per-atom features the output heads receive),
* ``ll`` = the input of the last linear map of the energy head, read with a
  forward pre-hook (the head module is ``energy_head``, default: the first output
  head whose name contains "energy").

Options: ``path`` (the ``.pt`` checkpoint), ``task`` (UMA task name, default
``omat``), ``energy_head``.
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
)

LAYERS = {
    "bb": Layer("bb", None, "l=0 channel of the backbone node_embedding"),
    "ll": Layer("ll", None, "input of the last linear map of the energy head"),
}


class UMAExtractor(FeatureExtractor):
    """Backbone and last-layer features of a fairchem UMA model."""

    packages = ("torch", "fairchem-core")

    def __init__(self, name, predictor, device, weights, task, energy_head=None):
        import torch

        self.name = name
        self.predictor = predictor
        self.device = device
        self.weights_path = weights
        self.task = task
        self.model = (
            predictor.model.module if hasattr(predictor.model, "module") else predictor.model
        )
        self.backbone = self.model.backbone
        self.cutoff = float(getattr(self.backbone, "cutoff", 6.0))
        self.max_neighbors = int(getattr(self.backbone, "max_neighbors", 300))
        heads = dict(self.model.output_heads.items())
        key = energy_head or next((k for k in heads if "energy" in k.lower()), None)
        if key not in heads:
            raise DfreError(
                f"UMA checkpoint {weights} has no energy head '{key}'; heads: {', '.join(heads)}"
            )
        linears = [m for m in heads[key].modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise DfreError(f"energy head {key} of {weights} has no linear layer")
        self.head_last = linears[-1]
        self.layers = {
            "bb": LAYERS["bb"],
            "ll": Layer("ll", int(self.head_last.in_features), LAYERS["ll"].definition),
        }

    def graph(self, atoms: Any) -> Any:
        from fairchem.core.datasets.atomic_data import AtomicData

        super().graph(atoms)
        return AtomicData.from_ase(
            atoms,
            task_name=self.task,
            r_edges=False,
            radius=self.cutoff,
            max_neigh=self.max_neighbors,
        )

    def collate(self, graphs: Sequence[Any]) -> Any:
        from fairchem.core.datasets.atomic_data import atomicdata_list_to_batch

        return atomicdata_list_to_batch(list(graphs))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        captured: dict[str, Any] = {}

        def hook(module, inputs):
            captured["ll"] = inputs[0].detach()

        handle = self.head_last.register_forward_pre_hook(hook) if "ll" in layers else None
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                batch = batch.to(device)
                embedding = self.backbone(batch)
                if "ll" in layers:
                    for head in self.model.output_heads.values():
                        head(batch, embedding)
        finally:
            if handle is not None:
                handle.remove()
        out = {}
        if "bb" in layers:
            node = embedding["node_embedding"]
            out["bb"] = node[:, 0, :].float().cpu().numpy()
        if "ll" in layers:
            out["ll"] = captured["ll"].float().cpu().numpy()
        return out


def load_uma(
    device: str = "cpu",
    *,
    path: str | None = None,
    task: str = "omat",
    energy_head: str | None = None,
    trust_checkpoint: bool = False,
) -> UMAExtractor:
    """Load a UMA checkpoint through fairchem's ``load_predict_unit`` (which unpickles
    it fully: only with ``trust_checkpoint``, see :func:`dfre.models.base.check_checkpoint`)."""
    path = require_file(path, "UMA")
    check_checkpoint(path, "UMA checkpoint", trust_checkpoint)
    from fairchem.core import pretrained_mlip

    try:
        predictor = pretrained_mlip.load_predict_unit(path, device=device)
    except Exception as error:
        raise DfreError(
            f"cannot load UMA checkpoint {path} ({type(error).__name__}): the file is corrupt "
            "or not a fairchem checkpoint"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return UMAExtractor(f"uma:{name}", predictor, device, os.path.abspath(path), task, energy_head)


register(
    ModelSpec(
        name="uma",
        family="uma",
        description="fairchem UMA checkpoint (--weights FILE.pt, --option task=omat)",
        layers=LAYERS,
        loader=load_uma,
        package="fairchem-core",
        install_hint="pip install fairchem-core in a worker environment of its own",
        needs_file=True,
    )
)
