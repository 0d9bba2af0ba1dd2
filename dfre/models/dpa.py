"""DPA-3 and other Deep Potential models (``deepmd-kit``) from a user-given file.

* ``bb`` = the descriptor, ``DeepPot.eval_descriptor`` (the per-atom output of the
  DPA-3 backbone that the fitting network receives),
* ``ll`` = ``DeepPot.eval_fitting_last_layer``: the input of the last linear map
  of the energy fitting network.

deepmd-kit evaluates frames of one size at a time, so the batch is run structure
by structure. Options: ``path`` (a frozen ``.pth``/``.pb`` model), ``head`` (for
multi-task models, e.g. ``Omat24``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfre.errors import DfreError
from dfre.models.base import FeatureExtractor, Layer, ModelSpec, register, require_file

LAYERS = {
    "bb": Layer("bb", None, "descriptor (DeepPot.eval_descriptor)"),
    "ll": Layer("ll", None, "last layer of the fitting net (DeepPot.eval_fitting_last_layer)"),
}


class DPAExtractor(FeatureExtractor):
    """Descriptor and fitting last-layer features of a Deep Potential model."""

    packages = ("deepmd-kit",)

    def __init__(self, name: str, deep_pot: Any, device: str, weights: str):
        from ase.data import atomic_numbers

        self.name = name
        self.deep_pot = deep_pot
        self.device = device
        self.weights_path = weights
        self.cutoff = float(deep_pot.get_rcut())
        self.type_map = list(deep_pot.get_type_map())
        self.type_index = {atomic_numbers[s]: i for i, s in enumerate(self.type_map)}
        self.supported_elements = frozenset(self.type_index)
        self.layers = dict(LAYERS)

    def forward(self, batch: list, layers: Sequence[str]) -> dict[str, np.ndarray]:
        parts: dict[str, list] = {layer: [] for layer in layers}
        for atoms in batch:
            coords = atoms.positions.reshape(1, -1)
            cells = atoms.cell[:].reshape(1, 9) if np.asarray(atoms.pbc).any() else None
            types = [self.type_index[int(z)] for z in atoms.numbers]
            if "bb" in layers:
                d = self.deep_pot.eval_descriptor(coords, cells, types)
                parts["bb"].append(np.asarray(d).reshape(len(atoms), -1))
            if "ll" in layers:
                f = self.deep_pot.eval_fitting_last_layer(coords, cells, types)
                parts["ll"].append(np.asarray(f).reshape(len(atoms), -1))
        return {layer: np.concatenate(v).astype(np.float32) for layer, v in parts.items()}


def load_dpa(device: str = "cpu", *, path: str | None = None, head: str | None = None):
    """Load a frozen Deep Potential model with ``deepmd.infer.DeepPot``."""
    from deepmd.infer import DeepPot

    path = require_file(path, "DPA")
    kwargs = {"head": head} if head else {}
    try:
        deep_pot = DeepPot(path, **kwargs)
    except Exception as error:
        raise DfreError(
            f"cannot load Deep Potential model {path} ({type(error).__name__}): the file is "
            "corrupt or not a frozen deepmd-kit model (give --option head=... for multi-task)"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return DPAExtractor(f"dpa:{name}", deep_pot, device, os.path.abspath(path))


register(
    ModelSpec(
        name="dpa",
        family="dpa",
        description="deepmd-kit model such as DPA-3.1 (--weights FILE.pth)",
        layers=LAYERS,
        loader=load_dpa,
        package="deepmd-kit",
        install_hint="pip install deepmd-kit[torch] in a worker environment of its own",
        needs_file=True,
    )
)
