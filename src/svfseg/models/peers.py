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


def configure_peer(backbone: nn.Module, regime: str, stages: Sequence[str]) -> int:
    """Freeze ``backbone`` and let only the ``regime``'s parameters in ``stages`` train.

    Args:
        backbone: A backbone with named stages (BN layers already frozen structurally).
        regime: "bitfit", "bn" or "last_stage" (full fine-tuning of the last of ``stages``).
        stages: The stages the regime trains (``svf.stages``).

    Returns:
        The number of trainable backbone parameters.

    Raises:
        ValueError: A stage is missing, or the regime finds nothing to train there.
    """
    mods = stage_modules(backbone, stages, regime)
    backbone.requires_grad_(False)
    if regime == "bitfit":
        params = bitfit_parameters(mods)
        why = "neither conv/linear biases nor affine BatchNorm layers"
    elif regime == "bn":
        params = bn_affine_parameters(mods)
        why = "no affine BatchNorm layer"
    elif regime == "last_stage":
        params = list(mods[-1].parameters())
        why = "no parameters"
    else:
        raise ValueError(f"configure_peer: unknown regime {regime!r}")
    if not params:
        where = [stages[-1]] if regime == "last_stage" else list(stages)
        raise ValueError(f"regime {regime!r} cannot apply to {type(backbone).__name__}: stages {where} have {why}")
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)
