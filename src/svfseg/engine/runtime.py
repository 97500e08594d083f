"""Runtime helpers every loop uses: mixed precision, the model inside DDP, progress bars, batches to the device."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp`` on ``device`` (None = full precision).

    ``auto`` means bf16 on a GPU that supports it, fp16 on older GPUs, off on the CPU.
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype``, or a no-op context when it is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(batch: dict, keys, device: torch.device) -> list[torch.Tensor]:
    """``batch[k]`` for each key, on ``device`` (non-blocking from pinned memory on a GPU)."""
    nb = device.type == "cuda"
    return [batch[k].to(device, non_blocking=nb) for k in keys]


def progress_bar(total: int, *, desc: str, enabled: bool, unit: str = "batch", initial: int = 0,
                 leave: bool = False):
    """A tqdm bar, or None when disabled (non-main processes, ``train.progress=false``)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)


def set_threads(threads: Optional[int]) -> int:
    """Apply the ``threads`` setting (None: keep torch's default) and log the count in use.

    One intra-op thread per core is torch's default; on a machine shared with other jobs it
    oversubscribes the cores and spin-waiting threads can make training several times slower,
    so the count is recorded with every training run.

    Returns:
        The intra-op thread count now in use.
    """
    import logging

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, found {threads}")
        torch.set_num_threads(int(threads))
    n = torch.get_num_threads()
    # Debug level here: a training run records the count in meta.json and its log (engine.run);
    # other commands keep stderr for their result or their one-line error.
    logging.getLogger("svfseg").debug("torch threads: %d (%s)", n,
                                      "threads / --threads" if threads is not None else "torch default")
    return n


@contextlib.contextmanager
def threads_for(threads: Optional[int]) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` for the block (None: left as they are), then restored.

    Every command that computes in-process for a config (a training, its scoring, each cell of a
    compare) runs inside it, so the ``threads`` key holds wherever the work happens, not only where
    a command line set it.

    Yields:
        The intra-op thread count in use.
    """
    before = torch.get_num_threads()
    n = set_threads(threads)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
