"""CHGNet (``chgnet`` package): the three pretrained models shipped in its wheel.

CHGNet predicts the energy per atom through a readout MLP applied to the final
atom features :math:`h_i` (64-dimensional); the structure energy is the mean of
the MLP outputs times the number of atoms, plus a composition model.

* ``bb`` = the input of ``model.mlp``: the atom features :math:`h_i` after the
  last interaction block (not ``return_atom_feas``, which gives the features of
  the second-to-last convolution),
* ``ll`` = the input of ``model.mlp.layers[-1]``, the last linear map of the MLP.

Both are read with forward pre-hooks. CHGNet only takes periodic cells, so the
non-periodic axes of a molecule, cluster or slab are replaced by vacuum so wide
that no periodic image lies within the cutoff (the graph is the non-periodic one).
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
    fully_periodic,
    register,
    torch_device,
)

#: registry name -> CHGNet.load(model_name=...)
VARIANTS = {
    "chgnet-0.3.0": ("0.3.0", "CHGNet 0.3.0, pretrained on MPtrj"),
    "chgnet-0.2.0": ("0.2.0", "CHGNet 0.2.0, pretrained on MPtrj (earlier release)"),
    "chgnet-r2scan": ("r2scan", "CHGNet 0.3.0 transfer-learned on MP r2SCAN data"),
}
_FILES = {
    "0.3.0": "0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar",
    "0.2.0": "0.2.0/chgnet_0.2.0_e30f77s348m32.pth.tar",
    "r2scan": "r2scan/chgnet_r2scan_transfer_learning_e15f36s161m23.pth.tar",
}
LAYERS = {
    "bb": Layer("bb", 64, "input of model.mlp: atom features after the last interaction block"),
    "ll": Layer("ll", 64, "input of model.mlp.layers[-1]: last hidden layer of the readout MLP"),
}


def weights_path(version: str) -> str:
    """Path of the weights file of CHGNet ``version`` inside the installed package."""
    import importlib.util

    spec = importlib.util.find_spec("chgnet")
    if spec is None or not spec.submodule_search_locations:
        raise DfreError("CHGNet needs the 'chgnet' package: pip install chgnet")
    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, "pretrained", _FILES[version])


class CHGNetExtractor(FeatureExtractor):
    """Backbone and last-layer features of a CHGNet model."""

    packages = ("torch", "chgnet", "pymatgen")

    def __init__(self, name: str, model: Any, device: str, weights: str | None):
        self.name = name
        self.model = model
        self.device = device
        self.weights_path = weights
        self.layers = dict(LAYERS)
        self.cutoff = float(model.graph_converter.atom_graph_cutoff)
        self.supported_elements = frozenset(
            range(1, model.atom_embedding.embedding.num_embeddings + 1)
        )
        self._hook_modules = {"bb": model.mlp, "ll": model.mlp.layers[-1]}

    @classmethod
    def from_model(cls, name: str, model: Any, device: str = "cpu", weights: str | None = None):
        """Wrap an already loaded ``chgnet.model.CHGNet``."""
        model = model.to(torch_device(device)).eval()
        return cls(name, model, device, weights)

    def graph(self, atoms: Any) -> Any:
        """The CHGNet crystal graph of ``atoms`` (built on the CPU)."""
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = fully_periodic(atoms, self.cutoff)
        structure = AseAtomsAdaptor.get_structure(atoms)
        try:
            return self.model.graph_converter(structure)
        except ValueError as error:
            if "isolated atom" in str(error):
                n_isolated = int(str(error).split(" has ")[1].split()[0])
                raise Unsupported(self.isolated_reason(n_isolated)) from None
            raise

    def forward(self, batch: list, layers: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        captured: dict[str, torch.Tensor] = {}
        handles = [
            self._hook_modules[layer].register_forward_pre_hook(_capture(captured, layer))
            for layer in layers
        ]
        try:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                self.model([g.to(device) for g in batch], task="e")
        finally:
            for handle in handles:
                handle.remove()
        return {layer: captured[layer].detach().float().cpu().numpy() for layer in layers}


def _capture(store: dict, layer: str):
    def hook(module, inputs):
        store[layer] = inputs[0]

    return hook


def _loader(name: str, version: str):
    def load(device: str = "cpu") -> CHGNetExtractor:
        from chgnet.model import CHGNet

        path = weights_path(version)
        if not os.path.isfile(path):
            raise DfreError(
                f"weights of {name} not found at {path}: reinstall chgnet (pip install chgnet)"
            )
        model = CHGNet.load(model_name=version, use_device="cpu", verbose=False)
        return CHGNetExtractor.from_model(name, model, device, path)

    return load


for _name, (_version, _description) in VARIANTS.items():
    register(
        ModelSpec(
            name=_name,
            family="chgnet",
            description=_description,
            layers=LAYERS,
            loader=_loader(_name, _version),
            package="chgnet",
            install_hint="pip install chgnet",
            weights=lambda v=_version: weights_path(v),
        )
    )
