"""Turn an SVF-trained few-shot model into the plain architecture for deployment."""

from __future__ import annotations

import copy
import logging

from torch import nn

from svfseg.models.regimes import get_regime, merge_adapters
from svfseg.regimes import PLAIN_REGIME
from svfseg.svf import fold_conv_bn

logger = logging.getLogger(__name__)


def export_merged(model: nn.Module, *, inplace: bool = False, fold_bn: bool = False) -> nn.Module:
    """Fold the singular values back into plain conv weights (``svfseg.svf.merge_svf``).

    The result has the state-dict keys of the original architecture, computes the same
    logits, and costs what a frozen-backbone model costs at inference. Its backbone is
    frozen (``svfseg.regimes.PLAIN_REGIME``, ``svf_policy`` None); ``describe()`` then matches
    a plain model of the same architecture.

    Args:
        model: A few-shot model (any backbone mode; one without SVF layers is copied as is).
        inplace: Modify ``model`` itself instead of a deep copy.
        fold_bn: Also fold every backbone BatchNorm into the conv before it (declared by
            ``backbone.conv_bn_pairs()``): convs gain biases, BNs become nn.Identity, so the
            state dict no longer has the original keys. Faster inference; same logits up to
            float rounding.

    Returns:
        The merged model, in eval mode.
    """
    if not hasattr(model, "backbone") or not hasattr(model, "regime"):
        raise TypeError(f"export_merged: expected a few-shot model with a backbone, got {type(model).__name__}")
    merged = model if inplace else copy.deepcopy(model)
    for regime, n_layers in merge_adapters(merged.backbone, fold_bn=fold_bn).items():
        logger.info("merged %d %s layers of %s", n_layers, regime, merged.backbone_name)
    if fold_bn:
        if not hasattr(merged.backbone, "conv_bn_pairs"):
            raise TypeError(f"export_merged(fold_bn=True): {type(merged.backbone).__name__} declares no conv_bn_pairs()")
        merged.backbone.eval()
        fold_conv_bn(merged.backbone, merged.backbone.conv_bn_pairs())
    if get_regime(merged.regime).spec.whole_backbone:
        logger.warning("export_merged: backbone was fully fine-tuned; exported with a frozen backbone")
    merged.regime = PLAIN_REGIME
    merged.svf_policy = None
    merged.lora = None
    for p in merged.backbone.parameters():
        p.requires_grad_(False)
    return merged.eval()
