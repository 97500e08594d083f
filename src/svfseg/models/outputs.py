"""What a few-shot model returns in training: main logits plus auxiliary logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FewShotOutput:
    """Training-mode output of a few-shot segmentation model (no loss inside the model).

    Attributes:
        logits: Main prediction, (B, 2, H, W) at the query resolution.
        aux_logits: Auxiliary predictions (e.g. PFENet's per-scale classifiers), each
            (B, 2, H, W) at the query resolution; empty for heads without auxiliary outputs.
    """

    logits: torch.Tensor
    aux_logits: tuple[torch.Tensor, ...] = ()
