"""The few-parameter peers of SVF on a backbone's stages: BitFit, BN affine, full fine-tuning of the last stage."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def stage_modules(backbone: nn.Module, stages: Sequence[str], regime: str) -> list[nn.Module]:
    """The child modules of ``backbone`` named ``stages``; a missing one is a ``ValueError`` naming them."""
    children = dict(backbone.named_children())
    missing = [s for s in stages if s not in children]
    if missing:
        raise ValueError(f"regime {regime!r}: svf.stages {missing} not found in {type(backbone).__name__}; "
                         f"its stages are {list(children)}")
    return [children[s] for s in stages]


def bitfit_parameters(stages: Sequence[nn.Module]) -> list[nn.Parameter]:
    """BitFit's parameters in ``stages``: every conv/linear bias, and the BN shift where a conv has none.

    A conv followed by BN usually has no bias (ResNet, EfficientNet): its additive term is the
    BN shift ``beta``, so that is what BitFit trains there. BN shifts are taken whenever the
    stage has a bias-free conv, which is every BN-backed backbone svfseg ships.
    """
    out: list[nn.Parameter] = []
    bias_free_conv = False
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if m.bias is not None:
                    out.append(m.bias)
                else:
                    bias_free_conv = True
    if bias_free_conv:
        out += [m.bias for stage in stages for m in stage.modules() if isinstance(m, _BN) and m.affine]
    return out


def bn_affine_parameters(stages: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The BN scale and shift of every affine BatchNorm in ``stages`` (statistics stay frozen)."""
    return [p for stage in stages for m in stage.modules() if isinstance(m, _BN) and m.affine
            for p in (m.weight, m.bias)]


def _train_only(backbone: nn.Module, regime: str, where: Sequence[str], params: list[nn.Parameter],
                why: str) -> int:
    """Freeze ``backbone`` but ``params``; none found is a ``ValueError`` naming the stages and ``why``."""
    if not params:
        raise ValueError(f"regime {regime!r} cannot apply to {type(backbone).__name__}: stages {list(where)} have {why}")
    backbone.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def train_bitfit(backbone: nn.Module, stages: Sequence[str]) -> int:
    """Regime "bitfit": only the biases in ``stages`` train (`bitfit_parameters`); the number of trainable ones.

    Raises:
        ValueError: A stage is missing, or it has neither conv/linear biases nor affine BatchNorm layers.
    """
    params = bitfit_parameters(stage_modules(backbone, stages, "bitfit"))
    return _train_only(backbone, "bitfit", stages, params, "neither conv/linear biases nor affine BatchNorm layers")


def train_bn_affine(backbone: nn.Module, stages: Sequence[str]) -> int:
    """Regime "bn": only the BN affine parameters in ``stages`` train; the number of trainable ones.

    Raises:
        ValueError: A stage is missing, or it has no affine BatchNorm layer.
    """
    params = bn_affine_parameters(stage_modules(backbone, stages, "bn"))
    return _train_only(backbone, "bn", stages, params, "no affine BatchNorm layer")


def train_last_stage(backbone: nn.Module, stages: Sequence[str]) -> int:
    """Regime "last_stage": everything of the last of ``stages`` trains; the number of trainable ones.

    Raises:
        ValueError: A stage is missing, or the last one has no parameters.
    """
    params = list(stage_modules(backbone, stages, "last_stage")[-1].parameters())
    return _train_only(backbone, "last_stage", [stages[-1]], params, "no parameters")
