"""MatterSim (``mattersim``): an M3GNet-architecture MatterSim checkpoint from a user file.

The checkpoint (e.g. ``mattersim-v1.0.0-1M.pth``) is loaded by MatterSim's own
``Potential.from_checkpoint``; its graphs are built by MatterSim's ``GraphConvertor``
(two- and three-body cutoffs of the model; a molecule is put in MatterSim's own
vacuum box) and batched as MatterSim's data loader does.

* ``bb`` = the per-atom features after the last M3GNet interaction block: the input
  of the readout ``model.final`` (``units`` wide, 256 for MatterSim-v1-5M);
* no ``ll``: the readout is a gated MLP, :math:`E_i = s_Z\\,(w_g^\\top g_i + b_g)\\,
  \\sigma(w_s^\\top u_i + b_s) + \\mu_Z` with two hidden branches ``g`` and ``u``, so
  no single vector gives the energy as ``w . ll + b``.

Option: ``path`` (the ``.pth`` checkpoint; MatterSim opens it with ``torch.load``'s
default ``weights_only=True``, so no code in it runs).
"""

from __future__ import annotations

import os
import warnings
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

LAYERS = {
    "bb": Layer("bb", None, "atom features after the last M3GNet block (input of model.final)"),
}


class _Captured(Exception):
    """Raised by the hook once bb is read: ends the forward pass (no energy, no forces)."""


class MatterSimExtractor(FeatureExtractor):
    """Backbone features of a MatterSim (M3GNet) potential."""

    packages = ("torch", "mattersim")

    def __init__(self, name: str, potential: Any, device: str, weights: str):
        from mattersim.datasets.utils.convertor import GraphConvertor

        self.name = name
        self.potential = potential
        self.device = device
        self.weights_path = weights
        args = potential.model.model_args
        self.cutoff = float(args["cutoff"])
        self.convertor = GraphConvertor(
            "m3gnet", self.cutoff, True, float(args["threebody_cutoff"])
        )
        self.supported_elements = frozenset(range(1, int(args["max_z"]) + 1))
        self.layers = {"bb": Layer("bb", int(args["units"]), LAYERS["bb"].definition)}

    def graph(self, atoms: Any) -> Any:
        """MatterSim's own graph of ``atoms`` (a molecule in MatterSim's vacuum box); a
        slab or wire gets vacuum axes too wide for any new neighbour (MatterSim would
        take its cell as periodic along every axis)."""
        super().graph(atoms)
        if len(set(np.asarray(atoms.pbc, dtype=bool).tolist())) > 1:
            atoms = fully_periodic(atoms, self.cutoff)
        with warnings.catch_warnings():  # "No PBC detected, using a large supercell"
            warnings.simplefilter("ignore", UserWarning)
            try:
                return self.convertor.convert(atoms.copy(), None, None, None)
            except ValueError as error:  # e.g. "Cell vectors are too small"
                raise Unsupported(f"MatterSim cannot build its graph: {error}") from None

    def collate(self, graphs: Sequence[Any]) -> Any:
        from torch_geometric.data import Batch

        return Batch.from_data_list(list(graphs))

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        from mattersim.forcefield.potential import batch_to_dict

        captured: dict[str, Any] = {}

        def read_backbone(module, inputs):
            captured["bb"] = inputs[0].detach()
            raise _Captured

        handle = self.potential.model.final.register_forward_pre_hook(read_backbone)
        try:
            inputs = batch_to_dict(batch, device=self.potential.device)
            self.potential.forward(inputs, include_forces=False, include_stresses=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "bb" not in captured:
            raise RuntimeError("the MatterSim forward pass never reached its readout")
        return {"bb": to_numpy(captured["bb"])}


def load_mattersim(device: str = "cpu", *, path: str | None = None) -> MatterSimExtractor:
    """Load a MatterSim checkpoint with ``Potential.from_checkpoint``."""
    path = os.path.abspath(require_file(path, "MatterSim"))  # never a release name to download
    torch_device(device)
    from mattersim.forcefield.potential import Potential

    try:
        potential = Potential.from_checkpoint(
            load_path=path, device=device, load_training_state=False
        )
    except Exception as error:
        raise DfreError(
            f"cannot load MatterSim checkpoint {path} ({type(error).__name__}): the file is "
            "corrupt or not a MatterSim checkpoint (is it a model of another family?)"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return MatterSimExtractor(f"mattersim:{name}", potential, device, path)


register(
    ModelSpec(
        name="mattersim",
        family="mattersim",
        description="MatterSim checkpoint (--weights mattersim-v1.0.0-5M.pth)",
        layers=LAYERS,
        loader=load_mattersim,
        package="mattersim",
        install_hint="it lives in its own environment: make env-mattersim "
        "(deploy/envs/mattersim.txt)",
        needs_file=True,
        env="mattersim",
    )
)
