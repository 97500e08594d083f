"""Engine-side data plumbing: datasets from the config, the resumable distributed batch sampler, loaders."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from svfseg.config import ExperimentConfig

logger = logging.getLogger(__name__)


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches of one epoch, split across processes, resumable mid-epoch.

    Epoch ``e`` visits ``numpy.random.default_rng([seed, e])`` permutations of the dataset
    (concatenated when an epoch needs more samples than the dataset holds). Global batch ``b``
    is ``order[b*B:(b+1)*B]``; process ``r`` of ``W`` takes its ``r``-th contiguous slice of
    ``B/W`` indices. So W processes see exactly the samples one process sees, and a resumed
    run skips exactly the batches already trained on.

    Args:
        n: dataset length.
        global_batch: samples per optimiser step over all processes.
        steps: optimiser steps per epoch.
        seed: run seed.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, n: int, global_batch: int, steps: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the number of processes "
                             f"({world_size})")
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.global_batch, self.steps, self.seed = n, global_batch, steps, seed
        self.rank, self.world_size = rank, world_size
        self.local = global_batch // world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch and the first step of it still to run (resume)."""
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps}]")
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        need = self.steps * self.global_batch
        parts, have = [], 0
        while have < need:
            parts.append(rng.permutation(self.n))
            have += self.n
        return np.concatenate(parts)[:need]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        for b in range(self.start_step, self.steps):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield chunk[self.rank * self.local:(self.rank + 1) * self.local].tolist()

    def __len__(self) -> int:
        return self.steps - self.start_step


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...``: evaluation episodes split across processes."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: list[dict]) -> dict:
    """Collate episode dicts (the data package's collate when present)."""
    from svfseg.data.collate import collate_episodes

    return collate_episodes(batch)


def make_loader(dataset: Dataset, *, batch_sampler: Optional[Sampler] = None, sampler: Optional[Sampler] = None,
                batch_size: int = 1, workers: int = 0, pin_memory: bool = False, collate_fn=collate) -> DataLoader:
    """A DataLoader that never touches the global torch RNG (it gets its own generator).

    The episodes' randomness comes from (seed, epoch, index) inside the dataset; keeping the
    loader off the global RNG is what makes a resumed run continue the same dropout stream.
    ``collate_fn`` defaults to the episode collate.
    """
    kw = dict(num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
              generator=torch.Generator().manual_seed(0), persistent_workers=False)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, shuffle=False, drop_last=False, **kw)


def train_dataset(cfg: ExperimentConfig) -> Dataset:
    """The training episodes of ``cfg`` (base classes of ``cfg.fold``)."""
    from svfseg.data.build import build_dataset

    _check_root(cfg)
    d = cfg.data
    return build_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold, split="train", shot=cfg.shot,
                         seed=cfg.seed, protocol=d.protocol, convention=d.convention, train_crop=d.train_crop,
                         train_scale=d.train_scale, test_size=d.test_size, query_rule=d.query_rule)


def eval_dataset(cfg: ExperimentConfig, *, fold: Optional[int] = None, seed: int = 0, count: int = 1000,
                 episodes=None, shot: Optional[int] = None) -> Dataset:
    """Fixed evaluation episodes on the val split (novel classes of ``fold``, default ``cfg.fold``)."""
    from svfseg.data.build import build_dataset

    _check_root(cfg)
    d = cfg.data
    return build_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold if fold is None else fold,
                         split="val", shot=cfg.shot if shot is None else shot, seed=seed, protocol=d.protocol,
                         convention=d.convention, test_size=d.test_size, episodes=episodes, num_episodes=count,
                         query_rule=d.query_rule)


def _check_root(cfg: ExperimentConfig) -> None:
    root = Path(cfg.data.root)
    if not root.is_dir():
        hint = ("`svfseg demo` generates it" if cfg.data.benchmark == "synthetic"
                else f"prepare it with `svfseg prepare {cfg.data.benchmark} ...`")
        raise FileNotFoundError(f"data.root={cfg.data.root!r}: no such folder ({hint}, or set data.root=...)")


def novel_classes(cfg: ExperimentConfig, fold: Optional[int] = None) -> Sequence[int]:
    """Novel class ids of a fold (what mIoU averages over)."""
    from svfseg.data.splits import class_split

    return class_split(cfg.data.benchmark, cfg.fold if fold is None else fold, cfg.data.convention).novel


def heldout_base_fold(fold: int) -> int:
    """The fold whose novel classes serve as held-out base-class episodes for ``fold``.

    Every novel class of fold ``(fold + 1) % 4`` is a base class of ``fold``; its val-split
    episodes use images never seen in training, so checkpoint selection on them does not
    look at the test fold's classes.
    """
    return (fold + 1) % 4
