"""`EpisodeAdapter`: fine-tune what ``adapt.params`` declares on one episode's supports, predict, restore exactly."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch

from svfseg.engine.adapt.pseudo import SupportBank, make_bank
from svfseg.engine.adapt.targets import prepare_model
from svfseg.engine.losses import cross_entropy_sum, valid_pixel_count
from svfseg.models.blocks import resize
from svfseg.models.fewshot import FewShotModel, ImageFeatures
from svfseg.policies import AdaptSettings, LoRAConfig, SVFPolicy
from svfseg.regimes import adapt_parts

#: ``on_step(step)`` is called after optimiser step ``step`` (1-based) of an adaptation.
StepHook = Callable[[int], None]


class EpisodeAdapter:
    """Adapts a working copy of a few-shot model to one episode at a time.

    Per episode: :meth:`reset` (the trained parameters copied back in place, the optimiser's state
    cleared), :meth:`adapt` on the supports, :meth:`predict` the query. The user's model is never
    touched; the copy is prepared once (``targets.prepare_model``).

    Heads that compute through :meth:`FewShotModel.forward_head` (baseline, PFENet, registered toy
    heads) take the fast path: each support image's backbone features are computed once per step
    (``FewShotModel.image_features``) and shared by every pseudo-episode, and the backbone stages
    before the first one that trains run once per episode. A head that overrides ``forward`` (BAM)
    runs each pseudo-episode as a whole forward pass.

    Args:
        model: The loaded model (eval mode; left unchanged).
        settings: ``params``, ``optimizer``, ``augment``, ``batch`` (``steps``/``lr`` are given per call).
        policy: The ``svf:`` policy whose stages the staged choices train.
        lora: The ``lora:`` section.
    """

    def __init__(self, model: FewShotModel, settings: AdaptSettings, *, policy: SVFPolicy, lora: LoRAConfig) -> None:
        self.settings = settings
        self.parts = adapt_parts(settings.params)
        self.model, named = prepare_model(model, self.parts, policy=policy, lora=lora)
        self.parameter_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._start = [p.detach().clone() for p in self.params]
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if self.params:
            self.optimizer = (torch.optim.Adam(self.params, lr=1e-3) if settings.optimizer == "adam"
                              else torch.optim.SGD(self.params, lr=1e-3, momentum=0.9))
        self.fast = type(self.model).forward is FewShotModel.forward
        fixed = not self.model.describe().get("shot_independent", True)
        self.fixed_shot: Optional[int] = getattr(self.model, "shot", None) if fixed else None
        self._first_trained = self._first_trained_stage()
        self.batched_runner = None  # a BatchedSVFAdapter made from this adapter (batched.runner_for), kept for reuse

    @property
    def trainable_count(self) -> int:
        """The number of values that adapt."""
        return sum(p.numel() for p in self.params)

    def _first_trained_stage(self) -> Optional[int]:
        """Index of the first backbone stage holding a trained parameter (None: nothing of the backbone trains)."""
        names = list(self.model.backbone.stage_names)
        trained = [n.split(".")[1] for n in self.parameter_names if n.startswith("backbone.")]
        hits = [names.index(s) for s in trained if s in names]
        if not hits and trained:
            return 0  # a backbone parameter outside the named stages: run everything
        return min(hits) if hits else None

    def reset(self) -> None:
        """Put every trained parameter back to its starting value (in place) and clear the optimiser's state."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self._start):
                p.copy_(p0)  # bumps the version counter the SVD layers' weight cache keys on
                p.grad = None
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def adapt(self, support_imgs: torch.Tensor, support_masks: torch.Tensor, class_id: Optional[int], *, steps: int,
              lr: float,
              generator: torch.Generator, on_step: Optional[StepHook] = None) -> list[float]:
        """Fine-tune on one episode's supports for ``steps`` steps; the loss of each step.

        Args:
            support_imgs: (K, 3, H, W) normalised supports.
            support_masks: (K, H, W) labels in {0, 1, 255}.
            class_id: The episode's class (models that take class ids, e.g. BAM, get it; None: unknown, e.g. a
                user's own images).
            steps: Optimiser steps (0: nothing happens).
            lr: Learning rate.
            generator: Randomness of the augmented copies.
            on_step: Called after each step with its 1-based number (e.g. to score intermediate counts).
        """
        if steps <= 0 or self.optimizer is None:
            return []
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        bank = make_bank(support_imgs, support_masks, augment=self.settings.augment, generator=generator,
                         fixed_shot=self.fixed_shot)
        cached = self._frozen_features(bank) if self.fast else None
        losses = []
        with torch.enable_grad():
            for step in range(steps):
                chosen = self._batch(bank, step)
                loss = self._loss(bank, chosen, cached, class_id)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(step + 1)
        return losses

    @torch.no_grad()
    def predict(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                class_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, 2, H, W) of the adapted model, as `svfseg test` calls a model."""
        if getattr(self.model, "uses_class_ids", False) and class_ids is not None:
            return self.model(query_img, support_imgs, support_masks, class_ids=class_ids)
        return self.model(query_img, support_imgs, support_masks)

    # -- one step ----------------------------------------------------------------------------
    def _batch(self, bank: SupportBank, step: int) -> list[int]:
        n, b = len(bank.episodes), self.settings.batch
        if not b or b >= n:
            return list(range(n))
        return [(step * b + i) % n for i in range(b)]

    def _frozen_features(self, bank: SupportBank) -> ImageFeatures:
        """Features of the stages before the first trained one (all of them if the backbone does not train)."""
        names = self.model.backbone.stage_names
        keep = (names[self._first_trained - 1],) if self._first_trained else ()
        with torch.no_grad():
            return self.model.image_features(bank.images, bank.masks, keep=keep)

    def _loss(self, bank: SupportBank, chosen: Sequence[int], cached: Optional[ImageFeatures],
              class_id: Optional[int]):
        """Cross-entropy of the model's predictions on the chosen pseudo-episodes (mean over labelled pixels)."""
        episodes = [bank.episodes[i] for i in chosen]
        groups: dict[int, list] = {}
        for e in episodes:  # pseudo-episodes with as many supports are one batch
            groups.setdefault(len(e.supports), []).append(e)
        size = bank.images.shape[-2:]
        total, pixels = 0.0, 0.0
        feats = None
        if self.fast:
            names = self.model.backbone.stage_names
            feats = cached if self._first_trained is None else self.model.image_features(
                bank.images, bank.masks, reuse=cached, start=names[min(self._first_trained, self._masked_index())])
        for group in groups.values():
            query = [e.query for e in group]
            supports = [list(e.supports) for e in group]
            target = bank.masks[query]
            if self.fast:
                ep = feats.episodes(self.model.feature_stages, query, supports)
                logits = resize(self.model.forward_head(ep)[0], size)
            else:
                logits = self._whole_forward(bank, query, supports, class_id)
            total = total + cross_entropy_sum(logits, target)
            pixels = pixels + valid_pixel_count(target)
        return total / torch.clamp(torch.as_tensor(pixels), min=1.0)

    def _masked_index(self) -> int:
        names = list(self.model.backbone.stage_names)
        masked = self.model.masked_support_stage
        return names.index(masked) if masked is not None else len(names)

    def _whole_forward(self, bank: SupportBank, query: list[int], supports: list[list[int]],
                       class_id: Optional[int]):
        idx = torch.as_tensor(supports)
        args = (bank.images[query], bank.images[idx], bank.masks[idx])
        if getattr(self.model, "uses_class_ids", False) and class_id is not None:
            return self.model(*args, class_ids=torch.full((len(query),), int(class_id), dtype=torch.long))
        return self.model(*args)

