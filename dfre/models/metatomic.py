"""metatomic models (PET-MAD, PET-MAD-DOS, UPET, ...) from a user-given exported file.

metatomic models declare the outputs they can compute; feature extraction asks
for two of them, per atom (``sample_kind="atom"``):

* ``bb`` = ``feature``: the model's per-atom latent representation (for PET: the
  node features of the message-passing layers and their cutoff-weighted sums of
  edge features, concatenated). Exports of older metatomic releases call it
  ``features``; that name is used only when ``feature`` is not offered.
* ``ll`` = ``mtt::aux::<target>_last_layer_features``: the input of the last
  linear maps of the head of ``target`` (metatrain's auxiliary output; ``energy``
  by default, ``dos`` for PET-MAD-DOS). For PET this is, per readout layer, the
  node last-layer features and the cutoff-weighted sum over neighbours of the
  edge last-layer features, so the atomic energy is
  :math:`E_i = w^\\top x_i + b_{node} + b_{edge} \\sum_j f_c(r_{ij})` (exactly
  ``w . ll + b`` where the edge biases are zero), before the model's scaler and
  composition energies.

The model runs through ``MetatomicCalculator.run_model`` (``metatomic-ase``), so
the neighbour lists are exactly those the model requests (``cutoff`` is their
largest cutoff: 4.5 Å for PET-MAD, whose interaction range over two message-passing
layers is 9 Å). Options: ``path`` (the exported ``.pt``), ``target``.
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
    register,
    require_file,
    to_numpy,
    torch_device,
)

FEATURE_OUTPUTS = ("feature", "features")  # current name first, then the deprecated one
LLF_PREFIX, LLF_SUFFIX = "mtt::aux::", "_last_layer_features"
LAYERS = {
    "bb": Layer("bb", None, "metatomic output 'feature' (per atom)"),
    "ll": Layer("ll", None, "metatomic output 'mtt::aux::<target>_last_layer_features'"),
}


def last_layer_targets(outputs: Sequence[str]) -> list[str]:
    """Targets whose last-layer features a model offers (``energy``, ``dos``, ...)."""
    return sorted(
        name[len(LLF_PREFIX) : -len(LLF_SUFFIX)]
        for name in outputs
        if name.startswith(LLF_PREFIX) and name.endswith(LLF_SUFFIX)
    )


class MetatomicExtractor(FeatureExtractor):
    """Features from the outputs of a metatomic model."""

    packages = ("torch", "metatomic-torch", "metatensor-torch", "metatomic-ase")

    def __init__(self, name: str, calculator: Any, device: str, weights: str, target: str | None):
        self.name = name
        self.calculator = calculator
        self.device = device
        self.weights_path = weights
        model = calculator.model()
        capabilities = model.capabilities()
        self.cutoff = max(
            float(options.engine_cutoff("angstrom")) for options in model.requested_neighbor_lists()
        )
        self.supported_elements = frozenset(int(z) for z in capabilities.atomic_types)
        offered = list(capabilities.outputs.keys())
        self.outputs: dict[str, str] = {}
        feature = next((out for out in FEATURE_OUTPUTS if out in offered), None)
        if feature is not None:
            self.outputs["bb"] = feature
        targets = last_layer_targets(offered)
        if target is None and targets:
            target = "energy" if "energy" in targets or len(targets) > 1 else targets[0]
        if target is not None:
            target = target.removeprefix("mtt::")
            if target not in targets:
                raise DfreError(
                    f"metatomic model {weights} has no last-layer features of target "
                    f"'{target}'; its targets: {', '.join(targets) or 'none'} "
                    "(--option target=NAME)"
                )
            self.outputs["ll"] = f"{LLF_PREFIX}{target}{LLF_SUFFIX}"
        self.target = target
        if not self.outputs:
            raise DfreError(
                f"metatomic model {weights} offers neither 'feature' nor last-layer features "
                "(mtt::aux::<target>_last_layer_features); export it with these outputs"
            )
        self.layers = {
            layer: Layer(layer, None, f"metatomic output '{output}' (per atom)")
            for layer, output in self.outputs.items()
        }

    def forward(self, batch: list, layers: Sequence[str]) -> dict[str, np.ndarray]:
        from metatomic.torch import ModelOutput

        requested = {self.outputs[layer]: ModelOutput(sample_kind="atom") for layer in layers}
        results = self.calculator.run_model(list(batch), requested)
        features = {}
        for layer in layers:
            block = results[self.outputs[layer]].block()
            samples = block.samples.values.cpu().numpy()  # (system, atom) pairs
            order = np.lexsort((samples[:, 1], samples[:, 0]))
            values = to_numpy(block.values).reshape(len(samples), -1)
            features[layer] = values[order]
        return features


def load_metatomic(
    device: str = "cpu", *, path: str | None = None, target: str | None = None
) -> MetatomicExtractor:
    """Load an exported metatomic model (``.pt``, TorchScript: no unpickling)."""
    path = require_file(path, "metatomic")
    torch_device(device)
    from metatomic_ase import MetatomicCalculator

    try:
        calculator = MetatomicCalculator(path, device=device, check_consistency=False)
    except Exception as error:
        raise DfreError(
            f"cannot load metatomic model {path} ({type(error).__name__}): the file is corrupt, "
            "not an exported metatomic model (is it a model of another family?), or was "
            "exported for another metatomic version"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return MetatomicExtractor(
        f"metatomic:{name}", calculator, device, os.path.abspath(path), target
    )


register(
    ModelSpec(
        name="metatomic",
        family="metatomic",
        description="metatomic model: PET-MAD, PET-MAD-DOS, UPET (--weights FILE.pt)",
        layers=LAYERS,
        loader=load_metatomic,
        package="metatomic-torch",
        install_hint="it lives in its own environment: make env-metatomic "
        "(deploy/envs/metatomic.txt)",
        needs_file=True,
        env="metatomic",
    )
)
