"""Backbone regimes of the few-shot models: which backbone parameters train (frozen | svf | full | peers of SVF)."""

from __future__ import annotations

import logging

from torch import nn

from svfseg.config import REGIMES, LoRAConfig, SVFPolicy
from svfseg.models.backbones import freeze_batchnorm
from svfseg.models.lora import apply_lora, merge_lora, set_lora_dropout_mode
from svfseg.models.peers import configure_peer
from svfseg.models.policy import apply_policy

logger = logging.getLogger(__name__)

#: svfseg 0.1's ``backbone_mode`` values, accepted by :func:`resolve_regime`.
_LEGACY = {"frozen": "frozen", "svf": "svf", "train": "full"}

#: Regimes that train part of ``svf.stages`` (the policy's stages): the policy is passed to them.
STAGED_REGIMES = ("svf", "bitfit", "bn", "last_stage", "lora")
#: Regimes whose backbone holds layers that merging folds back into plain convs (SVD layers, LoRA adapters).
MERGEABLE_REGIMES = ("svf", "lora")


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


def configure_backbone(backbone: nn.Module, regime: str, policy: SVFPolicy | None,
                       lora: LoRAConfig | None = None) -> None:
    """Set what of ``backbone`` trains under ``regime`` (in place).

    BatchNorm statistics never update: every BN layer is frozen structurally. "frozen": no
    backbone parameter trains. "svf": ``policy``'s stages are decomposed and only their
    singular values train (plus BN affine / biases where the policy says). "full": every
    backbone parameter trains (BN affine included, statistics still frozen). On the policy's
    stages: "bitfit" trains biases (the BN shift where a conv has none), "bn" the BN affine
    parameters, "last_stage" everything of the last stage, "lora" peft LoRA adapters of rank
    ``lora.r`` on the ungrouped convs.

    Raises:
        ValueError: the regime finds nothing to train on these stages (the message says why).
    """
    freeze_batchnorm(backbone)
    policy = policy or SVFPolicy()
    if regime == "svf":
        apply_policy(backbone, policy)
    elif regime == "lora":
        lora = lora or LoRAConfig()
        apply_lora(backbone, policy.stages, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
    elif regime in ("bitfit", "bn", "last_stage"):
        configure_peer(backbone, regime, policy.stages)
    else:
        for p in backbone.parameters():
            p.requires_grad_(regime == "full")


def merge_backbone(backbone: nn.Module) -> int:
    """Fold a regime's extra structure (LoRA adapters) into plain layers; the number of merged layers."""
    return merge_lora(backbone)


def backbone_needs_graph(regime: str) -> bool:
    """False for the frozen regime: its backbone runs under ``no_grad`` (what PFENet costs)."""
    return regime != "frozen"


def set_backbone_mode(backbone: nn.Module, regime: str) -> None:
    """Train/eval mode of the backbone after ``model.train()``: BN always in eval mode.

    Every regime but "full" puts the backbone in eval mode as a whole (no dropout / drop-path;
    LoRA's own adapter dropout follows the model's mode); a fully fine-tuned one only has its
    BatchNorm layers in eval mode.
    """
    if regime != "full":
        training = backbone.training
        backbone.eval()
        if regime == "lora":
            set_lora_dropout_mode(backbone, training)
        return
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
