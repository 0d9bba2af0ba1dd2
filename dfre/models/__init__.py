"""Feature extractors of machine-learning interatomic potentials and their registry.

``load_extractor("chgnet-0.3.0").featurize(list_of_atoms)`` gives per-atom features
per layer; ``registry()`` lists every model (``dfre models`` on the command line).
"""

from dfre.models.base import (
    FeatureExtractor,
    Layer,
    ModelSpec,
    Unsupported,
    get_spec,
    load_extractor,
    loaded_models,
    registry,
)

__all__ = [
    "FeatureExtractor",
    "Layer",
    "ModelSpec",
    "Unsupported",
    "get_spec",
    "load_extractor",
    "loaded_models",
    "registry",
]
