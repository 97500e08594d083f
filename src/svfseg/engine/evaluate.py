"""Episodic evaluation at the original label size: per-class IoU, mIoU, FB-IoU; sharded under DDP."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from svfseg.engine.data import ShardSampler, make_loader
from svfseg.engine.distributed import DistInfo, all_reduce_sum
from svfseg.engine.model import forward_episode
from svfseg.metrics import IoUAccumulator

logger = logging.getLogger(__name__)


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


def predictions_at_original_size(logits: torch.Tensor, valid_hw: torch.Tensor,
                                 orig_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Binary predictions scored where the labels live.

    Each item's logits are cropped to the un-padded extent of the resized query
    (``valid_hw``), resized bilinearly to the original label size, then arg-maxed.

    Args:
        logits: (B, 2, H, W) logits at the padded test size.
        valid_hw: (B, 2) un-padded (h, w) inside the padded image.
        orig_sizes: original (H0, W0) per item.

    Returns:
        B long tensors (H0, W0) in {0, 1}.
    """
    preds = []
    for b, (h0, w0) in enumerate(orig_sizes):
        h, w = int(valid_hw[b][0]), int(valid_hw[b][1])
        crop = logits[b:b + 1, :, :h, :w].float()
        if (h, w) != (int(h0), int(w0)):
            crop = F.interpolate(crop, size=(int(h0), int(w0)), mode="bilinear", align_corners=False)
        preds.append(crop.argmax(1)[0])
    return preds


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    class_ids: Sequence[int],
    device: torch.device,
    info: Optional[DistInfo] = None,
    amp: str = "off",
    batch_size: int = 1,
    workers: int = 0,
    progress: bool = False,
    desc: str = "eval",
    vis_dir: Optional[Path] = None,
    num_vis: int = 0,
) -> dict:
    """Score a model on fixed episodes.

    Intersections and unions are summed per class over all episodes (integers), so the result
    does not depend on the batch size, and under DDP each process scores every W-th episode
    and the sums are all-reduced: exactly the single-process result.

    Args:
        model: few-shot model (eval mode is set here and restored afterwards).
        dataset: evaluation episodes (items with ``query_label_orig`` and ``query_valid_hw``).
        class_ids: classes mIoU averages over (the fold's novel classes).
        device: where to run.
        info: process-group info (None: single process).
        amp: ``train.amp`` mode.
        batch_size: episodes per forward pass.
        workers: DataLoader workers.
        progress: show a tqdm bar (main process).
        desc: bar label.
        vis_dir: where to write overlay PNGs of the first ``num_vis`` episodes.
        num_vis: number of overlays.

    Returns:
        :meth:`IoUAccumulator.compute` plus ``seconds`` and ``episode_fingerprint``.
    """
    info = info or DistInfo(device=device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    loader = make_loader(dataset, sampler=sampler, batch_size=batch_size, workers=workers)
    acc = IoUAccumulator(class_ids)
    dtype = amp_dtype(amp, device)
    bar = _bar(len(loader), desc, progress and info.is_main)
    t0 = time.perf_counter()
    seen = 0
    try:
        for batch in loader:
            with autocast(device, dtype):
                logits = forward_episode(net, batch, device)
            labels = batch["query_label_orig"]
            preds = predictions_at_original_size(logits, batch["query_valid_hw"], [tuple(x.shape) for x in labels])
            for b, (pred, gt) in enumerate(zip(preds, labels)):
                acc.update(pred.cpu(), gt, int(batch["class_id"][b]))
                index = sampler.indices[seen + b]
                if vis_dir is not None and index < num_vis:
                    from svfseg.engine.vis import save_episode_overlay

                    save_episode_overlay(Path(vis_dir) / f"episode_{index:05d}_class{int(batch['class_id'][b])}.png",
                                         batch, b, pred, gt)
            seen += len(labels)
            if bar is not None:
                bar.update(1)
                if seen % 50 < len(labels):
                    r = acc.compute()
                    bar.set_postfix(mIoU=f"{100 * r['miou']:.1f}", FB=f"{100 * r['fb_iou']:.1f}")
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    acc.load_tensor(all_reduce_sum(acc.as_tensor(), info))
    result = acc.compute()
    result["seconds"] = time.perf_counter() - t0
    episodes = getattr(dataset, "episodes", None)
    result["episode_fingerprint"] = getattr(episodes, "fingerprint", None)
    return result


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
