"""The one no-grad evaluation loop (sharded under DDP) and the resize of predictions to the label size.

A task supplies what happens per batch (forward, then feed its accumulator); this loop owns
the sharding, the loader, eval mode, autocast and the progress bar. Sums are all-reduced by the
task afterwards, so W processes give exactly the single-process result.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from svfseg.data.collate import collate_episodes
from svfseg.data.samplers import ShardSampler
from svfseg.engine.data import make_loader
from svfseg.engine.distributed import DistInfo
from svfseg.engine.runtime import amp_dtype, autocast, progress_bar, unwrap

#: ``on_batch(model, batch, dataset_indices)`` runs the model on one batch and feeds the task's accumulator.
BatchFn = Callable[[nn.Module, dict, Sequence[int]], None]


@torch.no_grad()
def evaluation_loop(
    model: nn.Module,
    dataset: Dataset,
    on_batch: BatchFn,
    *,
    info: Optional[DistInfo] = None,
    device: Optional[torch.device] = None,
    amp: str = "off",
    batch_size: int = 1,
    workers: int = 0,
    collate_fn=collate_episodes,
    progress: bool = False,
    desc: str = "eval",
    postfix: Optional[Callable[[], dict]] = None,
) -> float:
    """Run ``on_batch`` over this process's shard of ``dataset`` in eval mode; returns the seconds taken.

    Args:
        model: The model (DDP-wrapped or not; eval mode is set here and restored afterwards).
        dataset: Evaluation items; process ``r`` of ``W`` takes items ``r, r + W, ...``.
        on_batch: Called as ``on_batch(net, batch, indices)`` under autocast, ``indices`` being
            the dataset positions of the batch's items.
        info: Process-group info (None: single process on ``device``).
        device: Where the model runs (default ``info.device``).
        amp: ``train.amp`` mode.
        batch_size: Items per forward pass.
        workers: DataLoader workers.
        collate_fn: Batch collation (episodes by default).
        progress: Show a progress bar (main process).
        desc: Bar label.
        postfix: Called every ~50 items for the bar's postfix (e.g. the running mIoU).
    """
    info = info or DistInfo(device=device)
    device = device or info.device
    net = unwrap(model)
    was_training = net.training
    net.eval()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    loader = make_loader(dataset, sampler=sampler, batch_size=batch_size, workers=workers, collate_fn=collate_fn)
    dtype = amp_dtype(amp, device)
    bar = progress_bar(len(loader), desc=desc, enabled=progress and info.is_main)
    t0, seen = time.perf_counter(), 0
    try:
        for batch in loader:
            n = min(batch_size, len(sampler) - seen)  # the loader batches the shard in order
            with autocast(device, dtype):
                on_batch(net, batch, sampler.indices[seen:seen + n])
            seen += n
            if bar is not None:
                bar.update(1)
                if postfix is not None and seen % 50 < n:
                    bar.set_postfix(postfix())
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    return time.perf_counter() - t0


def at_label_size(maps: torch.Tensor, valid_hw: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop (1, C, H, W) maps to the un-padded extent and resize them bilinearly to the label size."""
    h, w = int(valid_hw[0]), int(valid_hw[1])
    crop = maps[:, :, :h, :w].float()
    size = tuple(int(v) for v in size)
    if (h, w) != size:
        crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)
    return crop


def predictions_at_original_size(logits: torch.Tensor, valid_hw: torch.Tensor,
                                 orig_sizes: Sequence[tuple[int, int]], *, upstream: bool = False) -> list[torch.Tensor]:
    """Arg-max predictions scored where the labels live.

    Each item's logits are cropped to the un-padded extent of the resized image
    (``valid_hw``), resized bilinearly to the original label size, then arg-maxed. With
    ``upstream`` (PFENet/BAM's scoring, ``eval.upstream_padding``) the whole square output is
    upsampled with ``align_corners=True`` to the square of the label's longer side and the
    label's top-left extent is kept, as if the label were padded to that square with 255.

    Args:
        logits: (B, C, H, W) logits at the padded test size.
        valid_hw: (B, 2) un-padded (h, w) inside the padded image.
        orig_sizes: original (H0, W0) per item.
        upstream: PFENet/BAM's geometry instead of crop-then-resize.

    Returns:
        B long tensors (H0, W0).
    """
    if upstream:
        out = []
        for b, (h0, w0) in enumerate(orig_sizes):
            side = max(int(h0), int(w0))
            square = F.interpolate(logits[b:b + 1].float(), size=(side, side), mode="bilinear", align_corners=True)
            out.append(square[0, :, :int(h0), :int(w0)].argmax(0))
        return out
    return [at_label_size(logits[b:b + 1], valid_hw[b], size)[0].argmax(0) for b, size in enumerate(orig_sizes)]
