"""Few-shot model registry: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from svfseg.models.policy import SVFPolicy

# name -> constructor(backbone, **kwargs) -> FewShotModel. Filled by @register_model at
# import of svfseg.models.heads (timm's pattern).
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator registering a few-shot model constructor under ``name``.

    The constructor is called as ``fn(backbone, backbone_mode=..., svf_policy=...,
    backbone_name=..., **head_kwargs)``.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name]!r}")
        _MODELS[name] = fn
        return fn

    return decorator


def _load_builtin_heads() -> None:
    importlib.import_module("svfseg.models.heads")


def list_models() -> list[str]:
    """Names of the registered few-shot models, sorted."""
    _load_builtin_heads()
    return sorted(_MODELS)


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} Valid: {valid}")


def create_model(
    name: str,
    *,
    backbone: str | nn.Module = "resnet50_deep",
    weights: str | None = None,
    backbone_mode: str = "frozen",
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
        backbone_mode: "frozen" | "svf" | "train" (the paper's three regimes).
        svf_policy: :class:`SVFPolicy` or its dict form; only with backbone_mode="svf"
            (default there: the paper's policy, layer2-4).
        backbone_kwargs: Extra arguments for ``create_backbone`` (e.g. output_stride=8).
        **head_kwargs: Head hyper-parameters (e.g. reduce_dim, scales, batch_backbone).

    Returns:
        The model, in train mode, with exactly the regime's parameters requiring grad.
    """
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
        backbone_mode=backbone_mode,
        svf_policy=svf_policy,
        backbone_name=backbone_name,
        **head_kwargs,
    )
