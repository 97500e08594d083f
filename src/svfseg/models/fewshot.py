"""Few-shot model base: one shared backbone pass for query and supports, regimes, param groups."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from svfseg.models.blocks import foreground, resize
from svfseg.models.outputs import FewShotOutput
from svfseg.models.regimes import Settings, get_regime
from svfseg.policies import LoRAConfig, SVFPolicy
from svfseg.svf import trained_factor_parameters

logger = logging.getLogger(__name__)


@dataclass
class EpisodeFeatures:
    """Backbone features of one batch of episodes.

    Attributes:
        query: Stage name -> query features (B, C, h, w).
        support: Stage name -> support features (B, K, C, h, w). Stages from the model's
            ``masked_support_stage`` on were computed from mask-multiplied inputs.
        support_fg: Support foreground masks (B, K, H, W), float in {0, 1}.
    """

    query: dict[str, torch.Tensor]
    support: dict[str, torch.Tensor]
    support_fg: torch.Tensor

    @property
    def shots(self) -> int:
        """Number of support shots K."""
        return self.support_fg.shape[1]


@dataclass
class ImageFeatures:
    """Backbone features of N images, each usable as a query and as a support (see ``FewShotModel.image_features``).

    Attributes:
        unmasked: Stage name -> (N, C, h, w) features of the plain images (the query role, and the
            support role before ``masked_support_stage``).
        masked: Stage name -> (N, C, h, w) features from ``masked_support_stage`` on, each image
            multiplied by its own foreground mask (the support role).
        fg: (N, H, W) foreground masks, float in {0, 1}.
    """

    unmasked: dict[str, torch.Tensor]
    masked: dict[str, torch.Tensor]
    fg: torch.Tensor

    def episodes(self, stages: Sequence[str], query: Sequence[int], supports: Sequence[Sequence[int]]) -> EpisodeFeatures:
        """The features of the episodes whose query is image ``query[b]`` and whose supports are ``supports[b]``."""
        q = torch.as_tensor(list(query), device=self.fg.device)
        s = torch.as_tensor([list(row) for row in supports], device=self.fg.device)
        support_of = {st: self.masked.get(st, self.unmasked.get(st)) for st in stages}
        return EpisodeFeatures(query={st: self.unmasked[st][q] for st in stages},
                               support={st: support_of[st][s] for st in stages}, support_fg=self.fg[s])


class FewShotModel(nn.Module):
    """Base of the few-shot segmentation models: backbone regimes and the shared backbone pass.

    Subclasses build their head in ``__init__`` (after calling this one) and implement
    :meth:`forward_head`. The call signature is shared by every model::

        model(query_img (B,3,H,W), support_imgs (B,K,3,H,W), support_masks (B,K,H,W) in {0,1,255})

    In eval mode it returns logits (B, 2, H, W) at the query resolution; in train mode a
    :class:`FewShotOutput` that also carries the auxiliary logits. K is free at every call.

    Args:
        backbone: A ``svfseg.models.backbones.Backbone`` (stages ``layer0``..``layer4`` with
            ``stage_channels``, ``stage_strides`` and ``forward_stages``).
        regime: A name declared in ``svfseg.regimes`` (default "frozen": no backbone gradient, the
            backbone runs under no_grad; "svf": only singular values of ``svf_policy``'s stages
            train; "full": full fine-tune; peers "bitfit" | "bn" | "last_stage" | "lora").
            BatchNorm stays in eval mode in every regime.
        svf_policy: Policy for "svf"; defaults to :class:`SVFPolicy` (the paper's). Its
            ``stages`` are also the stages "bitfit", "bn", "last_stage" and "lora" train.
        lora: LoRA settings for regime "lora" (default :class:`~svfseg.policies.LoRAConfig`).
        backbone_name: Name recorded by :meth:`describe` (``create_model`` passes it).
        batch_backbone: Run query and supports through the backbone as one batch when their
            sizes match (one pass per stage instead of two).
    """

    #: Registry name, set by the subclass.
    model_name: ClassVar[str] = ""
    #: Backbone stages the head reads.
    feature_stages: ClassVar[tuple[str, ...]] = ("layer2", "layer3", "layer4")
    #: Support input of this stage is multiplied by the support mask first (PFENet/BAM:
    #: layer4 sees only the foreground of the support). None: no masking.
    masked_support_stage: ClassVar[str | None] = "layer4"
    num_classes: ClassVar[int] = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        regime: str | None = None,
        svf_policy: SVFPolicy | None = None,
        backbone_name: str | None = None,
        batch_backbone: bool = True,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        kind = get_regime(regime, where=type(self).__name__)
        settings = kind.settings(svf_policy, lora)
        for attr in ("stage_names", "stage_channels", "forward_stages"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone {type(backbone).__name__} has no `{attr}`; expected a Backbone")
        missing = [s for s in self._needed_stages() if s not in backbone.stage_names]
        if missing:
            raise ValueError(f"{type(self).__name__} needs stages {missing}; backbone has {backbone.stage_names}")
        self.backbone = backbone
        self.backbone_name = backbone_name or getattr(backbone, "name", None) or type(backbone).__name__
        self.regime = kind.name
        # The policy as applied (SVF: BN folding resolved); None for regimes that take none.
        self.svf_policy = settings.policy
        self.lora = settings.lora
        self.batch_backbone = bool(batch_backbone)
        self._configure_backbone()

    # -- regimes -----------------------------------------------------------------------------
    def _needed_stages(self) -> list[str]:
        stages = list(self.feature_stages)
        if self.masked_support_stage is not None:
            stages.append(self.masked_support_stage)
        return stages

    def _configure_backbone(self) -> None:
        get_regime(self.regime).configure_backbone(self.backbone, Settings(self.svf_policy, self.lora))
        self.train(self.training)

    def train(self, mode: bool = True) -> FewShotModel:
        """Set train/eval mode; the backbone's BatchNorm layers always stay in eval mode.

        A frozen or SVF backbone is put in eval mode as a whole (no dropout / drop-path
        either); a fully fine-tuned one only has its BatchNorm layers in eval mode.
        """
        super().train(mode)
        get_regime(self.regime).set_mode(self.backbone, self.training)
        return self

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split for the optimiser.

        Returns:
            Non-empty groups among ``{"name": "svf" | "backbone" | "head", "params": [...]}``:
            "svf" holds the trained SVD factors (the singular values; U / Vh too with ``svf.train``),
            "backbone" any other trainable backbone parameter (full fine-tune, or BN/bias under an
            SVF policy), "head" the rest. Only parameters
            with ``requires_grad`` appear. The optimiser sets each group's lr from
            ``optim.lr_mult[name]``.
        """
        svf_ids = {id(p) for _, p in trained_factor_parameters(self.backbone)}  # none outside regime "svf"
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"svf": [], "backbone": [], "head": []}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            key = "svf" if id(p) in svf_ids else "backbone" if id(p) in backbone_ids else "head"
            groups[key].append(p)
        return [{"name": k, "params": v} for k, v in groups.items() if v]

    def describe(self) -> dict[str, Any]:
        """Metadata that decides checkpoint compatibility (JSON-serialisable).

        Models are shot-independent: the same weights serve any K.
        """
        return {
            "name": self.model_name,
            "backbone": self.backbone_name,
            "backbone_strides": dict(getattr(self.backbone, "stage_strides", {})),
            # only when not the default, so descriptions written before the option still match
            **({"backbone_dilation_style": self.backbone.dilation_style}
               if getattr(self.backbone, "dilation_style", "pspnet") != "pspnet" else {}),
            "regime": self.regime,
            "svf_policy": self.svf_policy.to_dict() if self.svf_policy is not None else None,
            **({"lora": dataclasses.asdict(self.lora)} if self.lora is not None else {}),
            "num_classes": self.num_classes,
            "shot_independent": True,
            "head": self.head_config(),
        }

    def head_config(self) -> dict[str, Any]:
        """Head hyper-parameters that change the architecture (for :meth:`describe`)."""
        return {}

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor
    ) -> torch.Tensor | FewShotOutput:
        """Segment the query given K annotated supports.

        Args:
            query_img: (B, 3, H, W) normalised query images.
            support_imgs: (B, K, 3, Hs, Ws) normalised support images.
            support_masks: (B, K, Hs, Ws) labels in {0, 1, 255}; only 1 is foreground.

        Returns:
            Eval: logits (B, 2, H, W). Train: :class:`FewShotOutput` with logits and
            auxiliary logits, all at (H, W).
        """
        check_episode_shapes(query_img, support_imgs, support_masks)
        feats = self.extract_features(query_img, support_imgs, support_masks)
        logits, aux = self.forward_head(feats)
        size = query_img.shape[-2:]
        logits = resize(logits, size)
        if not self.training:
            return logits
        return FewShotOutput(logits=logits, aux_logits=tuple(resize(a, size) for a in aux))

    def forward_head(self, feats: EpisodeFeatures) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
        """Head computation on backbone features.

        Returns:
            Main logits and auxiliary logits at any resolution (the caller resizes them).
        """
        raise NotImplementedError

    def _backbone_context(self) -> contextlib.AbstractContextManager:
        # Frozen backbone: no graph at all, so the frozen regime costs what PFENet costs. A backbone
        # given something to train after it was built (test-time adaptation) runs with a graph.
        grad = get_regime(self.regime).spec.backbone_grad or any(p.requires_grad for p in self.backbone.parameters())
        return contextlib.nullcontext() if grad else torch.no_grad()

    def extract_features(
        self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor
    ) -> EpisodeFeatures:
        """Run query and supports through the (shared) backbone.

        Stages before ``masked_support_stage`` see the raw images; the support input of
        that stage is multiplied by the support foreground mask (resized bilinearly).
        """
        b, k = support_imgs.shape[:2]
        fg = foreground(support_masks, dtype=query_img.dtype)
        names = list(self.backbone.stage_names)
        wanted = sorted(set(self.feature_stages), key=names.index)
        masked = self.masked_support_stage
        split = names.index(masked) if masked is not None else len(names)
        early = [s for s in wanted if names.index(s) < split]
        late = [s for s in wanted if names.index(s) >= split]
        q_in, s_in = query_img, support_imgs.flatten(0, 1)
        q_out: dict[str, torch.Tensor] = {}
        s_out: dict[str, torch.Tensor] = {}
        with self._backbone_context():
            feeder = [names[split - 1]] if late and split > 0 else []  # input of the masked stage
            if early or feeder:
                need = sorted(set(early) | set(feeder), key=names.index)
                q_out, s_out = self._run_pair(q_in, s_in, need, start=names[0])
                if feeder:
                    q_in, s_in = q_out[feeder[0]], s_out[feeder[0]]
            if late:
                s_in = s_in * resize(fg.flatten(0, 1).unsqueeze(1), s_in.shape[-2:])
                q_late, s_late = self._run_pair(q_in, s_in, late, start=names[split])
                q_out.update(q_late)
                s_out.update(s_late)
        query = {s: q_out[s] for s in wanted}
        support = {s: s_out[s].reshape(b, k, *s_out[s].shape[1:]) for s in wanted}
        return EpisodeFeatures(query=query, support=support, support_fg=fg)

    def image_features(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        *,
        keep: Sequence[str] = (),
        reuse: ImageFeatures | None = None,
        start: str | None = None,
    ) -> ImageFeatures:
        """Each image's backbone features both as a query and as a support (with its own mask), in one pass.

        What :meth:`extract_features` computes for an episode, per image instead: the stages before
        ``masked_support_stage`` run once and serve both roles; only the masked stages run twice.
        Test-time adaptation builds its leave-one-out pseudo-episodes from these (each support the
        query of the others) instead of running the backbone K - 1 times per image.

        Args:
            images: (N, 3, H, W) normalised images.
            masks: (N, H, W) labels in {0, 1, 255}; only 1 is foreground.
            keep: Extra stages whose (unmasked) outputs to keep, e.g. the input of ``start`` for a later call.
            reuse: Features of the same images from an earlier call: stages before ``start`` are taken
                from it instead of being run (they must not have changed since).
            start: First stage to run when ``reuse`` is given; at most ``masked_support_stage``.

        Returns:
            The features; run under the caller's grad mode (no backbone-context switch here).
        """
        names = list(self.backbone.stage_names)
        wanted = sorted(set(self.feature_stages), key=names.index)
        split = names.index(self.masked_support_stage) if self.masked_support_stage is not None else len(names)
        late = [s for s in wanted if names.index(s) >= split]
        feeder = names[split - 1] if late and split > 0 else None
        need = sorted(set(wanted) | set(keep) | ({feeder} if feeder else set()), key=names.index)
        begin = 0
        out: dict[str, torch.Tensor] = {}
        if reuse is not None:
            begin = names.index(start) if start is not None else len(names)
            if late and begin > split:
                raise ValueError(f"image_features: start={start!r} is past the masked stage "
                                 f"{self.masked_support_stage!r}; the masked stages cannot be reused")
            out = {s: reuse.unmasked[s] for s in need if names.index(s) < begin}
            if begin == len(names) or not late and all(names.index(s) < begin for s in need):
                return ImageFeatures(out, reuse.masked, reuse.fg)
        fg = foreground(masks, dtype=images.dtype)
        early = [s for s in need if begin <= names.index(s) < split]
        if early:
            x = images if begin == 0 else reuse.unmasked[names[begin - 1]]
            out.update(self.backbone.forward_stages(x, early, start=names[begin]))
        masked: dict[str, torch.Tensor] = {}
        if late:
            # the masked stages see each image twice, plain (query role) and masked (support role): one batch
            post = [s for s in need if names.index(s) >= split]
            x = out[feeder] if feeder else images
            n = x.shape[0]
            both = self.backbone.forward_stages(torch.cat([x, x * resize(fg.unsqueeze(1), x.shape[-2:])]),
                                                sorted(set(post) | set(late), key=names.index), start=names[split])
            out.update({s: v[:n] for s, v in both.items() if s in post})
            masked = {s: both[s][n:] for s in late}
        return ImageFeatures(out, masked, fg)

    def _run_pair(
        self, q: torch.Tensor, s: torch.Tensor, stages: Iterable[str], start: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        stages = list(stages)
        if self.batch_backbone and q.shape[1:] == s.shape[1:]:
            out = self.backbone.forward_stages(torch.cat([q, s], dim=0), stages, start=start)
            n = q.shape[0]
            return {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}
        return (
            self.backbone.forward_stages(q, stages, start=start),
            self.backbone.forward_stages(s, stages, start=start),
        )


def check_episode_shapes(query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the offending tensor when an episode batch is malformed."""
    if query_img.dim() != 4:
        raise ValueError(f"query_img: expected (B, 3, H, W), got shape {tuple(query_img.shape)}")
    if support_imgs.dim() != 5:
        raise ValueError(f"support_imgs: expected (B, K, 3, H, W), got shape {tuple(support_imgs.shape)}")
    if support_masks.dim() != 4:
        raise ValueError(f"support_masks: expected (B, K, H, W), got shape {tuple(support_masks.shape)}")
    b = query_img.shape[0]
    if support_imgs.shape[0] != b or support_masks.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: query_img {b}, support_imgs {support_imgs.shape[0]}, "
            f"support_masks {support_masks.shape[0]}"
        )
    if support_imgs.shape[1] < 1 or support_imgs.shape[1] != support_masks.shape[1]:
        raise ValueError(
            f"shots differ or are zero: support_imgs K={support_imgs.shape[1]}, "
            f"support_masks K={support_masks.shape[1]}"
        )
    if support_imgs.shape[-2:] != support_masks.shape[-2:]:
        raise ValueError(
            f"support_imgs size {tuple(support_imgs.shape[-2:])} != "
            f"support_masks size {tuple(support_masks.shape[-2:])}"
        )
    if support_imgs.shape[2] != query_img.shape[1]:
        raise ValueError(f"channels differ: query_img {query_img.shape[1]}, support_imgs {support_imgs.shape[2]}")
