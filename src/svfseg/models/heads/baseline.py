"""The SVF paper's baseline: prior + prototype merged with the query, ASPP meta learner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from svfseg.models.blocks import ASPP
from svfseg.models.fewshot import EpisodeFeatures
from svfseg.models.heads.common import PrototypePriorModel, classifier, conv_relu, double_conv
from svfseg.models.recipe import PriorHeadRecipe
from svfseg.models.registry import register_model


class ASPPMetaLearner(PrototypePriorModel):
    """The ASPP meta learner shared by the SVF paper's baseline and BAM's stage 2.

    concat(query mid-level, tiled prototype, prior) -> 1x1 merge -> ASPP (image pooling, 1x1,
    3x3 at ``aspp_rates``) -> 1x1 res1 -> two 3x3 res2 (residual) -> classifier
    (:meth:`aspp_logits`). How the K shots' prototypes and priors combine is the subclass's.

    Args:
        backbone: See :class:`~svfseg.models.fewshot.FewShotModel`.
        aspp_rates: Dilation rates of the ASPP 3x3 branches.
        **kwargs: Passed to :class:`~svfseg.models.heads.common.PrototypePriorModel`.
    """

    def __init__(self, backbone: nn.Module, *, aspp_rates: Sequence[int] = (6, 12, 18), **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        d = self.reduce_dim
        self.init_merge = conv_relu(2 * d + 1, d)
        self.aspp = ASPP(d, aspp_rates)
        self.res1 = conv_relu(self.aspp.out_channels, d)
        self.res2 = double_conv(d)
        self.cls = classifier(d, self.num_classes)

    def head_config(self) -> dict[str, Any]:
        return {**super().head_config(), "aspp_rates": list(self.aspp.rates)}

    def aspp_logits(self, query: torch.Tensor, prototype: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2, h, w) from query mid-level (B, D, h, w), prototype (B, D, 1, 1), prior (B, 1, h, w)."""
        x = torch.cat([query, prototype.expand(-1, -1, *query.shape[-2:]), prior], dim=1)
        x = self.res1(self.aspp(self.init_merge(x)))
        x = self.res2(x) + x
        return self.cls(x)


@register_model("baseline", recipe=PriorHeadRecipe())
class ASPPBaseline(ASPPMetaLearner):
    """ASPP few-shot baseline of the SVF paper (the authors' ``train_aspp`` model).

    The :class:`ASPPMetaLearner` on the combined prototype and prior; no auxiliary outputs.
    K shots: prototypes and priors are averaged by default; the authors' code sums them with
    unit weights (``shot_reduce="sum"``) and never trains ``down_query``
    (``train_down_query=False``), the values the baseline recipes set.
    """

    model_name = "baseline"

    def forward_head(self, feats: EpisodeFeatures) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        query, prototype, prior, _ = self.query_prototype_prior(feats)
        return self.aspp_logits(query, prototype, prior), ()
