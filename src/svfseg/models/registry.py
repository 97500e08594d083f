"""Few-shot model registry: ``register_model`` (constructor + recipe), ``create_model``, ``list_models``.

The built-in heads register themselves when ``svfseg.models`` is imported (timm's pattern):
importing this module runs ``svfseg/models/__init__.py`` first, which imports the heads, so
the registry itself imports no model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from svfseg.models.recipe import ModelRecipe
from svfseg.policies import SVFPolicy
from svfseg.regimes import REGIME_NAMES

# name -> constructor(backbone, **kwargs) -> model, and name -> its recipe.
_MODELS: dict[str, Callable[..., nn.Module]] = {}
_RECIPES: dict[str, ModelRecipe] = {}


def register_model(
    name: str, recipe: ModelRecipe | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator registering a model constructor under ``name``, with its recipe.

    The constructor is called as ``fn(backbone, regime=..., svf_policy=..., backbone_name=...,
    **recipe.model_kwargs(run_facts), **head_kwargs)``. ``recipe`` (default :class:`ModelRecipe`: a
    few-shot model on episodes) tells the engine what else the model needs from a config and
    which task trains it, so that a new head needs no engine change.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name]!r}")
        _MODELS[name] = fn
        _RECIPES[name] = recipe or ModelRecipe()
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of the registered few-shot models, sorted."""
    return sorted(_MODELS)


def model_recipe(name: str) -> ModelRecipe:
    """The recipe ``name`` was registered with (ValueError naming the closest model otherwise)."""
    if name not in _RECIPES:
        raise _unknown("model", name, list_models())
    return _RECIPES[name]


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} Valid: {valid}")


def create_model(
    name: str,
    *,
    backbone: str | nn.Module = "resnet50_deep",
    weights: str | None = None,
    regime: str | None = None,
    svf_policy: SVFPolicy | dict[str, Any] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> nn.Module:
    """Build a few-shot segmentation model.

    Args:
        name: Registered model name (see :func:`list_models`), e.g. "baseline", "pfenet".
        backbone: Backbone name for ``svfseg.models.backbones.create_backbone`` or a ready
            ``Backbone`` instance (then ``weights`` and ``backbone_kwargs`` must be unset).
        weights: Backbone weight file (or "imagenet" where the backbone supports it); None
            leaves the backbone randomly initialised.
        regime: "frozen" | "svf" | "full" (the paper's three regimes) or a peer of SVF, "bitfit" |
            "bn" | "last_stage" | "lora" (``svfseg.regimes``); the model's default when
            None ("frozen" for the few-shot models).
        svf_policy: :class:`SVFPolicy` or its dict form; only with regime="svf" or a peer (whose
            stages are the policy's ``stages``)
            (default there: the paper's policy, layer2-4).
        backbone_kwargs: Extra arguments for ``create_backbone`` (e.g. output_stride=8).
        **head_kwargs: Head hyper-parameters (e.g. reduce_dim, scales, batch_backbone).

    Returns:
        The model, in train mode, with exactly the regime's parameters requiring grad.
    """
    if "backbone_mode" in head_kwargs:  # svfseg 0.1's keyword; the config key model.backbone_mode still works
        raise ValueError(f"create_model: backbone_mode={head_kwargs['backbone_mode']!r} is no longer a keyword; "
                         f"pass regime= (one of {list(REGIME_NAMES)}; 0.1's 'train' is 'full')")
    valid = list_models()
    if name not in _MODELS:
        raise _unknown("model", name, valid)
    if isinstance(svf_policy, dict):
        svf_policy = SVFPolicy.from_dict(svf_policy)
    if isinstance(backbone, str):
        from svfseg.models.backbones import create_backbone, list_backbones

        if backbone not in list_backbones():
            raise _unknown("backbone", backbone, list(list_backbones()))
        backbone_name = backbone
        backbone = create_backbone(backbone, weights=weights, **(backbone_kwargs or {}))
    else:
        if weights is not None or backbone_kwargs:
            raise ValueError("create_model: weights/backbone_kwargs apply to a backbone name, not an instance")
        backbone_name = None
    return _MODELS[name](
        backbone,
        regime=regime,
        svf_policy=svf_policy,
        backbone_name=backbone_name,
        **head_kwargs,
    )
