"""Index samplers: resumable distributed training batches, sharded evaluation episodes."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


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
