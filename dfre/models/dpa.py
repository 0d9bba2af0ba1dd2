"""DPA-3 and other Deep Potential models (``deepmd-kit``) from a user-given file.

* ``bb`` = the descriptor: the per-atom output of the DPA-3 backbone that the fitting
  network receives (``DeepPot.eval_descriptor``),
* ``ll`` = the input of the last linear map of the energy fitting network, its last
  hidden activation (``DeepPot.eval_fitting_last_layer``), so the atomic energy is
  ``w · ll + b_t`` with ``b_t`` a bias of the atom's type.

Both come from one forward pass (``eval_embedding``, deepmd-kit >= 3.2; earlier
releases take one pass per layer). deepmd-kit evaluates frames of one size at a time,
so the batch runs structure by structure.

deepmd-kit's ``[torch]`` extra pins an older torch, so the package lives in its own
environment, ``.envs/dpa`` (``make env-dpa``).

Options: ``path`` (a frozen ``.pth`` model, or a ``.pt`` training checkpoint, which
``torch.load(weights_only=True)`` reads, so no --trust-checkpoint is needed), ``head``
(for a multi-task ``.pt`` checkpoint such as DPA-3.1-3M-FT; a frozen ``.pth`` holds the
one head chosen when it was frozen).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfre.errors import DfreError
from dfre.models.base import (
    FeatureExtractor,
    Layer,
    ModelSpec,
    register,
    require_file,
    torch_device,
)

LAYERS = {
    "bb": Layer("bb", None, "descriptor (DeepPot.eval_descriptor)"),
    "ll": Layer("ll", None, "last layer of the fitting net (DeepPot.eval_fitting_last_layer)"),
}
SUFFIXES = (".pth", ".pt")


class DPAExtractor(FeatureExtractor):
    """Descriptor and fitting last-layer features of a Deep Potential model."""

    packages = ("torch", "deepmd-kit")

    def __init__(self, name: str, deep_pot: Any, device: str, weights: str, head: str | None):
        from ase.data import atomic_numbers

        self.name = name
        self.deep_pot = deep_pot
        self.device = device
        self.weights_path = weights
        self.head = head
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
            features = self._features(coords, cells, types, layers)
            for layer in layers:
                parts[layer].append(np.asarray(features[layer]).reshape(len(atoms), -1))
        return {layer: np.concatenate(v).astype(np.float32) for layer, v in parts.items()}

    def _features(self, coords, cells, types, layers) -> dict[str, np.ndarray]:
        if hasattr(self.deep_pot, "eval_embedding"):  # deepmd-kit >= 3.2: one pass
            bb, ll, _ = self.deep_pot.eval_embedding(coords, cells, types, dtype="native")
            return {"bb": bb, "ll": ll}
        features = {}
        if "bb" in layers:
            features["bb"] = self.deep_pot.eval_descriptor(coords, cells, types)
        if "ll" in layers:
            features["ll"] = self.deep_pot.eval_fitting_last_layer(coords, cells, types)
        return features


def use_device(device: str) -> None:
    """Make deepmd-kit run on ``device``.

    deepmd-kit fixes its device once per process, when it is first imported: CUDA if
    torch sees a GPU, unless the environment variable ``DEVICE`` is ``cpu``. This sets
    ``DEVICE`` before that import, and afterwards gives a one-line error when the
    process is already bound to the other device.
    """
    want = torch_device(device).type
    if "deepmd.pt.utils.env" not in sys.modules:
        if want == "cpu":
            os.environ["DEVICE"] = "cpu"
        elif os.environ.get("DEVICE") == "cpu":
            del os.environ["DEVICE"]
    from deepmd.pt.utils import env

    if env.DEVICE.type != want:
        raise DfreError(
            f"deepmd-kit runs on {env.DEVICE} in this process (it fixes its device when first "
            f"imported), not on {device}: run the {device} model in another worker process"
        )


def checkpoint_heads(path: str) -> list[str]:
    """Heads of a multi-task ``.pt`` checkpoint (empty for a single-task one); read with
    ``torch.load(weights_only=True)``, as deepmd-kit itself reads it."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("model", state)
    params = state["_extra_state"]["model_params"]
    return list(params.get("model_dict", {}))


def load_dpa(device: str = "cpu", *, path: str | None = None, head: str | None = None):
    """Load a frozen Deep Potential model (``.pth``) or a training checkpoint (``.pt``,
    multi-task ones with ``head``) with ``deepmd.infer.DeepPot``."""
    path = require_file(path, "DPA")
    suffix = os.path.splitext(path)[1]
    if suffix not in SUFFIXES:
        raise DfreError(
            f"{path} is not a deepmd-kit PyTorch model: give a frozen .pth model or a .pt "
            "checkpoint (for another family's file use its --model, see `dfre models`)"
        )
    heads = _heads_or_error(path) if suffix == ".pt" else []
    if head is not None and suffix == ".pth":
        raise DfreError(
            f"{path} is a frozen model, which holds the one head chosen when it was frozen: "
            "drop --option head, or give the multi-task .pt checkpoint"
        )
    if head is not None and not heads:
        raise DfreError(f"{path} is a single-task checkpoint: drop --option head={head}")
    if heads and head is None and "default" not in {h.lower() for h in heads}:
        raise DfreError(
            f"{path} is a multi-task checkpoint: choose a head with --option head=NAME; "
            f"its heads: {', '.join(heads)}"
        )
    use_device(device)
    from deepmd.infer import DeepPot

    try:
        deep_pot = DeepPot(path, **({"head": head} if head is not None else {}))
    except AssertionError as error:  # deepmd-kit's own check of the head name
        if heads and "head" in str(error).lower():
            raise DfreError(
                f"DPA model {path} has no head '{head}'; its heads: {', '.join(heads)} "
                "(--option head=NAME)"
            ) from None
        raise DfreError(f"cannot load Deep Potential model {path}: {error}") from None
    except Exception as error:
        raise DfreError(
            f"cannot load Deep Potential model {path} ({type(error).__name__}): the file is "
            "corrupt or not a deepmd-kit model"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return DPAExtractor(f"dpa:{name}", deep_pot, device, os.path.abspath(path), head)


def _heads_or_error(path: str) -> list[str]:
    try:
        return checkpoint_heads(path)
    except Exception as error:
        raise DfreError(
            f"{path} is not a deepmd-kit .pt checkpoint ({type(error).__name__} reading its "
            "model parameters): for another family's file use its --model, see `dfre models`"
        ) from None


register(
    ModelSpec(
        name="dpa",
        family="dpa",
        description="deepmd-kit model such as DPA-3.1 (--weights FILE.pth or FILE.pt)",
        layers=LAYERS,
        loader=load_dpa,
        package="deepmd-kit",
        install_hint="it lives in its own environment (its [torch] extra pins another "
        "torch): `make env-dpa`, then run workers from .envs/dpa with --resources dpa=1",
        needs_file=True,
        env="dpa",
    )
)
