"""Adapting the singular values of several episodes in one batched pass, each sample with its own episode's values.

On a CPU a step over one episode's few small images leaves most of the convolution throughput unused;
stacking E episodes' supports into one batch is ~2-3x faster per episode (benchmarks/bench_adapt.py).
Only the singular values differ between the episodes, and an SVD layer can take them per sample
(`SVFLayer.forward_per_sample`), so one copy of the model serves all E: its SVD layers are wrapped to
read their episode's row of an (E, groups, rank) tensor. Adam works element by element, so this is the
same optimisation as E separate adaptations, up to float summation order.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from svfseg.engine.adapt.adapter import EpisodeAdapter
from svfseg.engine.adapt.pseudo import SupportBank, make_bank
from svfseg.engine.losses import cross_entropy_sum, valid_pixel_count
from svfseg.models.blocks import resize
from svfseg.svf import SVFLayer


class _EpisodeOfImage:
    """Which episode each image of the current pass belongs to; shared by every wrapped layer."""

    def __init__(self) -> None:
        self.index: Optional[torch.Tensor] = None

    def of(self, n: int) -> torch.Tensor:
        # the masked stages run each image twice in one batch (plain, then masked): the index repeats
        reps, rest = divmod(n, len(self.index))
        if rest or not reps:
            raise RuntimeError(f"batched adaptation: a batch of {n} samples for {len(self.index)} images")
        return self.index.repeat(reps)


class _PerEpisodeSVD(nn.Module):
    """An SVD layer whose singular values are one row per episode: ``S`` (E, groups, rank)."""

    def __init__(self, layer: SVFLayer, episodes: int, where: _EpisodeOfImage) -> None:
        super().__init__()
        self.layer = layer.requires_grad_(False)
        self.S = nn.Parameter(layer.S.detach().unsqueeze(0).repeat(episodes, *([1] * layer.S.dim())))
        self._where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.forward_per_sample(x, self.S[self._where.of(x.shape[0])])


def batchable(adapter: EpisodeAdapter) -> bool:
    """Whether ``adapter`` adapts only singular values through shared features (what the batched pass can do)."""
    names = [s.name for s in adapter.parts]
    return names == ["svf"] and adapter.fast and all(n.endswith(".S") for n in adapter.parameter_names)


class BatchedSVFAdapter:
    """Adapts the singular values of up to ``episodes`` episodes at once (see the module docstring).

    Args:
        adapter: A :func:`batchable` adapter (its working copy and settings are reused; it stays usable).
        episodes: How many episodes one pass holds.
    """

    def __init__(self, adapter: EpisodeAdapter, episodes: int) -> None:
        if not batchable(adapter):
            raise ValueError("batched adaptation trains singular values only (adapt.params=svf, fast path)")
        self.adapter, self.episodes = adapter, int(episodes)
        self.model = copy.deepcopy(adapter.model)
        self._where = _EpisodeOfImage()
        wrapped = []
        for name, module in list(self.model.backbone.named_modules()):
            if isinstance(module, SVFLayer) and module.S.requires_grad:
                parent_name, _, child = name.rpartition(".")
                parent = self.model.backbone.get_submodule(parent_name) if parent_name else self.model.backbone
                wrapper = _PerEpisodeSVD(module, self.episodes, self._where)
                setattr(parent, child, wrapper)
                wrapped.append(wrapper)
        self.params = [w.S for w in wrapped]
        self._start = [p.detach().clone() for p in self.params]
        s = adapter.settings
        self.optimizer = (torch.optim.Adam(self.params, lr=1e-3) if s.optimizer == "adam"
                          else torch.optim.SGD(self.params, lr=1e-3, momentum=0.9))

    def reset(self) -> None:
        """Every episode's row back to the starting singular values; the optimiser's state cleared."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self._start):
                p.copy_(p0)
                p.grad = None
        self.optimizer.state.clear()

    def adapt(self, support_imgs: torch.Tensor, support_masks: torch.Tensor, *, steps: int, lr: float,
              generators: Sequence[torch.Generator], on_step: Optional[Callable[[int], None]] = None) -> None:
        """Fine-tune E episodes' singular values for ``steps`` steps.

        Args:
            support_imgs: (E, K, 3, H, W) the episodes' supports (E at most ``episodes``).
            support_masks: (E, K, H, W).
            steps: Optimiser steps.
            lr: Learning rate.
            generators: One per episode (its augmented copies).
            on_step: Called after each step with its 1-based number.
        """
        if steps <= 0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        banks = [make_bank(support_imgs[e], support_masks[e], augment=self.adapter.settings.augment,
                           generator=generators[e]) for e in range(support_imgs.shape[0])]
        images, masks, owner = _stack(banks)
        names = self.model.backbone.stage_names
        first = min(self.adapter._first_trained, self.adapter._masked_index())
        self._where.index = owner
        with torch.no_grad():
            cached = self.model.image_features(images, masks, keep=(names[first - 1],) if first else ())
        with torch.enable_grad():
            for step in range(steps):
                self._where.index = owner  # (a prediction between two steps set its own)
                feats = self.model.image_features(images, masks, reuse=cached, start=names[first])
                loss = self._loss(banks, feats, images.shape[-2:], step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if on_step is not None:
                    on_step(step + 1)

    def _loss(self, banks: Sequence[SupportBank], feats, size, step: int) -> torch.Tensor:
        """The sum over episodes of each episode's mean cross-entropy on its chosen pseudo-episodes."""
        offsets = _offsets(banks)
        groups: dict[int, list] = {}
        for e, bank in enumerate(banks):
            for i in self.adapter._batch(bank, step):
                pe = bank.episodes[i]
                groups.setdefault(len(pe.supports), []).append(
                    (e, offsets[e] + pe.query, [offsets[e] + j for j in pe.supports]))
        masks = torch.cat([b.masks for b in banks])
        sums = torch.zeros(len(banks), dtype=torch.float32, device=masks.device)
        pixels = torch.zeros(len(banks), dtype=torch.float32, device=masks.device)
        for group in groups.values():
            ep = feats.episodes(self.model.feature_stages, [q for _, q, _ in group], [s for _, _, s in group])
            logits = resize(self.model.forward_head(ep)[0], size)
            for row, (e, q, _) in enumerate(group):
                target = masks[q:q + 1]
                sums[e] = sums[e] + cross_entropy_sum(logits[row:row + 1], target)
                pixels[e] = pixels[e] + valid_pixel_count(target)
        return (sums / pixels.clamp(min=1.0)).sum()

    @torch.no_grad()
    def predict(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """Logits (E, 2, H, W) of each episode's query with its own adapted singular values."""
        e, k = support_imgs.shape[:2]
        images = torch.cat([support_imgs.flatten(0, 1), query_img])
        masks = torch.cat([support_masks.flatten(0, 1).long(),
                           torch.zeros(e, *support_masks.shape[-2:], dtype=torch.long, device=support_masks.device)])
        ids = torch.arange(e, device=images.device)
        self._where.index = torch.cat([ids.repeat_interleave(k), ids])
        feats = self.model.image_features(images, masks)
        ep = feats.episodes(self.model.feature_stages, [e * k + i for i in range(e)],
                            [[i * k + j for j in range(k)] for i in range(e)])
        return resize(self.model.forward_head(ep)[0], query_img.shape[-2:])


def runner_for(adapter: EpisodeAdapter, episodes: int) -> BatchedSVFAdapter:
    """The batched runner of ``adapter`` for ``episodes`` at once, made once (it holds its own copy of the model)."""
    runner = adapter.batched_runner
    if runner is None or runner.episodes != episodes:
        adapter.reset()  # the copy starts from the starting values, whatever the adapter did last
        runner = adapter.batched_runner = BatchedSVFAdapter(adapter, episodes)
    return runner


def _offsets(banks: Sequence[SupportBank]) -> list[int]:
    out, at = [], 0
    for b in banks:
        out.append(at)
        at += b.images.shape[0]
    return out


def _stack(banks: Sequence[SupportBank]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    owner = torch.cat([torch.full((b.images.shape[0],), e, dtype=torch.long, device=b.images.device)
                       for e, b in enumerate(banks)])
    return torch.cat([b.images for b in banks]), torch.cat([b.masks for b in banks]), owner
