"""Scoring fixed episodes with adaptation, and choosing its steps and learning rate on base-class validation episodes."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from svfseg.engine.resolved import ResolvedRun
from svfseg.engine.adapt.adapter import EpisodeAdapter
from svfseg.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum
from svfseg.engine.evaluator import evaluation_loop, predictions_at_original_size
from svfseg.engine.runtime import to_device
from svfseg.metrics import IoUAccumulator

logger = logging.getLogger(__name__)


@dataclass
class AdaptChoice:
    """The steps and learning rate used on the test episodes, and how they were chosen.

    Attributes:
        steps: Optimiser steps per episode (0: no adaptation: the plain test).
        lr: Learning rate (None when ``steps`` is 0).
        source: ``"given"`` (both set in the config) or ``"validation"`` (the best mIoU on base-class
            validation episodes; a tie goes to fewer steps, then the smaller lr; no adaptation is a candidate).
        trials: Validation mIoU of each candidate, keyed ``"none"`` or ``"lr=1e-3 steps=10"``.
        val_fold: The fold whose novel (this fold's base) classes the validation episodes ask about.
        val_episodes: How many validation episodes (with their fingerprint).
    """

    steps: int
    lr: Optional[float]
    source: str
    trials: dict = field(default_factory=dict)
    val_fold: Optional[int] = None
    val_episodes: Optional[int] = None
    val_fingerprint: Optional[str] = None

    def label(self) -> str:
        """``none`` or ``lr=0.001 steps=10`` (the key of :attr:`trials`)."""
        return trial_key(self.lr, self.steps)


def trial_key(lr: Optional[float], steps: int) -> str:
    return "none" if not steps else f"lr={lr:g} steps={steps}"


def episode_generator(seed: int, index: int) -> torch.Generator:
    """The augmentations' randomness of episode ``index``: fixed by the seed and the index alone, so a result
    does not depend on the batch size or on how DDP shards the episodes."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def adapted_evaluation(adapter: EpisodeAdapter, dataset: Dataset, *, class_ids: Sequence[int], counts: Sequence[int],
                       lr: Optional[float], seed: int, info: DistInfo, amp: str = "off", progress: bool = False,
                       desc: str = "adapt", upstream_padding: bool = False, empty_class: str = "drop") -> dict[int, dict]:
    """Score ``dataset`` after adapting each episode for each of ``counts`` steps (one adaptation per episode).

    An adaptation of ``max(counts)`` steps is run per episode and the query is predicted after each
    step count in ``counts`` (0: before the first step). Intersections and unions are summed per
    class as in `svfseg test`; each episode's counts are kept too (``per_episode``: dataset index,
    class, [inter_fg, union_fg, inter_bg, union_bg]) for paired bootstraps over episodes. Singular
    values are adapted ``adapter.settings.parallel`` episodes at a time (`batched`); everything else
    one episode at a time.

    Returns:
        Step count -> :meth:`IoUAccumulator.compute` plus ``per_episode``, ``seconds`` (the whole pass) and
        ``seconds_per_episode``.
    """
    from svfseg.engine.adapt.batched import batchable, runner_for

    device = info.device
    counts = sorted(set(int(c) for c in counts))
    accs = {c: IoUAccumulator(class_ids) for c in counts}
    records: dict[int, list] = {c: [] for c in counts}
    adapted = 0.0
    parallel = adapter.settings.parallel if batchable(adapter) else 1
    batched = runner_for(adapter, parallel) if parallel > 1 else None

    def on_batch(net, batch: dict, indices: Sequence[int]) -> None:
        nonlocal adapted
        query, supports, masks = to_device(batch, ("query_img", "support_imgs", "support_masks"), device)
        labels, cids = batch["query_label_orig"], [int(c) for c in batch["class_id"]]

        def score(step: int, logits: torch.Tensor, rows: Sequence[int]) -> None:
            preds = predictions_at_original_size(logits, batch["query_valid_hw"][list(rows)],
                                                 [tuple(labels[b].shape) for b in rows], upstream=upstream_padding)
            for pred, b in zip(preds, rows):
                got = accs[step].update(pred.cpu(), labels[b], cids[b])
                records[step].append([int(indices[b]), cids[b], *[int(v) for v in got]])

        t0 = time.perf_counter()
        if batched is not None and query.shape[-2:] == supports.shape[-2:]:
            rows = list(range(len(indices)))

            def predict_all(step: int) -> None:
                score(step, batched.predict(query, supports, masks), rows)

            batched.reset()
            if 0 in counts:
                predict_all(0)
            batched.adapt(supports, masks, steps=counts[-1], lr=lr or 0.0,
                          generators=[episode_generator(seed, i) for i in indices],
                          on_step=lambda step: predict_all(step) if step in accs else None)
        else:
            for b, index in enumerate(indices):
                ids = torch.tensor([cids[b]], device=device)

                def predict_one(step: int, b: int = b, ids: torch.Tensor = ids) -> None:
                    score(step, adapter.predict(query[b:b + 1], supports[b:b + 1], masks[b:b + 1], ids), [b])

                adapter.reset()
                if 0 in counts:
                    predict_one(0)
                adapter.adapt(supports[b], masks[b], cids[b], steps=counts[-1], lr=lr or 0.0,
                              generator=episode_generator(seed, index),
                              on_step=lambda step: predict_one(step) if step in accs else None)
        adapted += time.perf_counter() - t0

    seconds = evaluation_loop(batched.model if batched is not None else adapter.model, dataset, on_batch, info=info,
                              device=device, amp=amp, batch_size=parallel, progress=progress, desc=desc)
    out = {}
    for c, acc in accs.items():
        acc.load_tensor(all_reduce_sum(acc.as_tensor(), info))
        r = acc.compute(empty_class)
        r["per_episode"] = sorted(all_gather_objects(records[c], info))
        r["seconds"] = seconds
        r["seconds_per_episode"] = adapted / max(len(records[c]), 1)
        r["episodes_per_pass"] = parallel
        out[c] = r
    return out


def validation_episodes(run: ResolvedRun, count: int):
    """The base-class validation episodes adaptation settings are chosen on: val-split episodes of the next
    fold's novel classes (base classes of this fold), at the test's shot; never the test fold."""
    from svfseg.engine.data import eval_dataset, heldout_base_fold

    fold = heldout_base_fold(run.cfg.fold, run.bench.num_folds)
    return fold, eval_dataset(run, fold=fold, seed=run.cfg.train.val_seed, count=count)


def given_adaptation(settings) -> Optional[AdaptChoice]:
    """The steps and lr ``settings`` (an ``adapt:`` section) give outright; None when they are to be chosen."""
    if settings.chosen_on_validation:
        return None
    return AdaptChoice(steps=int(settings.steps), lr=float(settings.lr) if settings.steps else None, source="given")


def choose_adaptation(adapter: EpisodeAdapter, run: ResolvedRun, info: DistInfo, *,
                      progress: bool = False) -> AdaptChoice:
    """The steps and lr of ``cfg.adapt`` (given, or chosen on base-class validation episodes).

    Candidates: every lr of ``adapt.grid_lr`` (or the given ``adapt.lr``) with every step count of
    ``adapt.grid_steps`` (or the given ``adapt.steps``), and no adaptation at all. One adaptation per
    lr and validation episode serves every step count. The test episodes play no part.
    """
    cfg = run.cfg
    s = cfg.adapt
    given = given_adaptation(s)
    if given is not None:
        return given
    lrs = [float(s.lr)] if s.lr is not None else list(s.grid_lr)
    counts = [int(s.steps)] if s.steps is not None else sorted(s.grid_steps)
    fold, val = validation_episodes(run, s.val_episodes)
    classes = run.bench.split(fold).novel
    trials: dict[str, float] = {}
    for i, lr in enumerate(lrs):
        steps = sorted(set(counts) | ({0} if i == 0 else set()))
        res = adapted_evaluation(adapter, val, class_ids=classes, counts=steps, lr=lr, seed=s.seed, info=info,
                                 amp=cfg.train.amp, progress=progress, desc=f"adapt {s.params} val lr={lr:g}",
                                 upstream_padding=cfg.eval.upstream_padding)
        for n, r in res.items():
            trials[trial_key(lr, n)] = r["miou"]
    # order of preference on ties: no adaptation, then fewer steps, then smaller lr
    candidates = [(0, None)] + sorted(((n, lr) for lr in lrs for n in counts if n), key=lambda t: (t[0], t[1]))
    def value(c) -> float:
        v = trials[trial_key(c[1], c[0])]
        return v if v == v else float("-inf")  # NaN (no scored class) never wins

    best = max(candidates, key=lambda c: (value(c), -candidates.index(c)))
    choice = AdaptChoice(steps=best[0], lr=best[1], source="validation", trials=trials, val_fold=fold,
                         val_episodes=len(val), val_fingerprint=val.episodes.fingerprint)
    logger.info("adapt %s: chose %s on %d base-class validation episodes (fold %d's classes): %s", s.params,
                choice.label(), len(val), fold, ", ".join(f"{k} {100 * v:.2f}" for k, v in trials.items()))
    return choice
