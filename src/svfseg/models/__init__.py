"""Few-shot segmentation models (baseline, PFENet, BAM) on named-stage backbones, with backbone regimes."""

from svfseg.models.export import export_merged
from svfseg.models.fewshot import EpisodeFeatures, FewShotModel
from svfseg.models.outputs import FewShotOutput
from svfseg.models.policy import SVFPolicy
from svfseg.models.recipe import Dependency, ModelRecipe
from svfseg.models.registry import create_model, list_models, model_recipe, register_model
from svfseg.models import heads  # noqa: E402,F401  (registers the built-in heads)

__all__ = [
    "Dependency",
    "EpisodeFeatures",
    "FewShotModel",
    "FewShotOutput",
    "ModelRecipe",
    "SVFPolicy",
    "create_model",
    "export_merged",
    "list_models",
    "model_recipe",
    "register_model",
]
