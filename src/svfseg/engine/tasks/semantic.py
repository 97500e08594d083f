"""Semantic segmentation over background + a fold's base classes: pixel CE, base-class mIoU (stage-1 learners)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.data.semantic import collate_semantic
from svfseg.engine.data import semantic_dataset
from svfseg.engine.distributed import DistInfo, all_reduce_sum
from svfseg.engine.evaluator import evaluation_loop, predictions_at_original_size
from svfseg.engine.resolved import ResolvedRun
from svfseg.engine.runfolder import RunFolder
from svfseg.engine.runtime import autocast, to_device
from svfseg.engine.state import Resume
from svfseg.engine.tasks.base import EvalSet, Task, TestOptions, ValResult
from svfseg.engine.losses import cross_entropy_sum, valid_pixel_count
from svfseg.metrics import ConfusionMatrix
from svfseg.results import markdown_table, pct

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_semantic(model: nn.Module, dataset: Dataset, *, device: torch.device, info: Optional[DistInfo] = None,
                      amp: str = "off", batch_size: int = 1, workers: int = 0, progress: bool = False,
                      desc: str = "val (base classes)") -> dict:
    """Base-class segmentation scores of a semantic segmenter at the original label size.

    Logits are cropped to the un-padded extent, resized to the original label size and
    arg-maxed; the confusion matrix is summed over images (and over processes under DDP).

    Returns:
        :meth:`ConfusionMatrix.compute` (``per_class`` keyed by benchmark id) plus ``images``
        and ``seconds``.
    """
    info = info or DistInfo(device=device)
    cm = ConfusionMatrix(dataset.num_classes)
    seen = [0]

    def on_batch(net: nn.Module, batch: dict, indices) -> None:
        logits = net(*to_device(batch, ("image",), device))
        labels = batch["label_orig"]
        for pred, gt in zip(predictions_at_original_size(logits, batch["valid_hw"], [tuple(x.shape) for x in labels]),
                            labels):
            cm.update(pred, gt)
        seen[0] += len(labels)

    seconds = evaluation_loop(model, dataset, on_batch, info=info, device=device, amp=amp, batch_size=batch_size,
                              workers=workers, collate_fn=collate_semantic, progress=progress, desc=desc)
    cm.mat = all_reduce_sum(cm.mat.reshape(-1), info).reshape(cm.num_classes, cm.num_classes).cpu()
    out = cm.compute(dataset.base_classes)
    out.update(images=int(all_reduce_sum(torch.tensor([seen[0]]), info).item()), seconds=seconds)
    return out


class SemanticTask(Task):
    """Train and score a semantic segmenter of the base classes (novel pixels are background)."""

    name = "semantic"
    train_desc = "train (semantic, base classes)"
    collate_fn = staticmethod(collate_semantic)
    # Such a model may train its BatchNorm statistics; on CPU (gloo) no SyncBatchNorm is used,
    # so only the buffer broadcast keeps the running statistics equal across ranks.
    broadcast_buffers = True

    def train_data(self, run: ResolvedRun) -> Dataset:
        return semantic_dataset(run, "train")

    def eval_set(self, run: ResolvedRun, folder: RunFolder, info: DistInfo,
                 resume: Optional[Resume] = None) -> Optional[EvalSet]:
        return EvalSet(semantic_dataset(run, "val"), on="base_val") if run.cfg.train.val_every else None

    def check_training(self, cfg: ExperimentConfig, model: nn.Module, info: DistInfo) -> None:
        trains_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
                        and m.weight.requires_grad for m in model.modules())
        per_process = cfg.train.batch_size // info.world_size
        if trains_bn and per_process < 2:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} over {info.world_size} process(es) leaves "
                             f"{per_process} image per process: the model trains BatchNorm (a pyramid pooling "
                             f"branch pools to 1x1), which needs >= 2 images per process")

    def loss(self, model, batch, cfg, info, dtype):
        device = info.device
        images, target = to_device(batch, ("image", "label"), device)
        denom = valid_pixel_count(target)
        if info.distributed:
            # Global pixel count / W: W processes then average to the gradient of one process.
            denom = all_reduce_sum(denom, info) / info.world_size
        with autocast(device, dtype):
            logits = model(images)
        loss = cross_entropy_sum(logits, target) / torch.clamp(denom, min=1.0)
        value = loss.detach().float()
        if info.distributed:
            value = all_reduce_sum(value, info) / info.world_size
        return loss, torch.stack([value, value, torch.zeros_like(value)])

    def validate(self, model, val, cfg, info) -> ValResult:
        r = evaluate_semantic(model, val.dataset, device=info.device, info=info, amp=cfg.train.amp,
                              batch_size=cfg.eval.batch_size, workers=cfg.data.workers, progress=cfg.train.progress)
        return ValResult(
            row={"on": "base_val", "miou": r["miou"], "fb_iou": r["fb_iou"], "episodes": r["images"]},
            best={"on": "base_val", "miou": r["miou"], "fb_iou": r["fb_iou"], "bg_iou": r["bg_iou"],
                  "per_class": {str(k): v for k, v in r["per_class"].items()}},
            message=("step %d: base-class mIoU %.2f (background IoU %.2f, FB-IoU %.2f) over %d val images%s",
                     100 * r["miou"], 100 * r["bg_iou"], 100 * r["fb_iou"], r["images"]),
            history_extra={"bg_iou": r["bg_iou"], "pixel_acc": r["pixel_acc"]})

    def results_folder(self, cfg: ExperimentConfig, options: TestOptions) -> str:  # noqa: D102 - see Task
        return "test_base"

    def score(self, checkpoint, model, run: ResolvedRun, state, options: TestOptions, out_dir: Path,
              info: DistInfo) -> dict:
        """Base-class mIoU of a checkpoint on the val split."""
        cfg, bench = run.cfg, run.bench
        ds = semantic_dataset(run, "val")
        r = evaluate_semantic(model, ds, device=info.device, info=info, amp=cfg.train.amp,
                              batch_size=cfg.eval.batch_size, workers=cfg.data.workers, progress=cfg.train.progress,
                              desc="test (base classes)")
        out = {"checkpoint": str(checkpoint), "stage": cfg.model.name, "benchmark": cfg.data.benchmark,
               "class_names": list(bench.class_names),
               "fold": cfg.fold, "base_classes": list(ds.base_classes), "step": state.get("step"), **r,
               "per_class": {str(k): v for k, v in r["per_class"].items()}}
        return out

    def headline(self, r: dict) -> str:  # noqa: D102 - see Task
        return (f"base-class mIoU {pct(r['miou'])} (background IoU {pct(r['bg_iou'])}, FB-IoU {pct(r['fb_iou'])}) "
                f"over {r['images']} images")

    def markdown(self, r: dict) -> str:
        from svfseg.data.splits import class_names

        names = r.get("class_names") or class_names(r["benchmark"])
        lines = [f"# {r['stage']} (semantic segmentation of the base classes), {r['benchmark']} fold {r['fold']}", "",
                 f"{r['images']} val images, original label size; novel classes count as background.", "",
                 markdown_table(["score", "%"], [
                     ["base-class mIoU", pct(r["miou"])], ["mIoU with background", pct(r["miou_with_background"])],
                     ["background IoU", pct(r["bg_iou"])], ["FB-IoU", pct(r["fb_iou"])],
                     ["pixel accuracy", pct(r["pixel_acc"])]]), "",
                 markdown_table(["class", "IoU %"], [[f"{int(k)} {names[int(k) - 1]}", pct(v, missing="n/a")]
                                                     for k, v in r["per_class"].items()])]
        return "\n".join(lines) + "\n"
