"""Singular Value Fine-tuning for any PyTorch model: decompose, train only S, merge back."""

from svfseg.svf.config import SVFConfig, selector_matches
from svfseg.svf.decompose import (
    SVDFactors,
    check_exact,
    decompose_weight,
    floored_rank,
    full_rank,
    rebuild_weight,
    relative_error,
)
from svfseg.svf.fold import FoldedBatchNorm, bn_scale_shift, fold_conv_bn
from svfseg.svf.inject import (
    apply_svf,
    is_svf_layer,
    merge_svf,
    singular_value_parameters,
    svf_layers,
    trainable_parameter_report,
    trained_factor_parameters,
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
from svfseg.svf.plan import FormsPlan
from svfseg.svf.planning import NothingToPlan, forms_plan, plan_forms, use_plan
from svfseg.svf.state import load_svf, load_svf_state_dict, save_svf, svf_state_dict

__all__ = [
    "FoldedBatchNorm",
    "FormsPlan",
    "NothingToPlan",
    "SVDFactors",
    "SVFConfig",
    "SVFConv1d",
    "SVFConv2d",
    "SVFConv3d",
    "SVFLayer",
    "SVFLinear",
    "apply_svf",
    "bn_scale_shift",
    "check_exact",
    "decompose_weight",
    "estimate_costs",
    "floored_rank",
    "fold_conv_bn",
    "forms_plan",
    "full_rank",
    "is_svf_layer",
    "load_svf",
    "load_svf_state_dict",
    "merge_svf",
    "plan_forms",
    "rebuild_weight",
    "relative_error",
    "save_svf",
    "selector_matches",
    "singular_value_parameters",
    "svf_layer_from",
    "svf_layers",
    "svf_state_dict",
    "trainable_parameter_report",
    "trained_factor_parameters",
    "use_plan",
]
