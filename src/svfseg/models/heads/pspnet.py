"""PSPNet base learner of BAM (stage 1): dilated backbone, pyramid pooling, multi-class classifier."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from svfseg.models.blocks import PPM, resize
from svfseg.models.heads.bam_recipe import BaseLearnerRecipe
from svfseg.models.regimes import Settings, get_regime
from svfseg.regimes import WHOLE_BACKBONE_REGIME, names_where
from svfseg.models.registry import register_model

logger = logging.getLogger(__name__)

#: Regimes of the base learner: stage 1 trains without SVF (the whole backbone or none of it).
BASE_REGIMES = names_where(staged=False)


def pspnet_classifier(in_channels: int, num_classes: int, hidden: int = 512, dropout: float = 0.1) -> nn.Sequential:
    """3x3 conv (no bias) -> BN -> ReLU -> Dropout2d -> 1x1 conv with bias: PSPNet's classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
        nn.Conv2d(hidden, num_classes, 1),
    )


@register_model("bam_base", recipe=BaseLearnerRecipe())
class PSPNet(nn.Module):
    """PSPNet semantic segmenter over background + the base classes of a fold (BAM's base learner).

    ``backbone.layer4`` -> PPM (bins 1/2/3/6, each ``C / len(bins)`` channels, so the PPM
    output has ``2 C`` channels) -> 3x3 conv to ``hidden`` + BN + ReLU + Dropout2d -> 1x1 conv
    to ``num_classes``. Channel 0 is background; channel ``i`` is the ``i``-th base class in
    increasing benchmark id.

    Unlike the few-shot models, the whole network (backbone BatchNorm included) trains in
    stage 1, as in BAM; ``train_bn=False`` keeps the backbone BatchNorm frozen instead (small
    batches). Call it as ``model(images) -> logits (B, num_classes, H, W)`` at the input
    resolution, in both modes (no loss inside the model).

    Args:
        backbone: A ``svfseg.models.backbones.Backbone``.
        num_classes: Output channels, background included (16 on Pascal-5i, 61 on COCO-20i).
        regime: a regime that trains no stages (``names_where(staged=False)``): the whole
            backbone (the BAM recipe, and the default) or none of it (only PPM and classifier train).
        svf_policy: Must be None (stage 1 does not use SVF).
        backbone_name: Name recorded by :meth:`describe`.
        ppm_bins: Output sizes of the pyramid pooling.
        hidden: Channels of the classifier's 3x3 conv.
        dropout: Dropout2d before the last 1x1 conv.
        train_bn: With regime="full", let the backbone BatchNorm layers update their
            statistics and affine parameters (BAM). False freezes them.
    """

    model_name = "bam_base"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        regime: str | None = None,
        svf_policy: Any = None,
        backbone_name: str | None = None,
        ppm_bins: Sequence[int] = (1, 2, 3, 6),
        hidden: int = 512,
        dropout: float = 0.1,
        train_bn: bool = True,
    ) -> None:
        super().__init__()
        kind = get_regime(WHOLE_BACKBONE_REGIME if regime is None else regime, where="bam_base")
        if kind.name not in BASE_REGIMES:
            raise ValueError(
                f"bam_base: regime must be one of {BASE_REGIMES} (stage 1 does not use SVF; "
                f"set model.regime=full), got {kind.name!r}"
            )
        if svf_policy is not None:
            raise ValueError("bam_base: svf_policy given, but the base learner is trained without SVF")
        if int(num_classes) < 2:
            raise ValueError(f"bam_base: num_classes must be >= 2 (background + base classes), got {num_classes}")
        for attr in ("stage_channels", "forward_stages"):
            if not hasattr(backbone, attr):
                raise TypeError(f"bam_base: backbone {type(backbone).__name__} has no `{attr}`; expected a Backbone")
        self.backbone = backbone
        self.backbone_name = backbone_name or getattr(backbone, "name", None) or type(backbone).__name__
        self.regime = kind.name
        self.num_classes = int(num_classes)
        self.ppm_bins = tuple(int(b) for b in ppm_bins)
        self.hidden = int(hidden)
        self.train_bn = bool(train_bn) and kind.spec.whole_backbone
        channels = backbone.stage_channels["layer4"]
        self.ppm = PPM(channels, max(1, channels // len(self.ppm_bins)), self.ppm_bins)
        self.cls = pspnet_classifier(self.ppm.out_channels, self.num_classes, self.hidden, dropout)
        self._configure_backbone()

    def _configure_backbone(self) -> None:
        # BAM's stage 1 trains the backbone BatchNorm (statistics and affine) with train_bn; without
        # it BatchNorm stays frozen, affine parameters included (BAM never trains them under fixed statistics).
        get_regime(self.regime).configure_backbone(self.backbone, Settings(), batchnorm=self._batchnorm)
        self.train(self.training)

    @property
    def _batchnorm(self) -> str:
        return "trains" if self.train_bn else "fixed"

    def train(self, mode: bool = True) -> PSPNet:
        """Set train/eval mode; the regime sets the backbone's (a frozen backbone stays in eval mode as a whole)."""
        super().train(mode)
        get_regime(self.regime).apply_mode(self.backbone, mode, batchnorm=self._batchnorm)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone ``layer4`` features of ``images`` (B, C, h, w)."""
        return self.backbone.forward_stages(images, ("layer4",))["layer4"]

    def classify(self, layer4: torch.Tensor) -> torch.Tensor:
        """PPM + classifier on ``layer4`` features -> logits (B, num_classes, h, w)."""
        return self.cls(self.ppm(layer4))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Segment ``images`` (B, 3, H, W) into logits (B, num_classes, H, W)."""
        if images.dim() != 4:
            raise ValueError(f"bam_base: expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        if not get_regime(self.regime).spec.backbone_grad:
            with torch.no_grad():
                feats = self.features(images)
        else:
            feats = self.features(images)
        return resize(self.classify(feats), images.shape[-2:])

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters: "backbone" and "head" (PPM + classifier); lrs from ``optim.lr_mult``."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for p in self.parameters():
            if p.requires_grad:
                groups["backbone" if id(p) in backbone_ids else "head"].append(p)
        return [{"name": k, "params": v} for k, v in groups.items() if v]

    def head_config(self) -> dict[str, Any]:
        """Hyper-parameters that change the architecture."""
        return {"ppm_bins": list(self.ppm_bins), "hidden": self.hidden, "train_bn": self.train_bn}

    def describe(self) -> dict[str, Any]:
        """Metadata that decides checkpoint compatibility (JSON-serialisable)."""
        return {
            "name": self.model_name,
            "backbone": self.backbone_name,
            "backbone_strides": dict(getattr(self.backbone, "stage_strides", {})),
            "regime": self.regime,
            "svf_policy": None,
            "num_classes": self.num_classes,
            "head": self.head_config(),
        }
