"""Low-dimensional maps of structure-level descriptors (PCovR, paper Sec. II B)."""

from dfre.projection.pcovr import (
    COHESIVE_ENERGY,
    PCovRMap,
    cohesive_energy_per_atom,
    fit_pcovr,
    pcovr_map,
    store_target,
)

__all__ = [
    "COHESIVE_ENERGY",
    "PCovRMap",
    "cohesive_energy_per_atom",
    "fit_pcovr",
    "pcovr_map",
    "store_target",
]
