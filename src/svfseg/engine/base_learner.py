"""BAM stage 1: base-learner training and scoring (multi-class CE, base-class mIoU) and stage-1 checks.

Everything that is not specific to semantic segmentation comes from the rest of the engine:
the training loop shared with few-shot training (``train.run_training``: stop/resume, logging,
last/best checkpoints), optimiser groups and the poly schedule (``optim``), atomic/resumable
checkpoints and RNG state (``checkpoint``), the resumable distributed batch sampler (``data``),
AMP and DDP helpers; the confusion matrix is in :mod:`svfseg.metrics`. This module adds the multi-class loss step and the checks the BAM
stage-2 model runs on its stage-1 input. The generalized (base + novel) evaluation of a
stage-2 model is in :mod:`svfseg.engine.generalized`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from svfseg.config import ExperimentConfig
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.data import ShardSampler, make_loader
from svfseg.engine.distributed import DistInfo, all_reduce_sum, barrier, resolve_device, sync_trainable_batchnorm
from svfseg.engine.evaluate import _bar, amp_dtype, autocast, predictions_at_original_size, unwrap
from svfseg.engine.optim import build_optimizer
from svfseg.engine.train import FitResult, NonFiniteLoss, ValResult, run_training, steps_per_epoch
from svfseg.losses import cross_entropy_sum, valid_pixel_count
from svfseg.metrics import ConfusionMatrix, format_pct

logger = logging.getLogger(__name__)

BASE_MODEL = "bam_base"
BAM_MODEL = "bam"
#: Placeholders allowed in ``model.base_checkpoint``.
CHECKPOINT_FIELDS = ("output_dir", "benchmark", "fold", "backbone")


# ------------------------------------------------------------------------------ config -> data / model


def base_classes(cfg: ExperimentConfig) -> tuple[int, ...]:
    """Benchmark ids of the base classes of ``cfg.fold`` (channel order of the base learner)."""
    from svfseg.data.splits import class_split

    return tuple(class_split(cfg.data.benchmark, cfg.fold, cfg.data.convention).base)


def model_kwargs(cfg: ExperimentConfig, *, pretrained: bool = True) -> dict[str, Any]:
    """Extra ``create_model`` keywords the BAM models take from the config.

    "bam_base": ``num_classes`` (background + base classes). "bam": ``base_classes``, ``shot``
    and, when ``pretrained``, ``base_state`` read and checked by :func:`load_base_learner_state`.
    Other models: nothing.
    """
    name = cfg.model.name
    if name == BASE_MODEL:
        return {"num_classes": len(base_classes(cfg)) + 1}
    if name == BAM_MODEL:
        out: dict[str, Any] = {"base_classes": base_classes(cfg), "shot": cfg.shot}
        if pretrained:
            out["base_state"] = load_base_learner_state(cfg)
        return out
    return {}


def base_checkpoint_path(cfg: ExperimentConfig) -> Path:
    """``model.base_checkpoint`` with ``{fold}``, ``{benchmark}``, ``{backbone}``, ``{output_dir}`` filled in."""
    template = getattr(cfg.model, "base_checkpoint", None)
    if not template:
        raise ValueError("model.base_checkpoint is not set: BAM (stage 2) needs the stage-1 base learner, e.g. "
                         "model.base_checkpoint=runs/<stage-1 run>/best.pt (train it with "
                         f"`svfseg train --config configs/{cfg.data.benchmark}/bam_base_<backbone>.yaml "
                         f"fold={cfg.fold}`)")
    values = {"output_dir": cfg.output_dir, "benchmark": cfg.data.benchmark, "fold": cfg.fold,
              "backbone": cfg.model.backbone}
    try:
        return Path(str(template).format(**values))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"model.base_checkpoint={template!r}: only the placeholders "
                         f"{{{'}, {'.join(CHECKPOINT_FIELDS)}}} are known ({e})") from None


def stage1_differences(stage1: dict, cfg: ExperimentConfig) -> list[str]:
    """What in a stage-1 checkpoint's description/config does not fit the BAM model of ``cfg``.

    Args:
        stage1: The loaded stage-1 checkpoint (``describe`` and ``config`` entries).
        cfg: The stage-2 config.

    Returns:
        Human-readable differences; empty when the checkpoint fits.
    """
    from svfseg.data.splits import num_classes

    d = stage1.get("describe") or {}
    conf = stage1.get("config") or {}
    head = dict(d.get("head") or {})
    want_head = cfg.model.head
    expected = {
        "model": BASE_MODEL,
        "benchmark": cfg.data.benchmark,
        "fold": cfg.fold,
        "num_classes (background + base)": len(base_classes(cfg)) + 1,
        "backbone": cfg.model.backbone,
        "ppm_bins": list(want_head.get("ppm_bins", (1, 2, 3, 6))),
        "hidden": int(want_head.get("base_hidden", 512)),
    }
    found = {
        "model": d.get("name"),
        "benchmark": d.get("benchmark"),
        "fold": d.get("fold"),
        "num_classes (background + base)": d.get("num_classes"),
        "backbone": d.get("backbone"),
        "ppm_bins": head.get("ppm_bins"),
        "hidden": head.get("hidden"),
    }
    if cfg.data.benchmark == "coco":
        expected["data.convention"] = cfg.data.convention
        found["data.convention"] = (conf.get("data") or {}).get("convention")
    want_os = dict(cfg.model.backbone_kwargs).get("output_stride")
    have_os = ((conf.get("model") or {}).get("backbone_kwargs") or {}).get("output_stride")
    if (want_os or 8) != (have_os or 8):
        key = "model.backbone_kwargs.output_stride"
        expected[key], found[key] = want_os or 8, have_os or 8
    if d.get("num_benchmark_classes") not in (None, num_classes(cfg.data.benchmark)):
        expected["num_benchmark_classes"] = num_classes(cfg.data.benchmark)
        found["num_benchmark_classes"] = d.get("num_benchmark_classes")
    return [f"{k}: checkpoint has {found[k]!r}, this run needs {v!r}" for k, v in expected.items() if found[k] != v]


def _read_stage1(cfg: ExperimentConfig, *, mmap: bool) -> tuple[Path, dict]:
    path = base_checkpoint_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.base_checkpoint: {path} does not exist. BAM's stage 2 needs the stage-1 base learner of "
            f"fold {cfg.fold}: run `svfseg train --config configs/{cfg.data.benchmark}/bam_base_<backbone>.yaml "
            f"fold={cfg.fold}` first, or point model.base_checkpoint at its best.pt")
    state = ckpt.peek(path) if mmap else ckpt.load(path)  # peek: lazy tensors, only the metadata is read
    if not isinstance(state, dict) or "model" not in state or "describe" not in state:
        raise ckpt.CheckpointMismatch(f"{path}: not an svfseg training checkpoint (no model/describe entries)")
    diffs = stage1_differences(state, cfg)
    if diffs:
        raise ckpt.CheckpointMismatch(f"stage-1 checkpoint {path} does not fit this BAM run:\n  " + "\n  ".join(diffs))
    return path, state


def check_base_checkpoint(cfg: ExperimentConfig) -> Path:
    """Fail fast: the stage-1 checkpoint of a BAM run exists and fits (weights are not loaded).

    Raises:
        FileNotFoundError, CheckpointMismatch: as :func:`load_base_learner_state`.

    Returns:
        Its path.
    """
    return _read_stage1(cfg, mmap=True)[0]


def load_base_learner_state(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Read the stage-1 checkpoint ``model.base_checkpoint`` names and check that it fits ``cfg``.

    Raises:
        FileNotFoundError: no such file (with the command that makes it).
        CheckpointMismatch: another model, benchmark, fold, class count, backbone or PPM.

    Returns:
        The base learner's state dict (keys ``backbone.*``, ``ppm.*``, ``cls.*``).
    """
    path, state = _read_stage1(cfg, mmap=False)
    logger.info("stage-1 base learner: %s (step %s, val base mIoU %s)", path, state.get("step"),
                format_pct((state.get("metrics") or {}).get("miou")))
    return state["model"]


def semantic_dataset(cfg: ExperimentConfig, split: str) -> Dataset:
    """Stage-1 data of ``cfg`` (base classes of ``cfg.fold``; novel pixels are background)."""
    from svfseg.data.semantic import build_semantic_dataset

    d = cfg.data
    if not Path(d.root).is_dir():
        raise FileNotFoundError(f"data.root={d.root!r}: no such folder (prepare the dataset first or set "
                                "data.root=...)")
    return build_semantic_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold, split=split, seed=cfg.seed,
                                  protocol=d.protocol, convention=d.convention, train_crop=d.train_crop,
                                  train_scale=d.train_scale, test_size=d.test_size)


def _loader(dataset: Dataset, **kw) -> DataLoader:
    # engine.data.make_loader (own generator, never the global RNG) with the semantic collate.
    from svfseg.data.semantic import collate_semantic

    return make_loader(dataset, collate_fn=collate_semantic, **kw)


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_base(model: nn.Module, dataset: Dataset, *, device: torch.device, info: Optional[DistInfo] = None,
                  amp: str = "off", batch_size: int = 1, workers: int = 0, progress: bool = False,
                  desc: str = "val (base classes)") -> dict:
    """Base-class segmentation scores of a base learner at the original label size.

    Logits are cropped to the un-padded extent, resized to the original label size and
    arg-maxed; the confusion matrix is summed over images (and over processes under DDP).

    Returns:
        :meth:`ConfusionMatrix.compute` (``per_class`` keyed by benchmark id) plus ``images``
        and ``seconds``.
    """
    info = info or DistInfo(device=device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    loader = _loader(dataset, sampler=sampler, batch_size=batch_size, workers=workers)
    cm = ConfusionMatrix(dataset.num_classes)
    dtype = amp_dtype(amp, device)
    bar = _bar(len(loader), desc, progress and info.is_main)
    t0, seen = time.perf_counter(), 0
    try:
        for batch in loader:
            with autocast(device, dtype):
                logits = net(batch["image"].to(device))
            labels = batch["label_orig"]
            preds = predictions_at_original_size(logits, batch["valid_hw"], [tuple(x.shape) for x in labels])
            for pred, gt in zip(preds, labels):
                cm.update(pred, gt)
            seen += len(labels)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    cm.mat = all_reduce_sum(cm.mat.reshape(-1), info).reshape(cm.num_classes, cm.num_classes).cpu()
    images = int(all_reduce_sum(torch.tensor([seen]), info).item())
    out = cm.compute(dataset.base_classes)
    out.update(images=images, seconds=time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------ training


def _train_step(model, batch, optimizer, scaler, cfg, info, dtype, step) -> float:
    device = info.device
    nb = device.type == "cuda"
    images = batch["image"].to(device, non_blocking=nb)
    target = batch["label"].to(device, non_blocking=nb)
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
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value} at step {step + 1}; training stopped before applying it. The last "
                            f"good checkpoint is kept. Lower optim.lr, set optim.grad_clip, or use train.amp=off/bf16.")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return value


def fit_base(cfg: ExperimentConfig, model: nn.Module, train_set: Dataset, *, run_dir: Path, describe: dict,
             val_set: Optional[Dataset] = None, info: Optional[DistInfo] = None,
             resume_state: Optional[dict] = None) -> FitResult:
    """Train the base learner with pixel cross-entropy over background + base classes.

    Same contract as :func:`svfseg.engine.train.fit` (poly lr set every step, param-group lr
    multipliers, ``last.pt`` at epoch ends / every ``train.checkpoint_every`` steps / on
    Ctrl-C, ``best.pt`` on the best base-class mIoU of ``val_set``, NaN stop, resume, DDP); the
    validation score is the base-class mIoU of the val split (background excluded).

    Args:
        cfg: Experiment config (``model.name == "bam_base"``).
        model: The base learner (``PSPNet``).
        train_set: :class:`~svfseg.data.semantic.SemanticBaseDataset` (train chain).
        run_dir: Run folder.
        describe: Model description stored in the checkpoints.
        val_set: Eval-chain dataset; None = no validation (best = last).
        info: Process-group info (None: single process on ``cfg.device``).
        resume_state: A loaded ``last.pt`` to continue from.

    Returns:
        A :class:`~svfseg.engine.train.FitResult`.
    """
    info = info or DistInfo(device=resolve_device(cfg.device))
    device, run_dir, tc, oc = info.device, Path(run_dir), cfg.train, cfg.optim
    trains_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad
                    for m in model.modules())
    if trains_bn and tc.batch_size // info.world_size < 2:
        raise ValueError(f"train.batch_size={tc.batch_size} over {info.world_size} process(es) leaves "
                         f"{tc.batch_size // info.world_size} image per process: the base learner trains BatchNorm "
                         f"(its PPM pools to 1x1), which needs >= 2 images per process")
    torch.manual_seed(cfg.seed + info.rank)  # dropout; its state travels in the checkpoints
    model = sync_trainable_batchnorm(model.to(device), info)
    optimizer, _ = build_optimizer(model, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay,
                                   lr_mult=oc.lr_mult, decay_to_pretrained=())
    dtype = amp_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    spe = steps_per_epoch(cfg, len(train_set))
    total = tc.epochs * spe
    step, best, history = 0, None, []
    last_path = run_dir / "last.pt"
    if resume_state is not None:
        ckpt.check_compatible(describe, resume_state["describe"], last_path)
        ckpt.load_model_state(unwrap(model), resume_state["model"], last_path)
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        step, best, history = resume_state["step"], resume_state.get("best"), list(resume_state.get("history", []))
        rng = resume_state["rng_per_rank"]
        ckpt.restore_rng(rng[info.rank] if info.rank < len(rng) else rng[0])
        logger.info("resumed %s at step %d/%d", run_dir, step, total)
    if info.distributed:
        # Default broadcast_buffers=True on purpose (unlike few-shot fit): stage 1 trains BatchNorm
        # and has no SVF buffers to save on. On CPU (gloo) no SyncBatchNorm is used, so only the
        # broadcast keeps the running statistics equal across ranks.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    def train_step(net: nn.Module, batch: dict, i: int) -> dict:
        loss = _train_step(net, batch, optimizer, scaler, cfg, info, dtype, i)
        return {"loss": loss, "main": loss, "aux": 0.0}

    def validate(net: nn.Module) -> ValResult:
        r = evaluate_base(net, val_set, device=device, info=info, amp=tc.amp, batch_size=cfg.eval.batch_size,
                          workers=cfg.data.workers, progress=tc.progress)
        return ValResult(
            row={"on": "base_val", "miou": r["miou"], "fb_iou": r["fb_iou"], "episodes": r["images"]},
            best={"on": "base_val", "miou": r["miou"], "fb_iou": r["fb_iou"], "bg_iou": r["bg_iou"],
                  "per_class": {str(k): v for k, v in r["per_class"].items()}},
            message=("step %d: base-class mIoU %.2f (background IoU %.2f, FB-IoU %.2f) over %d val images%s",
                     100 * r["miou"], 100 * r["bg_iou"], 100 * r["fb_iou"], r["images"]),
            history_extra={"bg_iou": r["bg_iou"], "pixel_acc": r["pixel_acc"]})

    return run_training(
        cfg, info, model=model, optimizer=optimizer, scaler=scaler, ref_decay=None, train_set=train_set,
        loader=_loader, spe=spe, total=total, run_dir=run_dir, describe=describe, step=step, best=best,
        history=history, resumed=resume_state is not None, train_step=train_step,
        validate=validate if val_set is not None else None, desc="train base learner", log=logger,
        summary={"stage": "bam_base"})


def train_base_run(cfg: ExperimentConfig, *, run_dir: Optional[Path] = None, argv: Optional[Sequence[str]] = None,
                   info: Optional[DistInfo] = None) -> FitResult:
    """Stage 1 from a config: run folder, data, base learner, :func:`fit_base` (``cfg.resume`` continues).

    Args:
        cfg: Config with ``model.name == "bam_base"``.
        run_dir: Run folder (default ``cfg.run_dir()``).
        argv: The command line, recorded in ``meta.json``.
        info: Process-group info (default: from the torchrun environment).

    Returns:
        The :class:`~svfseg.engine.train.FitResult`.
    """
    from svfseg.engine.distributed import cleanup, init_distributed
    from svfseg.engine.model import build_model, describe as describe_model
    from svfseg.engine.run import load_resume_state, write_run_metadata

    if cfg.model.name != BASE_MODEL:
        raise ValueError(f"train_base_run: model.name must be {BASE_MODEL!r}, got {cfg.model.name!r}")
    own_group = info is None
    info = info or init_distributed(cfg.device)
    try:
        run_dir = Path(run_dir or cfg.run_dir())
        state = load_resume_state(cfg, run_dir)
        if info.is_main:
            write_run_metadata(run_dir, cfg, argv)
        barrier(info)
        train_set = semantic_dataset(cfg, "train")
        val_set = semantic_dataset(cfg, "val") if cfg.train.val_every else None
        model = build_model(cfg, pretrained=state is None)
        return fit_base(cfg, model, train_set, run_dir=run_dir, describe=describe_model(model, cfg), val_set=val_set,
                        info=info, resume_state=state)
    finally:
        if own_group:
            cleanup(info)


def score_base_checkpoint(checkpoint: str | Path, cfg: Optional[ExperimentConfig] = None, *,
                         out_dir: Optional[str | Path] = None, info: Optional[DistInfo] = None) -> dict:
    """Score a stage-1 checkpoint on the val split (base-class mIoU) and write ``results.json`` + ``results.md``.

    Args:
        checkpoint: A ``bam_base`` training checkpoint.
        cfg: Config (data root, fold); None: the checkpoint's own. Must describe the same model.
        out_dir: Output folder (default ``<checkpoint folder>/test_base``).
        info: Process-group info.

    Returns:
        The results dict.
    """
    from svfseg.engine.model import load_for_inference

    info = info or DistInfo()
    model, cfg, state = load_for_inference(checkpoint, cfg, device=info.device)
    if cfg.model.name != BASE_MODEL:
        raise ValueError(f"score_base_checkpoint: {checkpoint} holds a {cfg.model.name!r} model, not {BASE_MODEL!r}")
    ds = semantic_dataset(cfg, "val")
    r = evaluate_base(model, ds, device=info.device, info=info, amp=cfg.train.amp, batch_size=cfg.eval.batch_size,
                      workers=cfg.data.workers, progress=cfg.train.progress, desc="test (base classes)")
    out = {"checkpoint": str(checkpoint), "stage": "bam_base", "benchmark": cfg.data.benchmark, "fold": cfg.fold,
           "base_classes": list(ds.base_classes), "step": state.get("step"), **r,
           "per_class": {str(k): v for k, v in r["per_class"].items()}}
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent / "test_base"
    out["out_dir"] = str(out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(out, indent=1, default=str))
        (out_dir / "results.md").write_text(results_markdown(out))
        logger.info("base-class mIoU %.2f (background IoU %.2f, FB-IoU %.2f) over %d images -> %s",
                    100 * r["miou"], 100 * r["bg_iou"], 100 * r["fb_iou"], r["images"], out_dir)
    return out


def results_markdown(r: dict) -> str:
    """Markdown of a :func:`score_base_checkpoint` result."""
    from svfseg.data.splits import class_names

    names = class_names(r["benchmark"])
    lines = [f"# BAM base learner, {r['benchmark']} fold {r['fold']}", "",
             f"{r['images']} val images, original label size; novel classes count as background.", "",
             "| score | % |", "|---|---|",
             f"| base-class mIoU | {100 * r['miou']:.2f} |",
             f"| mIoU with background | {100 * r['miou_with_background']:.2f} |",
             f"| background IoU | {100 * r['bg_iou']:.2f} |", f"| FB-IoU | {100 * r['fb_iou']:.2f} |",
             f"| pixel accuracy | {100 * r['pixel_acc']:.2f} |", "", "| class | IoU % |", "|---|---|"]
    for k, v in r["per_class"].items():
        lines.append(f"| {int(k)} {names[int(k) - 1]} | {'n/a' if math.isnan(v) else f'{100 * v:.2f}'} |")
    return "\n".join(lines) + "\n"
