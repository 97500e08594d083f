"""Few-shot segmentation models (baseline, PFENet) on named-stage backbones, with SVF regimes."""

from svfseg.models.export import export_merged
from svfseg.models.fewshot import BACKBONE_MODES, EpisodeFeatures, FewShotModel
from svfseg.models.outputs import FewShotOutput
from svfseg.models.policy import SVFPolicy
from svfseg.models.registry import create_model, list_models, register_model
from svfseg.models import heads  # noqa: E402,F401  (registers the built-in heads)

__all__ = [
    "BACKBONE_MODES",
    "EpisodeFeatures",
    "FewShotModel",
    "FewShotOutput",
    "SVFPolicy",
    "create_model",
    "export_merged",
    "list_models",
    "register_model",
]
