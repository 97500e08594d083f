"""Backbone regimes of the few-shot models: which backbone parameters train (frozen | svf | full)."""

from __future__ import annotations

import logging

from torch import nn

from svfseg.config import REGIMES, SVFPolicy
from svfseg.models.backbones import freeze_batchnorm
from svfseg.models.policy import apply_policy

logger = logging.getLogger(__name__)

#: svfseg 0.1's ``backbone_mode`` values, accepted by :func:`resolve_regime`.
_LEGACY = {"frozen": "frozen", "svf": "svf", "train": "full"}


def resolve_regime(regime: str | None, backbone_mode: str | None = None, *, where: str = "model") -> str:
    """The regime named by ``regime`` or by the deprecated ``backbone_mode`` ("train" = "full").

    Raises:
        ValueError: both given, or an unknown name (the message lists the valid ones).
    """
    if backbone_mode is not None:
        if regime is not None:
            raise ValueError(f"{where}: give regime only (backbone_mode is its deprecated alias)")
        if backbone_mode not in _LEGACY:
            raise ValueError(f"{where}: backbone_mode (deprecated; use regime) must be one of {list(_LEGACY)}, "
                             f"got {backbone_mode!r}")
        return _LEGACY[backbone_mode]
    regime = "frozen" if regime is None else regime
    if regime not in REGIMES:
        raise ValueError(f"{where}: regime must be one of {list(REGIMES)}, got {regime!r}")
    return regime


def configure_backbone(backbone: nn.Module, regime: str, policy: SVFPolicy | None) -> None:
    """Set what of ``backbone`` trains under ``regime`` (in place).

    BatchNorm statistics never update: every BN layer is frozen structurally. "frozen": no
    backbone parameter trains. "svf": ``policy``'s stages are decomposed and only their
    singular values train (plus BN affine / biases where the policy says). "full": every
    backbone parameter trains (BN affine included, statistics still frozen).
    """
    freeze_batchnorm(backbone)
    if regime == "svf":
        apply_policy(backbone, policy or SVFPolicy())
        return
    for p in backbone.parameters():
        p.requires_grad_(regime == "full")


def backbone_needs_graph(regime: str) -> bool:
    """False for the frozen regime: its backbone runs under ``no_grad`` (what PFENet costs)."""
    return regime != "frozen"


def set_backbone_mode(backbone: nn.Module, regime: str) -> None:
    """Train/eval mode of the backbone after ``model.train()``: BN always in eval mode.

    A frozen or SVF backbone is put in eval mode as a whole (no dropout / drop-path either); a
    fully fine-tuned one only has its BatchNorm layers in eval mode.
    """
    if regime in ("frozen", "svf"):
        backbone.eval()
        return
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
