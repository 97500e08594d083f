"""Shared front of PFENet-style heads: mid-level features, support prototype, prior mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from svfseg.models.blocks import masked_average_pool, prior_mask, resize
from svfseg.models.fewshot import EpisodeFeatures, FewShotModel

#: How a head combines its K shots' prototypes and priors.
SHOT_REDUCE = ("mean", "sum")


def reduce_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    """1x1 conv (no bias) -> ReLU -> Dropout2d: PFENet's mid-level reduction."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
    )


def conv_relu(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.ReLU(inplace=True),
    )


def double_conv(channels: int) -> nn.Sequential:
    """Two 3x3 conv -> ReLU layers (the residual branch of PFENet's res2 / beta conv)."""
    return nn.Sequential(conv_relu(channels, channels, 3), conv_relu(channels, channels, 3))


def classifier(channels: int, num_classes: int, dropout: float = 0.1) -> nn.Sequential:
    """3x3 conv -> ReLU -> Dropout2d -> 1x1 conv with bias: PFENet's classifier."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
        nn.Conv2d(channels, num_classes, 1),
    )


class PrototypePriorModel(FewShotModel):
    """Few-shot model whose head starts from (query mid-level, support prototype, prior).

    Mid-level features are concat(``mid_stages``) (layer3, layer2 as PFENet), resized to the
    resolution of ``feature_stage`` (default: the finest mid stage, so layer3 of a backbone
    with stride 16 there is upsampled to layer2's size), then reduced to ``reduce_dim``
    channels by separate query / support 1x1 convs. The prototype is the masked average of
    the reduced support features; the prior comes from ``prior_stage``. K shots: prototypes
    and priors are averaged (``shot_reduce="mean"``) or summed (``"sum"``).

    Args:
        backbone: See :class:`FewShotModel`.
        reduce_dim: Channels of the head.
        mid_stages: Stages concatenated into the mid-level features.
        prior_stage: Stage whose features give the prior mask.
        feature_stage: Stage whose resolution the head works at; None = finest mid stage.
        reduce_dropout: Dropout2d after the mid-level reduction.
        train_down_query: False freezes the query reduction at its initial weights (the SVF
            authors' baseline leaves ``down_query`` out of its optimiser).
        shot_reduce: How K shots' prototypes and priors combine: "mean" (PFENet) or "sum"
            (the SVF authors' baseline: unit weights; equal to "mean" for 1-shot).
        **kwargs: Passed to :class:`FewShotModel` (regime, svf_policy, ...).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        reduce_dim: int = 256,
        mid_stages: Sequence[str] = ("layer3", "layer2"),
        prior_stage: str = "layer4",
        feature_stage: str | None = None,
        reduce_dropout: float = 0.5,
        train_down_query: bool = True,
        shot_reduce: str = "mean",
        **kwargs: Any,
    ) -> None:
        if not int(reduce_dim) >= 1:
            raise ValueError(f"reduce_dim: expected the head's width in channels, >= 1, got {reduce_dim!r}")
        if not 0 <= reduce_dropout < 1:
            raise ValueError(f"reduce_dropout: expected a probability in [0, 1), got {reduce_dropout!r}")
        if shot_reduce not in SHOT_REDUCE:
            raise ValueError(f"shot_reduce: expected one of {list(SHOT_REDUCE)}, got {shot_reduce!r}")
        self.mid_stages = tuple(mid_stages)
        self.prior_stage = prior_stage
        self.feature_stages = tuple(dict.fromkeys((*self.mid_stages, prior_stage)))
        super().__init__(backbone, **kwargs)
        strides = self.backbone.stage_strides
        if feature_stage is None:
            names = list(self.backbone.stage_names)
            feature_stage = min(self.mid_stages, key=lambda s: (strides[s], names.index(s)))
        if feature_stage not in self.feature_stages:
            raise ValueError(
                f"feature_stage: expected one of the stages the head reads {list(self.feature_stages)}, "
                f"got {feature_stage!r}"
            )
        self.feature_stage = feature_stage
        self.reduce_dim = int(reduce_dim)
        mid_channels = sum(self.backbone.stage_channels[s] for s in self.mid_stages)
        self.down_query = reduce_block(mid_channels, self.reduce_dim, reduce_dropout)
        self.down_supp = reduce_block(mid_channels, self.reduce_dim, reduce_dropout)
        self.train_down_query = bool(train_down_query)
        self.shot_reduce = shot_reduce
        if not self.train_down_query:
            self.down_query.requires_grad_(False)

    def head_config(self) -> dict[str, Any]:
        return {
            "reduce_dim": self.reduce_dim,
            "mid_stages": list(self.mid_stages),
            "prior_stage": self.prior_stage,
            "feature_stage": self.feature_stage,
            "train_down_query": self.train_down_query,
            "shot_reduce": self.shot_reduce,
        }

    def head_size(self, feats: EpisodeFeatures) -> tuple[int, int]:
        """Spatial size the head works at for this batch (that of ``feature_stage``)."""
        return tuple(feats.query[self.feature_stage].shape[-2:])

    def mid_level(self, stage_feats: dict[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Concatenate the mid stages (flattened leading dims) at ``size``."""
        return torch.cat([resize(stage_feats[s], size) for s in self.mid_stages], dim=1)

    def shot_inputs(
        self, feats: EpisodeFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Compute the per-shot head inputs (before any combination over the K shots).

        Returns:
            ``(query_mid (B, D, h, w), prototypes (B, K, D, 1, 1), shot_priors (B, K, hp, wp),
            (h, w))`` with (h, w) the head size and (hp, wp) the size of ``prior_stage``.
        """
        b, k = feats.support_fg.shape[:2]
        size = self.head_size(feats)
        query_mid = self.down_query(self.mid_level(feats.query, size))
        support = {s: feats.support[s].flatten(0, 1) for s in self.mid_stages}
        support_mid = self.down_supp(self.mid_level(support, size))
        fg = feats.support_fg.flatten(0, 1).unsqueeze(1)
        prototypes = masked_average_pool(support_mid, fg).reshape(b, k, self.reduce_dim, 1, 1)
        shot_priors = prior_mask(feats.query[self.prior_stage], feats.support[self.prior_stage], feats.support_fg)
        return query_mid, prototypes, shot_priors, size

    def query_prototype_prior(
        self, feats: EpisodeFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the head inputs.

        Returns:
            ``(query_mid (B, D, h, w), prototype (B, D, 1, 1), prior (B, 1, h, w),
            shot_priors (B, K, hp, wp))`` with (h, w) the head size; prototypes and priors
            are combined over the K shots by ``shot_reduce``.
        """
        query_mid, prototypes, shot_priors, size = self.shot_inputs(feats)
        if self.shot_reduce == "sum":
            prototype, prior = prototypes.sum(dim=1), shot_priors.sum(dim=1, keepdim=True)
        else:
            prototype, prior = prototypes.mean(dim=1), shot_priors.mean(dim=1, keepdim=True)
        prior = resize(prior, size)
        return query_mid, prototype, prior, shot_priors
