"""Training loss: cross-entropy on the main logits plus the mean of the auxiliary cross-entropies."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from svfseg.labels import IGNORE_LABEL


def valid_pixel_count(target: torch.Tensor, ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """Number of labelled (non-ignored) pixels, as a float tensor on the target's device."""
    return (target != ignore_index).sum().to(torch.float32)


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """Summed pixel cross-entropy; ignored pixels contribute nothing.

    Args:
        logits: (B, C, H, W) scores; resized bilinearly to the target's size if they differ.
        target: (B, H, W) long labels.
        ignore_index: label value to skip.

    Returns:
        Scalar float32 tensor (sum over all valid pixels).
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")


def fewshot_loss(
    logits: torch.Tensor,
    aux_logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    *,
    aux_weight: float = 1.0,
    normalizer: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_LABEL,
) -> tuple[torch.Tensor, dict]:
    """PFENet-style loss: ``CE(main) + aux_weight * mean_k CE(aux_k)``.

    Each CE is a mean over valid pixels. ``normalizer`` replaces the local valid-pixel count;
    under data parallelism the trainer passes the global count divided by the world size, so
    the averaged gradients equal those of one process on the whole batch.

    Args:
        logits: (B, 2, H, W) main logits.
        aux_logits: auxiliary logits, each (B, 2, h, w); may be empty.
        target: (B, H, W) labels in {0, 1, 255}.
        aux_weight: weight of the mean auxiliary loss.
        normalizer: pixel count to divide the summed CE by (default: local valid pixels).
        ignore_index: label value to skip.

    Returns:
        (loss, parts) where parts holds the detached scalar tensors ``main`` and ``aux``
        (tensors, so the trainer decides when to synchronise with the device).
    """
    denom = valid_pixel_count(target, ignore_index) if normalizer is None else normalizer
    # A batch without any labelled pixel contributes zero loss rather than NaN.
    denom = torch.clamp(denom, min=1.0)
    main = cross_entropy_sum(logits, target, ignore_index) / denom
    if aux_logits:
        aux = torch.stack([cross_entropy_sum(a, target, ignore_index) for a in aux_logits]).mean() / denom
    else:
        aux = torch.zeros((), device=main.device)
    loss = main + aux_weight * aux
    return loss, {"main": main.detach(), "aux": aux.detach()}
