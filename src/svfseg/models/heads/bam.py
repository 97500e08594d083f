"""BAM (Lang et al., CVPR 2022): ASPP meta learner + frozen PSPNet base learner + Gram-weighted ensemble."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svfseg.models.blocks import resize
from svfseg.models.fewshot import EpisodeFeatures, check_episode_shapes
from svfseg.models.heads.bam_recipe import BAMRecipe
from svfseg.models.heads.baseline import ASPPMetaLearner
from svfseg.models.heads.pspnet import PSPNet
from svfseg.models.outputs import FewShotOutput
from svfseg.models.registry import register_model

logger = logging.getLogger(__name__)

#: Added to the product of norms in the cosine Gram matrix (BAM's value).
GRAM_EPS = 1e-7


def gram_matrix(feat: torch.Tensor, eps: float = GRAM_EPS) -> torch.Tensor:
    """Cosine Gram matrix of the channels of ``feat``.

    Args:
        feat: Features (N, C, h, w).
        eps: Stabiliser added to the product of channel norms.

    Returns:
        (N, C, C): entry (i, j) is the cosine similarity of channels i and j over the pixels.
    """
    flat = feat.flatten(2)
    norms = flat.norm(dim=2, keepdim=True)
    return torch.bmm(flat, flat.transpose(1, 2)) / (torch.bmm(norms, norms.transpose(1, 2)) + eps)


def gram_discrepancy(query_feat: torch.Tensor, support_feat: torch.Tensor) -> torch.Tensor:
    """BAM's scene difference psi between the query and each support shot.

    ``psi = ||G_q - G_s||_F / ||1||_F`` with cosine Gram matrices G of low-level features and
    ``1`` the all-ones C x C matrix (so ``||1||_F = C``).

    Args:
        query_feat: Query features (B, C, h, w).
        support_feat: Support features (B, K, C, hs, ws).

    Returns:
        (B, K) discrepancies, float32 (computed outside autocast: psi is a small difference of
        large sums, which half precision would swamp).
    """
    b, k, c = support_feat.shape[:3]
    if query_feat.shape[:2] != (b, c):
        raise ValueError(
            f"gram_discrepancy: query features {tuple(query_feat.shape)} do not match support features "
            f"{tuple(support_feat.shape)} in batch size or channels"
        )
    with torch.autocast(device_type=query_feat.device.type, enabled=False):
        g_q = gram_matrix(query_feat.float()).unsqueeze(1)
        g_s = gram_matrix(support_feat.flatten(0, 1).float()).reshape(b, k, c, c)
        return (g_q - g_s).flatten(2).norm(dim=2) / float(c)


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming ``what`` and the first bad keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: given {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape:
        raise ValueError(
            f"{what} does not fit: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(shape)} with another shape (e.g. {shape[:3]})"
        )
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class BAMParts:
    """Everything BAM predicts for a batch, at the head resolution.

    Attributes:
        final: Ensemble output (B, 2, h, w): adjusted background fused with the base map, and
            the adjusted meta foreground. Used as logits (BAM applies CE to it directly).
        meta: Meta-learner logits (B, 2, h, w).
        base: Base-learner logits (B, 1 + num_base, h, w).
        base_map: Summed base-class probability (B, 1, h, w) that entered the fusion.
        psi: Shot-weighted Gram discrepancy (B,).
        shot_weights: Weights of the K shots (B, K), summing to 1.
    """

    final: torch.Tensor
    meta: torch.Tensor
    base: torch.Tensor
    base_map: torch.Tensor
    psi: torch.Tensor
    shot_weights: torch.Tensor


@register_model("bam", recipe=BAMRecipe())
class BAM(ASPPMetaLearner):
    """BAM few-shot segmentation model (stage 2), with the SVF regimes of the other heads.

    Meta learner: the ASPP head of the SVF baseline (prior + prototype + query mid-level
    features -> ASPP -> res blocks -> classifier) on ``self.backbone``, which SVF decomposes in
    the "svf" regime. Base learner: a frozen :class:`PSPNet` with its own, undecomposed copy of
    the stage-1 backbone. Ensemble: psi (Gram discrepancy of ``gram_stage`` features) enters a
    1x1 conv that adjusts the meta background and foreground maps (initialised to pass them
    through); the base map (summed base-class probability, minus the episode's own class when
    it is a base class) is fused with the adjusted background by another 1x1 conv (initialised
    to ignore it). K shots: psi values are sorted, mapped to weights by a small 1x1 network and
    a softmax, and weight the prototypes, priors and psi.

    Call it as the other models, plus ``class_ids`` (B,) benchmark class ids of the episodes,
    required in training (the base map must not contain the class being learned). Eval returns
    the ensemble output (B, 2, H, W); training a :class:`FewShotOutput` with the ensemble output
    and the meta-learner logits as auxiliary output (loss = final CE + meta CE).

    Args:
        backbone: Backbone with the stage-1 architecture; ``base_state`` overwrites its weights.
        base_classes: Benchmark ids of the fold's base classes; channel ``i + 1`` of the base
            learner is ``sorted(base_classes)[i]``.
        shot: K; the model accepts exactly K shots (the K-shot weighting network depends on K).
        base_state: State dict of the stage-1 :class:`PSPNet` (keys ``backbone.*``, ``ppm.*``,
            ``cls.*``). Loaded into the base learner and into the meta backbone before SVF
            decomposes it. None: random base learner (tests; or a stage-2 checkpoint follows).
        gram_stage: Backbone stage of the Gram matrices (BAM: layer2).
        kshot_dim: Hidden width of the K-shot weighting network (0: a single K x K 1x1 conv
            initialised to 1/K); unused for K = 1.
        ppm_bins: PPM bins of the base learner (must match stage 1).
        base_hidden: Classifier width of the base learner (must match stage 1).
        **kwargs: Passed to :class:`~svfseg.models.heads.baseline.ASPPMetaLearner`.
    """

    model_name = "bam"
    #: The engine passes the episodes' class ids (``class_ids=``) to models that set this.
    uses_class_ids = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        base_classes: Sequence[int],
        shot: int = 1,
        base_state: Mapping[str, torch.Tensor] | None = None,
        gram_stage: str = "layer2",
        kshot_dim: int = 2,
        ppm_bins: Sequence[int] = (1, 2, 3, 6),
        base_hidden: int = 512,
        **kwargs: Any,
    ) -> None:
        classes = tuple(sorted(int(c) for c in base_classes))
        if not classes or classes[0] < 1 or len(set(classes)) != len(classes):
            raise ValueError(f"bam: base_classes must be distinct positive class ids, got {list(base_classes)}")
        if int(shot) < 1:
            raise ValueError(f"bam: shot must be >= 1, got {shot}")
        if base_state is not None:
            # Before SVF decomposes it: the meta learner starts from the stage-1 backbone.
            backbone_state = {k[len("backbone."):]: v for k, v in base_state.items() if k.startswith("backbone.")}
            _load_strict(backbone, backbone_state, "bam: the stage-1 backbone weights")
        base_backbone = copy.deepcopy(backbone)
        super().__init__(backbone, **kwargs)
        if self.shot_reduce != "mean":
            raise ValueError(f"bam: shot_reduce={self.shot_reduce!r} does not apply (BAM weights its shots by psi)")
        if gram_stage not in self.feature_stages:
            raise ValueError(f"bam: gram_stage must be one of the stages read {list(self.feature_stages)}, "
                             f"got {gram_stage!r}")
        self.base_classes = classes
        self.shot = int(shot)
        self.gram_stage = gram_stage
        self.kshot_dim = int(kshot_dim)
        lut = torch.full((max(classes) + 1,), -1, dtype=torch.long)
        lut[list(classes)] = torch.arange(1, len(classes) + 1)
        self.register_buffer("channel_of_class", lut, persistent=False)

        self.base_learner = PSPNet(
            base_backbone,
            num_classes=len(classes) + 1,
            regime="frozen",
            backbone_name=self.backbone_name,
            ppm_bins=ppm_bins,
            hidden=base_hidden,
        )
        if base_state is not None:
            _load_strict(self.base_learner, base_state, "bam: the stage-1 base learner")
        from svfseg.models.backbones import freeze_batchnorm

        freeze_batchnorm(self.base_learner)
        self.base_learner.requires_grad_(False)

        # Both 1x1 convs start as "take the first input, ignore the second" (pass-through).
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            for conv in (self.gram_merge, self.cls_merge):
                conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        self.kshot_rw: nn.Module | None = None
        if self.shot > 1:
            if self.kshot_dim == 0:
                self.kshot_rw = nn.Conv2d(self.shot, self.shot, 1, bias=False)
                nn.init.constant_(self.kshot_rw.weight, 1.0 / self.shot)
            else:
                self.kshot_rw = nn.Sequential(
                    nn.Conv2d(self.shot, self.kshot_dim, 1),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(self.kshot_dim, self.shot, 1),
                )
        self.train(self.training)

    # -- bookkeeping -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> BAM:
        """Set train/eval mode; the frozen base learner (and the backbone's BN) stay in eval mode."""
        super().train(mode)
        if hasattr(self, "base_learner"):
            self.base_learner.eval()
        return self

    def head_config(self) -> dict[str, Any]:
        return {
            **super().head_config(),
            "base_classes": list(self.base_classes),
            "shot": self.shot,
            "gram_stage": self.gram_stage,
            "kshot_dim": self.kshot_dim if self.shot > 1 else None,
            "base_learner": self.base_learner.head_config(),
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["shot_independent"] = False  # the K-shot weighting network is built for one K
        return d

    def base_channels(self, class_ids: torch.Tensor | Sequence[int], *, strict: bool) -> list[int]:
        """Base-learner channel of each episode class (0 where the class is not a base class).

        Args:
            class_ids: (B,) benchmark class ids.
            strict: Raise when a class is not a base class (training: episodes are base classes).

        Returns:
            B channel indices in 1..num_base, or 0 for non-base classes when not strict.
        """
        ids = [int(c) for c in (class_ids.tolist() if torch.is_tensor(class_ids) else class_ids)]
        lut = self.channel_of_class.tolist()
        channels = [lut[c] if 0 <= c < len(lut) else -1 for c in ids]
        if strict and any(ch < 0 for ch in channels):
            bad = sorted({c for c, ch in zip(ids, channels) if ch < 0})
            raise ValueError(f"bam: training episodes must be of base classes {list(self.base_classes)}; "
                             f"got class ids {bad}")
        return [max(ch, 0) for ch in channels]

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        class_ids: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor | FewShotOutput:
        """Segment the query given K annotated supports.

        Args:
            query_img: (B, 3, H, W) normalised query images.
            support_imgs: (B, K, 3, Hs, Ws) normalised support images, K = ``shot``.
            support_masks: (B, K, Hs, Ws) labels in {0, 1, 255}.
            class_ids: (B,) benchmark class ids of the episodes; required in training.

        Returns:
            Eval: ensemble output (B, 2, H, W). Train: :class:`FewShotOutput` (ensemble output,
            aux = (meta logits,)), all at (H, W).
        """
        parts = self.forward_parts(query_img, support_imgs, support_masks, class_ids)
        size = query_img.shape[-2:]
        final = resize(parts.final, size)
        if not self.training:
            return final
        return FewShotOutput(logits=final, aux_logits=(resize(parts.meta, size),))

    def forward_parts(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        class_ids: torch.Tensor | Sequence[int] | None = None,
    ) -> BAMParts:
        """Meta, base and ensemble predictions at the head resolution (see :meth:`forward`)."""
        check_episode_shapes(query_img, support_imgs, support_masks)
        b, k = support_imgs.shape[:2]
        if k != self.shot:
            raise ValueError(f"bam: this model was built for {self.shot}-shot episodes, got K={k} "
                             f"(BAM's K-shot weighting depends on K; build it with shot={k})")
        if self.training and class_ids is None:
            raise ValueError("bam: training needs class_ids (the episodes' base-class ids), so the base map "
                             "can leave out the class being learned")
        if class_ids is not None and len(class_ids) != b:
            raise ValueError(f"bam: class_ids has {len(class_ids)} entries for a batch of {b}")
        feats = self.extract_features(query_img, support_imgs, support_masks)
        meta, psi, weights = self._meta_learner(feats)
        size = meta.shape[-2:]
        with torch.no_grad():
            base = self.base_learner.classify(self.base_learner.features(query_img))
        base = resize(base, size)
        base_prob = base.softmax(1)
        if class_ids is None:
            base_map = base_prob[:, 1:].sum(1, keepdim=True)
        else:
            keep = torch.ones(b, base.shape[1], dtype=base_prob.dtype, device=base_prob.device)
            keep[:, 0] = 0
            channels = self.base_channels(class_ids, strict=self.training)
            keep[torch.arange(b), torch.tensor(channels)] = 0  # channel 0 for a novel class: already 0
            base_map = (base_prob * keep[:, :, None, None]).sum(1, keepdim=True)
        final = self._ensemble(meta, psi, base_map.to(meta.dtype))
        return BAMParts(final=final, meta=meta, base=base, base_map=base_map, psi=psi, shot_weights=weights)

    @staticmethod
    def generalized_prediction(final: torch.Tensor, base: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
        """BAM's generalized (base + novel) labels from ensemble and base logits: see :func:`generalized_prediction`."""
        return generalized_prediction(final, base, tau)

    def _meta_learner(self, feats: EpisodeFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Meta logits (B, 2, h, w), the weighted psi (B,) and the shot weights (B, K)."""
        query, prototypes, priors, size = self.shot_inputs(feats)
        priors = resize(priors, size)
        # BAM takes the Gram matrices after bringing each image's mid stages to its feature_stage
        # size (a no-op unless that stage is coarser than gram_stage: VGG at layer3's stride 16).
        sup = feats.support[self.gram_stage]
        sup_size = feats.support[self.feature_stage].shape[-2:]
        sup = resize(sup.flatten(0, 1), sup_size).unflatten(0, sup.shape[:2])
        psi_shots = gram_discrepancy(resize(feats.query[self.gram_stage], size), sup)
        weights = self.shot_weights(psi_shots)
        prototype = (weights[:, :, None, None, None] * prototypes).sum(1)
        prior = (weights[:, :, None, None] * priors).sum(1, keepdim=True)
        psi = (weights * psi_shots).sum(1)
        return self.aspp_logits(query, prototype, prior), psi, weights

    def shot_weights(self, psi: torch.Tensor) -> torch.Tensor:
        """Shot weights from the per-shot psi (B, K): sorted psi -> weighting net -> softmax.

        The network sees the psi values in increasing order, so its output for each rank is
        mapped back to the shot holding that rank. One shot: weight 1.
        """
        b, k = psi.shape
        if k == 1 or self.kshot_rw is None:
            return torch.ones_like(psi)
        ordered, order = psi.sort(dim=1)
        rank = order.argsort(dim=1)
        scores = self.kshot_rw(ordered.reshape(b, k, 1, 1)).reshape(b, k)
        return scores.gather(1, rank).softmax(dim=1)

    def _ensemble(self, meta: torch.Tensor, psi: torch.Tensor, base_map: torch.Tensor) -> torch.Tensor:
        prob = meta.softmax(1)
        psi_map = psi.reshape(-1, 1, 1, 1).to(prob.dtype).expand_as(prob[:, :1])
        bg = self.gram_merge(torch.cat([prob[:, :1], psi_map], dim=1))
        fg = self.gram_merge(torch.cat([prob[:, 1:], psi_map], dim=1))
        merged_bg = self.cls_merge(torch.cat([bg, base_map], dim=1))
        return torch.cat([merged_bg, fg], dim=1)


def generalized_prediction(final: torch.Tensor, base: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """BAM's generalized (base + novel) prediction: the novel class where the ensemble is sure.

    A pixel is the episode's novel class (label ``num_base + 1``) where
    ``softmax(final)[:, 1] > tau``; elsewhere it takes the base learner's arg-max (background
    or a base class). This is BAM's "final" fusion scheme.

    Args:
        final: Ensemble output (B, 2, H, W).
        base: Base-learner logits (B, 1 + num_base, H, W), same size.
        tau: Threshold on the novel-class probability (BAM: 0.9).

    Returns:
        (B, H, W) long labels in 0..num_base + 1.
    """
    if final.shape[0] != base.shape[0] or final.shape[-2:] != base.shape[-2:]:
        raise ValueError(f"generalized_prediction: final {tuple(final.shape)} and base {tuple(base.shape)} differ")
    novel = final.float().softmax(1)[:, 1] > tau
    out = base.argmax(1)
    out[novel] = base.shape[1]
    return out
