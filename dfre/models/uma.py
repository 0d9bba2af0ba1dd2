"""UMA (``fairchem-core``): a user-given checkpoint of a Universal Model for Atoms.

The structures of a batch run through fairchem's own ``MLIPPredictUnit.predict``
(inference settings ``batch``: mixture-of-linear-experts unmerged, so one batch
may hold structures of different compositions), with two hooks:

* ``bb`` = the ``l = 0`` channel of the backbone's ``node_embedding``: the
  invariant per-atom features the output heads receive, after message passing
  and the final norm (``sphere_channels`` wide);
* ``ll`` = the input of the last linear map of the energy head (read with a
  forward pre-hook), so the head's per-atom output is :math:`w^\\top x_i + b` and
  the task's energy is ``rmsd * sum_i (w . ll_i + b) + mean`` plus the task's
  element references (fairchem's normaliser and references of that task).

Both are taken detached (the backbone runs under fairchem's own ``enable_grad`` to
differentiate forces); the forward pass stops once they are captured, so no forces
or stresses are computed. The backbone's mixture coefficients depend on the task,
so every task gives its own features.

Options: ``path`` (the inference checkpoint ``.pt``), ``task`` (default ``omat``;
UMA-S-1P1 has ``omat``, ``omol``, ``oc20``, ``odac``, ``omc``), ``energy_head``
(default: the only head, or the first whose name contains "energy"),
``trust_checkpoint``. For ``omol`` the charge and spin multiplicity come from
``atoms.info["charge"]`` / ``["spin"]`` when present, else fairchem's defaults
(0 and 1); other tasks use charge 0, spin 0.
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
    Unsupported,
    check_checkpoint,
    register,
    require_file,
    to_numpy,
    torch_device,
)

LAYERS = {
    "bb": Layer("bb", None, "l=0 channel of the backbone node_embedding"),
    "ll": Layer("ll", None, "input of the last linear map of the energy head"),
}


class _Captured(Exception):
    """Raised by a hook once every requested layer is read: ends the forward pass."""


class UMAExtractor(FeatureExtractor):
    """Backbone and last-layer features of a fairchem UMA model."""

    packages = ("torch", "fairchem-core")

    def __init__(self, name, predictor, device, weights, task, energy_head=None):
        self.name = name
        self.predictor = predictor
        self.device = device
        self.weights_path = weights
        tasks = sorted(predictor.dataset_to_tasks)
        if task not in tasks:
            raise DfreError(
                f"UMA checkpoint {weights} has no task '{task}'; its tasks: {', '.join(tasks)} "
                "(--option task=NAME)"
            )
        self.task = task
        model = self._model()
        self.cutoff = float(model.backbone.cutoff)
        self.supported_elements = frozenset(range(1, int(model.backbone.max_num_elements)))
        heads = list(model.output_heads)
        if energy_head is None:
            energy_head = heads[0] if len(heads) == 1 else None
            energy_head = energy_head or next((k for k in heads if "energy" in k.lower()), None)
        if energy_head not in heads:
            raise DfreError(
                f"UMA checkpoint {weights} has no energy head '{energy_head}'; its heads: "
                f"{', '.join(heads)} (--option energy_head=NAME)"
            )
        self.energy_head = energy_head
        head_last = self._head_last()
        self.layers = {
            "bb": Layer("bb", int(model.backbone.sphere_channels), LAYERS["bb"].definition),
            "ll": Layer("ll", int(head_last.in_features), LAYERS["ll"].definition),
        }

    def _model(self) -> Any:
        """The HydraModel inside the predictor (looked up anew: fairchem may replace it
        on the first prediction)."""
        model = self.predictor.model
        return model.module if hasattr(model, "module") else model

    def _head_last(self) -> Any:
        """The last linear map (``nn.Linear`` or a mixture-of-experts linear) of the
        energy head."""
        head = self._model().output_heads[self.energy_head]
        linears = [m for m in head.modules() if m is not head and hasattr(m, "in_features")]
        if not linears:
            raise DfreError(
                f"energy head {self.energy_head} of {self.weights_path} has no linear map"
            )
        return linears[-1]

    def graph(self, atoms: Any) -> Any:
        from fairchem.core.datasets.atomic_data import AtomicData
        from fairchem.core.units.mlip_unit.api.inference import (
            DEFAULT_CHARGE,
            DEFAULT_SPIN,
            DEFAULT_SPIN_OMOL,
        )

        super().graph(atoms)
        atoms = atoms.copy()
        atoms.info.setdefault("charge", DEFAULT_CHARGE)
        atoms.info.setdefault("spin", DEFAULT_SPIN_OMOL if self.task == "omol" else DEFAULT_SPIN)
        try:
            self.predictor.validate_atoms_data(atoms, self.task)
        except ValueError as error:
            raise Unsupported(str(error).splitlines()[0]) from None
        return AtomicData.from_ase(
            atoms,
            task_name=self.task,
            r_edges=False,
            r_data_keys=["spin", "charge"],
            radius=self.cutoff,
            target_dtype=self.predictor.inference_settings.base_precision_dtype,
        )

    def collate(self, graphs: Sequence[Any]) -> Any:
        from fairchem.core.datasets.atomic_data import atomicdata_list_to_batch

        return atomicdata_list_to_batch(list(graphs))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        captured: dict[str, Any] = {}

        def read_backbone(module, inputs, output):
            captured["bb"] = output["node_embedding"][:, 0, :].detach()
            if "ll" not in layers:
                raise _Captured

        def read_last_layer(module, inputs):
            captured["ll"] = inputs[0].detach()
            raise _Captured

        handles = [self._model().backbone.register_forward_hook(read_backbone)]
        if "ll" in layers:
            handles.append(self._head_last().register_forward_pre_hook(read_last_layer))
        try:
            self.predictor.predict(batch)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer for layer in layers if layer not in captured]
        if missing:
            raise RuntimeError(f"UMA forward pass never reached layer(s) {', '.join(missing)}")
        return {layer: to_numpy(captured[layer]) for layer in layers}


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
    torch_device(device)
    from fairchem.core.units.mlip_unit import load_predict_unit

    try:
        predictor = load_predict_unit(path, inference_settings="batch", device=device)
    except Exception as error:
        raise DfreError(
            f"cannot load UMA checkpoint {path} ({type(error).__name__}): the file is corrupt "
            "or not a fairchem inference checkpoint (is it a model of another family?)"
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
        install_hint="it lives in its own environment: make env-uma (deploy/envs/uma.txt)",
        needs_file=True,
        env="uma",
    )
)
