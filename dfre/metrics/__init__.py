"""Metrics comparing feature spaces: GFRE (and skmatter-compatible functions), LFRE."""

from dfre.metrics.gfre import (
    GfreResult,
    gfre_matrix,
    gfre_store,
    global_reconstruction_distortion,
    global_reconstruction_error,
    pointwise_global_reconstruction_distortion,
    pointwise_global_reconstruction_error,
)
from dfre.metrics.lfre import (
    LfreResult,
    lfre_matrix,
    lfre_store,
    local_reconstruction_error,
    pointwise_local_reconstruction_error,
)

__all__ = [
    "GfreResult",
    "gfre_matrix",
    "gfre_store",
    "global_reconstruction_distortion",
    "global_reconstruction_error",
    "pointwise_global_reconstruction_distortion",
    "pointwise_global_reconstruction_error",
    "LfreResult",
    "lfre_matrix",
    "lfre_store",
    "local_reconstruction_error",
    "pointwise_local_reconstruction_error",
]
