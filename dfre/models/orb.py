"""Orb (``orb-models``): Orb-v3 and Orb-v2 force fields from a user-given weights file.

Orb's weights files are plain state dicts (no unpickling); the architecture comes
from ``orb_models.forcefield.pretrained`` by the release name (``architecture``
option, default ``orb-v3-conservative-inf-omat``), so a file and its name load the
model exactly as ``ORB_PRETRAINED_MODELS[name](weights_path=FILE)`` does.

* ``bb`` = the per-atom node features after the last message-passing step: the
  ``node_features`` output of the graph network (``model.model``), which every head
  receives (``latent_dim`` wide, 256 for Orb-v3);
* no ``ll``: Orb's energy head averages the node features over the atoms *before*
  its MLP (:math:`E = \\mathrm{MLP}(\\frac{1}{N}\\sum_i h_i)\\,N` after denormalising),
  so the input of its last linear map is one vector per structure, not per atom.

Options: ``path`` (the ``.ckpt`` weights file), ``architecture``.
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
    require_file,
    to_numpy,
    torch_device,
)

DEFAULT_ARCHITECTURE = "orb-v3-conservative-inf-omat"
LAYERS = {
    "bb": Layer("bb", None, "node_features of the graph network after message passing"),
}


class _Captured(Exception):
    """Raised by the hook once bb is read: ends the forward pass (no energy, no forces)."""


class OrbExtractor(FeatureExtractor):
    """Backbone features of an Orb force field."""

    packages = ("torch", "orb-models")

    def __init__(self, name: str, model: Any, device: str, weights: str, architecture: str):
        self.name = name
        self.model = model
        self.device = device
        self.weights_path = weights
        self.architecture = architecture
        self.system_config = model.system_config
        self.cutoff = float(self.system_config.radius)
        embedding = model.model.atom_emb.embeddings  # one row per atomic number 0..118
        self.supported_elements = frozenset(range(1, int(embedding.num_embeddings)))
        self.layers = {"bb": Layer("bb", int(embedding.embedding_dim), LAYERS["bb"].definition)}

    def graph(self, atoms: Any) -> Any:
        """Orb's own graph of ``atoms``; a slab or wire (periodic along some axes only,
        which Orb refuses) gets vacuum axes too wide for any new neighbour."""
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs

        super().graph(atoms)
        if len(set(np.asarray(atoms.pbc, dtype=bool).tolist())) > 1:
            atoms = fully_periodic(atoms, self.cutoff)
        try:
            return ase_atoms_to_atom_graphs(atoms, system_config=self.system_config, device="cpu")
        except (ValueError, NotImplementedError) as error:
            raise Unsupported(f"Orb cannot build its graph: {error}".splitlines()[0]) from None

    def collate(self, graphs: Sequence[Any]) -> Any:
        from orb_models.forcefield.base import batch_graphs

        return batch_graphs(list(graphs))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        captured: dict[str, Any] = {}

        def read_backbone(module, inputs, output):
            captured["bb"] = output["node_features"].detach()
            raise _Captured

        handle = self.model.model.register_forward_hook(read_backbone)
        device = next(self.model.parameters()).device
        try:
            self.model(batch.to(device))
        except _Captured:
            pass
        finally:
            handle.remove()
        if "bb" not in captured:
            raise RuntimeError("the Orb forward pass never reached its graph network")
        return {"bb": to_numpy(captured["bb"])}


def load_orb(
    device: str = "cpu", *, path: str | None = None, architecture: str = DEFAULT_ARCHITECTURE
) -> OrbExtractor:
    """Load Orb weights into the architecture of release ``architecture``."""
    path = require_file(path, "Orb")
    torch_device(device)
    from orb_models.forcefield.pretrained import ORB_PRETRAINED_MODELS

    if architecture not in ORB_PRETRAINED_MODELS:
        raise DfreError(
            f"unknown Orb architecture '{architecture}'; known: "
            f"{', '.join(ORB_PRETRAINED_MODELS)} (--option architecture=NAME)"
        )
    try:
        model = ORB_PRETRAINED_MODELS[architecture](
            weights_path=path, device=device, precision="float32-highest", compile=False
        )
    except Exception as error:
        raise DfreError(
            f"cannot load Orb weights {path} into architecture {architecture} "
            f"({type(error).__name__}): the file is corrupt, of another Orb release (give "
            "--option architecture=NAME) or of another model family"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return OrbExtractor(f"orb:{name}", model.eval(), device, os.path.abspath(path), architecture)


register(
    ModelSpec(
        name="orb",
        family="orb",
        description="Orb-v3 / Orb-v2 force field (--weights FILE.ckpt, "
        "--option architecture=orb-v3-conservative-inf-omat)",
        layers=LAYERS,
        loader=load_orb,
        package="orb-models",
        install_hint="it lives in its own environment: make env-orb (deploy/envs/orb.txt)",
        needs_file=True,
        env="orb",
    )
)
