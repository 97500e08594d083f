"""svfseg: Singular Value Fine-tuning for few-shot segmentation and for any PyTorch model."""
__version__ = "0.1.0"

from svfseg.svf import (  # noqa: E402  (the model-agnostic SVF API, the package's core)
    FormsPlan,
    SVFConfig,
    apply_svf,
    load_svf,
    load_svf_state_dict,
    merge_svf,
    plan_forms,
    save_svf,
    singular_value_parameters,
    svf_state_dict,
    trainable_parameter_report,
)

__all__ = [
    "FormsPlan",
    "SVFConfig",
    "__version__",
    "apply_svf",
    "load_svf",
    "load_svf_state_dict",
    "merge_svf",
    "plan_forms",
    "save_svf",
    "singular_value_parameters",
    "svf_state_dict",
    "trainable_parameter_report",
]
