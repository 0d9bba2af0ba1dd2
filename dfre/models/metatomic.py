"""metatomic models (PET-MAD, UPET, ...) from a user-given exported model file.

metatomic models declare the outputs they can compute; feature extraction asks
for two standard ones, per atom:

* ``bb`` = ``features``: the model's per-atom latent representation,
* ``ll`` = ``mtt::aux::energy_last_layer_features``: the input of the last linear
  map of the energy head (metatrain's auxiliary output).

The model is run through ``MetatomicCalculator.run_model`` (``metatomic-ase``, or
``metatomic.torch.ase_calculator`` in older releases), which builds the neighbour
lists the model requests. pet_mad and upet pin different metatrain versions:
each needs its own worker environment. Option: ``path`` (the exported ``.pt``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfre.errors import DfreError
from dfre.models.base import FeatureExtractor, Layer, ModelSpec, register, require_file

OUTPUTS = {"bb": "features", "ll": "mtt::aux::energy_last_layer_features"}
LAYERS = {
    "bb": Layer("bb", None, "metatomic output 'features' (per atom)"),
    "ll": Layer("ll", None, "metatomic output 'mtt::aux::energy_last_layer_features'"),
}


def _calculator_class():
    try:
        from metatomic_ase import MetatomicCalculator
    except ImportError:
        from metatomic.torch.ase_calculator import MetatomicCalculator
    return MetatomicCalculator


class MetatomicExtractor(FeatureExtractor):
    """Features from the standard outputs of a metatomic model."""

    packages = ("torch", "metatomic-torch", "metatensor-torch")

    def __init__(self, name: str, calculator: Any, device: str, weights: str):
        self.name = name
        self.calculator = calculator
        self.device = device
        self.weights_path = weights
        capabilities = calculator._model.capabilities()
        self.cutoff = float(capabilities.interaction_range)
        self.supported_elements = frozenset(int(z) for z in capabilities.atomic_types)
        offered = set(capabilities.outputs.keys())
        self.layers = {layer: LAYERS[layer] for layer, out in OUTPUTS.items() if out in offered}
        if not self.layers:
            raise DfreError(
                f"metatomic model {weights} offers neither 'features' nor "
                "'mtt::aux::energy_last_layer_features'; export it with these outputs"
            )

    def forward(self, batch: list, layers: Sequence[str]) -> dict[str, np.ndarray]:
        from metatomic.torch import ModelOutput

        outputs = {OUTPUTS[layer]: ModelOutput(per_atom=True) for layer in layers}
        results = self.calculator.run_model(list(batch), outputs)
        features = {}
        for layer in layers:
            block = results[OUTPUTS[layer]].block()
            samples = block.samples.values.cpu().numpy()  # (system, atom) pairs
            order = np.lexsort((samples[:, 1], samples[:, 0]))
            values = block.values.detach().float().cpu().numpy().reshape(len(samples), -1)
            features[layer] = values[order]
        return features


def load_metatomic(device: str = "cpu", *, path: str | None = None) -> MetatomicExtractor:
    """Load an exported metatomic model (``.pt``) with its extensions."""
    path = require_file(path, "metatomic")
    try:
        calculator = _calculator_class()(path, device=device, check_consistency=False)
    except Exception as error:
        raise DfreError(
            f"cannot load metatomic model {path} ({type(error).__name__}): the file is corrupt "
            "or was exported for another metatomic version"
        ) from None
    name = os.path.splitext(os.path.basename(path))[0]
    return MetatomicExtractor(f"metatomic:{name}", calculator, device, os.path.abspath(path))


register(
    ModelSpec(
        name="metatomic",
        family="metatomic",
        description="metatomic model such as PET-MAD or UPET (--weights FILE.pt)",
        layers=LAYERS,
        loader=load_metatomic,
        package="metatomic-torch",
        install_hint="pip install metatomic-torch metatomic-ase (plus the model's own "
        "package, e.g. pet-mad) in a worker environment of its own",
        needs_file=True,
    )
)
