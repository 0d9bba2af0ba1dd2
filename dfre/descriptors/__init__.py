"""Structure-level descriptors built from per-atom features (cumulants, paper Sec. III F)."""

from dfre.descriptors.cumulants import (
    CumulantNotice,
    compute_cumulants,
    cross_model_cumulants,
    cumulant_block,
    cumulant_descriptor,
    cumulant_order_study,
    cumulants_from_central_moments,
    cumulants_from_moments,
    cumulative_feature_sets,
    descriptor_name,
    structure_cumulants,
    structure_fre,
)

__all__ = [
    "CumulantNotice",
    "compute_cumulants",
    "cumulant_block",
    "cumulant_descriptor",
    "cumulant_order_study",
    "cumulants_from_central_moments",
    "cumulants_from_moments",
    "cross_model_cumulants",
    "cumulative_feature_sets",
    "descriptor_name",
    "structure_cumulants",
    "structure_fre",
]
