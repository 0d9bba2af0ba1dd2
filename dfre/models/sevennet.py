"""SevenNet (``sevenn`` package): the pretrained models shipped in its wheel.

SevenNet passes one dict through a sequence of modules and overwrites the node
features ``data['x']`` in place. The per-atom energy is a linear map of the
output of an equivariant interaction stack, reduced in two steps:
``reduce_input_to_hidden`` (128 -> 64) and ``reduce_hidden_to_energy`` (64 -> 1).

* ``bb`` = ``x`` entering ``reduce_input_to_hidden``: the invariant (scalar) node
  features after the last interaction block (128),
* ``ll`` = ``x`` entering ``reduce_hidden_to_energy``: the last hidden layer (64).

Both are read with forward pre-hooks that clone ``x``; the forward pass stops
after the last requested layer, so forces are never computed. The multi-fidelity
model SevenNet-MF-0 selects its fidelity through ``data['data_modality']`` and
both feature sets depend on it: it is registered once per fidelity.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfre.errors import DfreError
from dfre.models.base import (
    FeatureExtractor,
    Layer,
    ModelSpec,
    Unsupported,
    register,
    torch_device,
)

#: registry name -> (sevenn._const attribute of the checkpoint, modal, description)
VARIANTS = {
    "sevennet-0": ("SEVENNET_0_11Jul2024", None, "SevenNet-0 (11 Jul 2024), trained on MPtrj"),
    "sevennet-0-22may2024": (
        "SEVENNET_0_22May2024",
        None,
        "SevenNet-0 (22 May 2024), trained on MPtrj",
    ),
    "sevennet-mf-0-pbe": ("SEVENNET_MF_0", "PBE", "SevenNet-MF-0, PBE fidelity (MPtrj)"),
    "sevennet-mf-0-r2scan": ("SEVENNET_MF_0", "R2SCAN", "SevenNet-MF-0, r2SCAN fidelity (MP)"),
    "sevennet-l3i5": ("SEVENNET_l3i5", None, "SevenNet-l3i5 (lmax 3, 5 layers), MPtrj"),
}
LAYERS = {
    "bb": Layer("bb", 128, "x entering reduce_input_to_hidden: scalar node features"),
    "ll": Layer("ll", 64, "x entering reduce_hidden_to_energy: last hidden layer"),
}
_HOOKED_MODULES = {"bb": "reduce_input_to_hidden", "ll": "reduce_hidden_to_energy"}


#: Checkpoint files of the ``sevenn._const`` attributes, under ``sevenn/pretrained_potentials``.
_FILES = {
    "SEVENNET_0_11Jul2024": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
    "SEVENNET_0_22May2024": "SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
    "SEVENNET_MF_0": "SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
    "SEVENNET_l3i5": "SevenNet_l3i5/checkpoint_l3i5.pth",
}


def weights_path(constant: str) -> str:
    """Path of a pretrained checkpoint inside the installed ``sevenn`` package.

    Found without importing ``sevenn`` (which imports torch) where the package keeps its
    files as sevenn 0.11 does (``dfre models`` stays fast); otherwise ``sevenn._const``
    says where.
    """
    import importlib.util

    spec = importlib.util.find_spec("sevenn")
    if spec is not None and spec.submodule_search_locations and constant in _FILES:
        root = list(spec.submodule_search_locations)[0]
        path = os.path.join(root, "pretrained_potentials", _FILES[constant])
        if os.path.isfile(path):
            return path
    from sevenn import _const

    return getattr(_const, constant)


class _StopForward(Exception):
    """Raised by the last hook: the features are captured, the rest is not needed."""


class SevenNetExtractor(FeatureExtractor):
    """Backbone and last-layer features of a SevenNet model."""

    packages = ("torch", "sevenn", "e3nn")

    def __init__(
        self,
        name: str,
        model: Any,
        cutoff: float,
        device: str,
        modal: str | None,
        weights: str | None,
    ):
        self.name = name
        self.model = model
        self.cutoff = float(cutoff)
        self.device = device
        self.modal = modal
        self.weights_path = weights
        self.layers = dict(LAYERS)
        self.supported_elements = frozenset(int(z) for z in model.type_map)

    @classmethod
    def from_checkpoint(
        cls, name: str, path: str, device: str = "cpu", modal: str | None = None
    ) -> SevenNetExtractor:
        """Load a SevenNet checkpoint file for batched feature extraction.

        The fidelities of a multi-fidelity checkpoint share one loaded model (the
        fidelity is part of each graph, not of the model), and one forward lock.
        """
        import sevenn._keys as KEY

        model, config, lock = _load_checkpoint(os.path.abspath(path), device)
        modal_map = model.modal_map or {}
        if modal_map and modal not in modal_map:
            raise DfreError(
                f"SevenNet model {name} is multi-fidelity: choose a fidelity among "
                f"{', '.join(modal_map)}"
            )
        extractor = cls(name, model, config[KEY.CUTOFF], device, modal if modal_map else None, path)
        extractor._forward_lock = lock  # hooks go on the shared model: one pass at a time
        return extractor

    def graph(self, atoms: Any) -> Any:
        """The SevenNet neighbour graph of ``atoms`` (built on the CPU)."""
        import sevenn._keys as KEY
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        arrays = unlabeled_atoms_to_graph(atoms, self.cutoff)
        isolated = len(atoms) - len(np.unique(arrays[KEY.EDGE_IDX][0]))
        if isolated:
            raise Unsupported(self.isolated_reason(isolated))
        graph = AtomGraphData.from_numpy_dict(arrays)
        if self.modal is not None:
            graph[KEY.DATA_MODALITY] = self.modal
        return graph

    def collate(self, graphs: Sequence[Any]) -> Any:
        """One torch_geometric batch of SevenNet graphs."""
        from torch_geometric.loader.dataloader import Collater

        return Collater([], follow_batch=None, exclude_keys=None)(list(graphs))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        captured: dict[str, torch.Tensor] = {}
        last = max(
            layers, key=lambda layer: list(self.model._modules).index(_HOOKED_MODULES[layer])
        )

        def hook_for(layer):
            def hook(module, inputs):
                captured[layer] = inputs[0]["x"].detach().clone()
                if layer == last:
                    raise _StopForward

            return hook

        handles = [
            self.model._modules[_HOOKED_MODULES[layer]].register_forward_pre_hook(hook_for(layer))
            for layer in layers
        ]
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                self.model(batch.to(device))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {layer: captured[layer].float().cpu().numpy() for layer in layers}


_CHECKPOINTS: dict[tuple[str, str], tuple[Any, dict, threading.Lock]] = {}
_CHECKPOINTS_LOCK = threading.Lock()


def _load_checkpoint(path: str, device: str) -> tuple[Any, dict, threading.Lock]:
    """The model and config of checkpoint ``path`` on ``device``, loaded once per process."""
    from sevenn.util import model_from_checkpoint

    with _CHECKPOINTS_LOCK:
        if (path, device) not in _CHECKPOINTS:
            try:
                model, config = model_from_checkpoint(path)
            except Exception as error:
                raise DfreError(
                    f"cannot load SevenNet checkpoint {path} ({type(error).__name__}): "
                    "is it a SevenNet checkpoint file?"
                ) from None
            model.set_is_batch_data(True)
            model = model.to(torch_device(device)).eval()
            _CHECKPOINTS[path, device] = (model, config, threading.Lock())
        return _CHECKPOINTS[path, device]


def _loader(name: str, constant: str, modal: str | None):
    def load(device: str = "cpu") -> SevenNetExtractor:
        path = weights_path(constant)
        if not os.path.isfile(path):
            raise DfreError(
                f"weights of {name} not found at {path}: reinstall sevenn (pip install sevenn)"
            )
        return SevenNetExtractor.from_checkpoint(name, path, device, modal)

    return load


for _name, (_constant, _modal, _description) in VARIANTS.items():
    register(
        ModelSpec(
            name=_name,
            family="sevennet",
            description=_description,
            layers=LAYERS,
            loader=_loader(_name, _constant, _modal),
            package="sevenn",
            install_hint="pip install sevenn",
            weights=lambda c=_constant: weights_path(c),
        )
    )
