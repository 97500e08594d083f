"""BAM generalized-setting evaluation: base and novel classes scored together (BAM's ``test_GFSS``)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.engine.base_learner import BAM_MODEL
from svfseg.engine.data import ShardSampler
from svfseg.engine.distributed import DistInfo, all_reduce_sum
from svfseg.engine.evaluate import amp_dtype, autocast, unwrap
from svfseg.metrics import ConfusionMatrix, format_pct

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_generalized(model: nn.Module, dataset: Dataset, *, device: torch.device, tau: float = 0.9,
                         info: Optional[DistInfo] = None, amp: str = "off", workers: int = 0,
                         progress: bool = False) -> dict:
    """Score a BAM model in the generalized setting (BAM's ``test_GFSS``): base and novel classes at once.

    Each episode's prediction is :func:`~svfseg.models.heads.bam.generalized_prediction` of the
    ensemble and base-learner outputs, both cropped to the un-padded extent and resized
    (bilinear) to the original label size. Base classes accumulate over every episode; the
    novel label of an episode counts for that episode's novel class.

    Args:
        model: A stage-2 "bam" model.
        dataset: :class:`~svfseg.data.semantic.GeneralizedEpisodes`.
        device: Where to run.
        tau: Novel-class probability threshold.
        info: Process-group info (episodes are sharded, sums reduced).
        amp: ``train.amp`` mode.
        workers: DataLoader workers.
        progress: Show a progress bar.

    Returns:
        ``miou_base``, ``miou_novel``, ``miou_total`` (means of per-class IoU over the base, the
        novel and all classes), ``per_class`` {benchmark id: IoU}, ``episodes``, ``tau``, ``seconds``.
    """
    from svfseg.data.splits import class_split
    from svfseg.engine.data import make_loader
    from svfseg.models.blocks import resize
    from svfseg.models.heads.bam import generalized_prediction

    info = info or DistInfo(device=device)
    net = unwrap(model)
    if not hasattr(net, "forward_parts"):
        raise TypeError(f"evaluate_generalized: needs a BAM model (with forward_parts), got {type(net).__name__}")
    eps = dataset.episodes
    novel = tuple(class_split(eps.benchmark, eps.fold, eps.convention).novel)
    base = tuple(dataset.base_classes)
    nb = len(base)
    slot = {c: nb + 1 + i for i, c in enumerate(novel)}  # the novel label of an episode -> its class's slot
    was_training = net.training
    net.eval()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    loader = make_loader(dataset, sampler=sampler, batch_size=1, workers=workers)
    cm = ConfusionMatrix(nb + 1 + len(novel))
    dtype = amp_dtype(amp, device)
    t0, seen = time.perf_counter(), 0
    try:
        for batch in loader:
            with autocast(device, dtype):
                parts = net.forward_parts(batch["query_img"].to(device), batch["support_imgs"].to(device),
                                          batch["support_masks"].to(device))
            size = batch["query_img"].shape[-2:]
            final, basel = resize(parts.final, size), resize(parts.base, size)
            for b, gt in enumerate(batch["query_label_orig"]):
                hw, size0 = batch["query_valid_hw"][b], tuple(gt.shape)
                pred = generalized_prediction(_at_label_size(final[b:b + 1], hw, size0),
                                              _at_label_size(basel[b:b + 1], hw, size0), tau)[0].cpu()
                k = slot[int(batch["class_id"][b])]
                pred[pred == nb + 1] = k
                target = gt.clone()
                target[target == nb + 1] = k
                cm.update(pred, target)
                seen += 1
    finally:
        net.train(was_training)
    cm.mat = all_reduce_sum(cm.mat.reshape(-1), info).reshape(cm.num_classes, cm.num_classes).cpu()
    r = cm.compute(base + novel)
    per = r["per_class"]
    vals = lambda ids: [per[c] for c in ids if not math.isnan(per[c])]  # noqa: E731
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return {"miou_base": mean(vals(base)), "miou_novel": mean(vals(novel)), "miou_total": mean(vals(base + novel)),
            "per_class": per, "episodes": int(all_reduce_sum(torch.tensor([seen]), info).item()), "tau": tau,
            "seconds": time.perf_counter() - t0}


def _at_label_size(x: torch.Tensor, valid_hw: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop (1, C, H, W) maps to the un-padded extent and resize them bilinearly to the label size."""
    import torch.nn.functional as F

    h, w = int(valid_hw[0]), int(valid_hw[1])
    return F.interpolate(x[:, :, :h, :w].float(), size=tuple(int(v) for v in size), mode="bilinear",
                         align_corners=False)


def score_generalized(checkpoint: str | Path, cfg: Optional[ExperimentConfig] = None, *, tau: float = 0.9,
                      seed: int = 0, out_dir: Optional[str | Path] = None, info: Optional[DistInfo] = None) -> dict:
    """Generalized-setting score of a stage-2 BAM checkpoint; writes ``results.json`` + ``results.md``.

    Args:
        checkpoint: A "bam" training checkpoint or merged export.
        cfg: Config (data root, fold, shot); None: the checkpoint's own.
        tau: Novel-class probability threshold (BAM: 0.9).
        seed: Seed of the episodes' class and support choice.
        out_dir: Output folder (default ``<checkpoint folder>/test_generalized_<K>shot``).
        info: Process-group info.

    Returns:
        The results dict.
    """
    from svfseg.data.semantic import build_generalized_dataset
    from svfseg.engine.model import load_for_inference

    info = info or DistInfo()
    model, cfg, state = load_for_inference(checkpoint, cfg, device=info.device)
    if cfg.model.name != BAM_MODEL:
        raise ValueError(f"generalized evaluation needs a {BAM_MODEL!r} checkpoint; {checkpoint} holds "
                         f"{cfg.model.name!r}")
    d = cfg.data
    # eval.num_episodes caps the episode count (one per val image otherwise, as BAM).
    ds = build_generalized_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold, shot=cfg.shot, seed=seed,
                                   convention=d.convention, test_size=d.test_size, count=cfg.eval.num_episodes)
    r = evaluate_generalized(model, ds, device=info.device, tau=tau, info=info, amp=cfg.train.amp,
                             workers=cfg.data.workers, progress=cfg.train.progress)
    out = {"checkpoint": str(checkpoint), "setting": "generalized", "benchmark": d.benchmark, "fold": cfg.fold,
           "shot": cfg.shot, "seed": seed, "episode_fingerprint": ds.episodes.fingerprint, **r,
           "per_class": {str(k): v for k, v in r["per_class"].items()}}
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent / f"test_generalized_{cfg.shot}shot"
    out["out_dir"] = str(out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(out, indent=1, default=str))
        (out_dir / "results.md").write_text(generalized_markdown(out))
        logger.info("generalized: mIoU novel %s  base %s  total %s over %d episodes -> %s", format_pct(r["miou_novel"]),
                    format_pct(r["miou_base"]), format_pct(r["miou_total"]), r["episodes"], out_dir)
    return out


def generalized_markdown(r: dict) -> str:
    """Markdown of a :func:`score_generalized` result."""
    from svfseg.data.splits import class_names

    names = class_names(r["benchmark"])
    lines = [f"# BAM generalized setting, {r['benchmark']} fold {r['fold']}, {r['shot']}-shot", "",
             f"{r['episodes']} episodes (seed {r['seed']}), tau {r['tau']}; base and novel classes scored "
             "together.", "", "| score | % |", "|---|---|",
             f"| mIoU novel | {format_pct(r['miou_novel'])} |", f"| mIoU base | {format_pct(r['miou_base'])} |",
             f"| mIoU total | {format_pct(r['miou_total'])} |", "", "| class | IoU % |", "|---|---|"]
    lines += [f"| {int(c)} {names[int(c) - 1]} | {format_pct(v)} |" for c, v in r["per_class"].items()]
    return "\n".join(lines) + "\n"
