"""PFENet (Tian et al., TPAMI 2020): prior mask + Feature Enrichment Module over four scales."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from svfseg.models.blocks import resize
from svfseg.models.fewshot import EpisodeFeatures
from svfseg.models.heads.common import PrototypePriorModel, classifier, conv_relu, double_conv
from svfseg.models.recipe import PriorHeadRecipe
from svfseg.models.registry import register_model

#: PFENet's Pascal scales (60, 30, 15, 8 at a 60 x 60 feature map) as fractions of the map.
#: On COCO's 81 x 81 map they give 81/40/20/10, as PFENet's COCO scales (1, 0.5, 0.25, 0.125) do.
DEFAULT_SCALES: tuple[float, ...] = (1.0, 0.5, 0.25, 8 / 60)
#: The SVF authors' code fixes these absolute sizes for every dataset (COCO included).
SVF_AUTHORS_SCALES: tuple[int, ...] = (60, 30, 15, 8)

# Guards the truncation against 60 * (8 / 60) landing a hair under 8 in floating point.
_EPS = 1e-6


def scale_size(scale: float, size: Sequence[int]) -> tuple[int, int]:
    """Pooled size of one FEM scale.

    Args:
        scale: A fraction of the feature size if <= 1 (truncated as PFENet's ``int(h * scale)``,
            at least 1), else an absolute size in pixels (PFENet's convention).
        size: Feature map size (h, w).

    Returns:
        (h, w) of the pooled map.
    """
    if scale > 1:
        return int(scale), int(scale)
    return max(1, int(size[0] * scale + _EPS)), max(1, int(size[1] * scale + _EPS))


@register_model("pfenet", recipe=PriorHeadRecipe())
class PFENet(PrototypePriorModel):
    """PFENet few-shot segmentation model.

    Feature Enrichment Module: at each scale the pooled query features, the tiled prototype
    and the resized prior are merged by a 1x1 conv; from the second scale on, the previous
    (finer) scale's output is resized and mixed in (1x1 "alpha" conv, residual); two 3x3
    convs refine it (residual) and an auxiliary classifier predicts from it. The scales are
    upsampled, concatenated, reduced (res1), refined (res2, residual) and classified.

    Args:
        backbone: See :class:`~svfseg.models.fewshot.FewShotModel`.
        scales: FEM scales, fractions of the feature size (or absolute sizes if > 1).
        **kwargs: Passed to :class:`~svfseg.models.heads.common.PrototypePriorModel`.
    """

    model_name = "pfenet"

    def __init__(self, backbone: nn.Module, *, scales: Sequence[float] = DEFAULT_SCALES, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales: expected positive fractions (or sizes > 1), got {scales!r}")
        d, n = self.reduce_dim, len(self.scales)
        self.init_merge = nn.ModuleList(conv_relu(2 * d + 1, d) for _ in range(n))
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * d, d, 1, bias=False), nn.ReLU()) for _ in range(n - 1)
        )
        self.beta_conv = nn.ModuleList(double_conv(d) for _ in range(n))
        self.inner_cls = nn.ModuleList(classifier(d, self.num_classes) for _ in range(n))
        self.res1 = conv_relu(n * d, d)
        self.res2 = double_conv(d)
        self.cls = classifier(d, self.num_classes)

    def head_config(self) -> dict[str, Any]:
        return {**super().head_config(), "scales": list(self.scales)}

    def forward_head(self, feats: EpisodeFeatures) -> tuple[torch.Tensor, list[torch.Tensor]]:
        query, prototype, prior, _ = self.query_prototype_prior(feats)
        size = query.shape[-2:]
        merged: list[torch.Tensor] = []
        aux: list[torch.Tensor] = []
        for idx, scale in enumerate(self.scales):
            bin_size = scale_size(scale, size)
            x = torch.cat(
                [
                    F.adaptive_avg_pool2d(query, bin_size),
                    prototype.expand(-1, -1, *bin_size),
                    resize(prior, bin_size),
                ],
                dim=1,
            )
            x = self.init_merge[idx](x)
            if idx > 0:
                # Fine-to-coarse information flow from the previous scale.
                previous = resize(merged[-1], bin_size)
                x = self.alpha_conv[idx - 1](torch.cat([x, previous], dim=1)) + x
            x = self.beta_conv[idx](x) + x
            aux.append(self.inner_cls[idx](x))
            merged.append(resize(x, size))
        x = self.res1(torch.cat(merged, dim=1))
        x = self.res2(x) + x
        return self.cls(x), aux
