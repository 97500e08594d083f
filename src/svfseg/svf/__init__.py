"""Singular Value Fine-tuning for any PyTorch model: decompose, train only S, merge back."""

from svfseg.svf.config import SVFConfig, selector_matches
from svfseg.svf.decompose import (
    SVDFactors,
    check_exact,
    decompose_weight,
    full_rank,
    rebuild_weight,
    relative_error,
)
from svfseg.svf.inject import (
    apply_svf,
    is_svf_layer,
    load_svf,
    load_svf_state_dict,
    merge_svf,
    save_svf,
    singular_value_parameters,
    svf_layers,
    svf_state_dict,
    trainable_parameter_report,
)
from svfseg.svf.layers import (
    SVFConv1d,
    SVFConv2d,
    SVFConv3d,
    SVFLayer,
    SVFLinear,
    estimate_costs,
    svf_layer_from,
)

__all__ = [
    "SVDFactors",
    "SVFConfig",
    "SVFConv1d",
    "SVFConv2d",
    "SVFConv3d",
    "SVFLayer",
    "SVFLinear",
    "apply_svf",
    "check_exact",
    "decompose_weight",
    "estimate_costs",
    "full_rank",
    "is_svf_layer",
    "load_svf",
    "load_svf_state_dict",
    "merge_svf",
    "rebuild_weight",
    "relative_error",
    "save_svf",
    "selector_matches",
    "singular_value_parameters",
    "svf_layer_from",
    "svf_layers",
    "svf_state_dict",
    "trainable_parameter_report",
]
