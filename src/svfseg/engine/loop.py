"""The one training loop: poly lr, AMP, last/best checkpoints, resume, Ctrl-C/SIGTERM, NaN stop, DDP.

What a step computes and how validation scores come from the task (``svfseg.engine.tasks``);
everything else here is the same for every task: the optimiser over the model's parameter
groups, the schedule, logging, checkpoints and their resume, stopping.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig, to_dict
from svfseg.data.samplers import EpochBatchSampler
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.data import make_loader
from svfseg.engine.distributed import DistInfo, all_reduce_sum, barrier, resolve_device, sync_trainable_batchnorm
from svfseg.engine.footprint import Footprint, write_trainable
from svfseg.engine.optim import build_optimizer, poly_lr, set_lr
from svfseg.engine.runlog import RunLogger, plot_curves
from svfseg.engine.runtime import amp_dtype, progress_bar, unwrap
from svfseg.engine.tasks.base import EvalSet, Task

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped without applying that step."""


@dataclass
class FitResult:
    """What :func:`fit` did."""

    status: str                        # finished | interrupted
    step: int
    total_steps: int
    run_dir: Path
    last_checkpoint: Optional[Path]
    best_checkpoint: Optional[Path]
    best: Optional[dict]
    seconds: float
    history: list = field(default_factory=list)


class StopRequest:
    """Context manager: SIGINT/SIGTERM set ``requested``, which a training loop reads between steps.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once. Handlers are installed only in the
    main thread and the previous ones are restored on exit.
    """

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested (signal %d): saving a resumable checkpoint after this step "
                       "(press Ctrl-C again to abort without saving)", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def steps_per_epoch(cfg: ExperimentConfig, n: int) -> int:
    """Optimiser steps per epoch: ``train.steps_per_epoch`` or pool size // global batch."""
    steps = cfg.train.steps_per_epoch or n // cfg.train.batch_size
    if steps < 1:
        raise ValueError(f"the training pool has {n} episodes, fewer than train.batch_size={cfg.train.batch_size}; "
                         f"lower the batch size or set train.steps_per_epoch")
    return steps


def gather_rng(info: DistInfo) -> list:
    """RNG states of every process, for the main process to store in a checkpoint.

    Args:
        info: Process-group info; every process must call this (collective under DDP).

    Returns:
        One :func:`~svfseg.engine.checkpoint.capture_rng` state per process, in rank order.
    """
    state = ckpt.capture_rng()
    if not info.distributed:
        return [state]
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def fit(
    cfg: ExperimentConfig,
    model: nn.Module,
    train_set: Dataset,
    *,
    task: Task,
    run_dir: Path,
    describe: dict,
    val: Optional[EvalSet] = None,
    info: Optional[DistInfo] = None,
    resume_state: Optional[dict] = None,
) -> FitResult:
    """Train ``model`` on ``train_set`` as ``cfg`` and ``task`` say, writing checkpoints and logs to ``run_dir``.

    The learning rate is ``poly_lr(step)`` times each group's ``optim.lr_mult``, set before
    every step. ``last.pt`` (resumable: model, optimiser, scaler, step, RNG, data position) is
    written at every epoch end, every ``train.checkpoint_every`` steps and on Ctrl-C/SIGTERM or
    ``train.stop_after_steps``; ``best.pt`` when the validation score (``miou``) improves, or
    the last model when nothing selects. A NaN/inf loss raises :class:`NonFiniteLoss` before
    that step is applied, leaving the last good checkpoint in place. Stops are agreed across
    processes.

    Args:
        cfg: Experiment config.
        model: The model (CPU or already on the device; not yet DDP-wrapped).
        train_set: Training items (``set_epoch`` if it has one + ``len``).
        task: What a step computes and how validation scores (:class:`~svfseg.engine.tasks.base.Task`).
        run_dir: Run folder.
        describe: Model description stored in checkpoints (see ``engine.model.describe``).
        val: Items checkpoints are selected on; None = no validation (best = last).
        info: Process-group info (None: single process on ``cfg.device``).
        resume_state: A loaded ``last.pt`` to continue from.

    Returns:
        A :class:`FitResult`.
    """
    info = info or DistInfo(device=resolve_device(cfg.device))
    device, run_dir, tc, oc = info.device, Path(run_dir), cfg.train, cfg.optim
    task.check_training(cfg, model, info)
    # Dropout and other in-model randomness use the global torch RNG: seed it per process and
    # carry its state in checkpoints so a resumed run draws the same numbers.
    torch.manual_seed(cfg.seed + info.rank)
    model = sync_trainable_batchnorm(model.to(device), info)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay_groups = ("svf",) if cfg.svf.decay_to == "pretrained" else ()
    optimizer, ref_decay = build_optimizer(model, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay,
                                           lr_mult=oc.lr_mult, decay_to_pretrained=decay_groups)
    dtype = amp_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    spe = steps_per_epoch(cfg, len(train_set))
    total = tc.epochs * spe
    step, best, history = 0, None, []
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if resume_state is not None:
        ckpt.check_compatible(describe, resume_state["describe"], last_path)
        ckpt.load_model_state(unwrap(model), resume_state["model"], last_path)
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        if ref_decay is not None:
            ref_decay.load_state_dict(resume_state["reference_decay"])
        step, best, history = resume_state["step"], resume_state.get("best"), list(resume_state.get("history", []))
        if resume_state.get("total_steps") != total:
            logger.warning("resume: the run now has %d steps, the checkpoint was made for %s; the poly schedule "
                           "changes from here on", total, resume_state.get("total_steps"))
        rng = resume_state["rng_per_rank"]
        ckpt.restore_rng(rng[info.rank] if info.rank < len(rng) else rng[0])
        logger.info("resumed %s at step %d/%d (epoch %d)", run_dir, step, total, step // spe)
    if info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=task.broadcast_buffers)
    model.train()

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_trainable(run_dir, unwrap(model))
    # Movement is measured from the run's step-0 weights (kept in the run folder); a resumed run
    # adds the earlier segments' seconds and peak memory (kept in last.pt).
    footprint = Footprint(unwrap(model), device, start_step=step, run_dir=run_dir if info.is_main else None,
                          earlier=(resume_state or {}).get("segments"))
    sampler = EpochBatchSampler(len(train_set), tc.batch_size, spe, cfg.seed, info.rank, info.world_size)
    runlog = RunLogger(run_dir, resume_step=step if resume_state is not None else None,
                       tensorboard=tc.tensorboard) if info.is_main else None
    best_metric = None if best is None else best["miou"]

    def model_blob() -> dict:
        return {"format": ckpt.FORMAT, "model": unwrap(model).state_dict(), "config": to_dict(cfg),
                "describe": describe, "step": step, "epoch": step // spe}

    def save_last(status: str) -> None:
        states = gather_rng(info)
        if info.is_main:
            blob = model_blob()
            blob.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), total_steps=total,
                        log_window=_window_state(window),
                        segments=footprint.segments(time.perf_counter() - t_start),
                        reference_decay=ref_decay.state_dict() if ref_decay is not None else None,
                        rng_per_rank=states, best=best, history=history, status=status,
                        data_position={"epoch": step // spe, "step_in_epoch": step % spe, "steps_per_epoch": spe})
            # NaN/inf weights with a finite loss must not replace the last sane checkpoint; the
            # one replaced stays as last.prev.pt, the fallback of --resume.
            ckpt.check_finite(blob, last_path, step)
            ckpt.save_atomic(blob, last_path, keep_previous=True, verify=True)
        barrier(info)

    def validate_and_select() -> None:
        nonlocal best, best_metric
        if val is None:
            return
        v = task.validate(model, val, cfg, info)
        improved = tc.select_on != "last" and (best_metric is None or v.row["miou"] > best_metric)
        row = {"step": step, "epoch": step // spe, **v.row, "best": int(improved)}
        history.append({**row, **v.history_extra})
        fmt, *args = v.message
        logger.info(fmt, step, *args, "  (best so far)" if improved else "")
        if runlog is not None:
            runlog.log_val(row)
        if improved:
            best_metric = v.row["miou"]
            best = {"step": step, "epoch": step // spe, **v.best}
            if info.is_main:
                blob = {**model_blob(), "metrics": best}
                ckpt.check_finite(blob, best_path, step)
                ckpt.save_atomic(blob, best_path, verify=True)

    def train_step(batch: dict) -> list[float]:
        loss, stats = task.loss(model, batch, cfg, info, dtype)
        values = stats.tolist()
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLoss(f"loss is {values[0]} (main {values[1]}, aux {values[2]}) at step {step + 1}; "
                                f"training stopped before applying it. The last good checkpoint is kept. Lower "
                                f"optim.lr, set optim.grad_clip, or use train.amp=off/bf16.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        if ref_decay is not None:
            ref_decay.apply()
        if not footprint.gradient_scale:
            footprint.observe_gradients(optimizer)
        if oc.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], oc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return values

    t_start = time.perf_counter()
    status, early_stop = "finished", False
    # BAM's extra validation half-way through each epoch but the first, on short schedules.
    half_val = bool(val is not None and tc.val_every and tc.half_epoch_val_max_epochs
                    and tc.epochs <= tc.half_epoch_val_max_epochs)
    bar = progress_bar(total, desc=task.train_desc, enabled=tc.progress and info.is_main, unit="step",
                       initial=step, leave=True)
    window = {"loss": 0.0, "main": 0.0, "aux": 0.0, "n": 0, "t": time.perf_counter()}
    if resume_state is not None and resume_state.get("log_window"):
        # the steps since the last CSV row before the stop count in the first row after the resume
        saved = resume_state["log_window"]
        window.update({k: saved[k] for k in ("loss", "main", "aux", "n")},
                      t=time.perf_counter() - saved.get("seconds", 0.0))
    try:
        with StopRequest() as stop:
            while step < total:
                epoch, first = divmod(step, spe)
                if first == 0 and _best_is_stale(best, epoch, spe, tc.early_stop_epochs):
                    logger.info("early stop before epoch %d: the best validation score (step %d) is %d or more "
                                "epochs old (train.early_stop_epochs)", epoch, best["step"], tc.early_stop_epochs)
                    early_stop = True
                    break
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(epoch)
                sampler.set_epoch(epoch, first)
                for batch in make_loader(train_set, batch_sampler=sampler, workers=cfg.data.workers,
                                         pin_memory=device.type == "cuda", collate_fn=task.collate_fn):
                    want_stop = stop.requested or (tc.stop_after_steps is not None and step >= tc.stop_after_steps)
                    if info.distributed:
                        want_stop = bool(all_reduce_sum(torch.tensor([float(want_stop)]), info).item())
                    if want_stop:
                        status = "interrupted"
                        break
                    lr = poly_lr(step, total, oc.lr, oc.power, oc.warmup_steps)
                    set_lr(optimizer, lr)
                    values = train_step(batch)
                    step += 1
                    for k, v in zip(("loss", "main", "aux"), values):
                        window[k] += v
                    window["n"] += 1
                    if bar is not None:
                        bar.update(1)
                    if step % tc.log_every == 0 or step == total:
                        _flush(window, step, epoch, lr, runlog, bar, t_start)
                    if half_val and epoch > 0 and step % spe == round(spe / 2) + 1:
                        validate_and_select()
                    if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step % spe:
                        save_last("running")
                if status == "interrupted":
                    break
                if tc.val_every and ((step // spe) % tc.val_every == 0 or step == total):
                    validate_and_select()
                save_last("running" if step < total else "finished")
        if early_stop:
            save_last("finished")
        if status == "interrupted":
            save_last("interrupted")
            logger.warning("stopped at step %d/%d; continue with `svfseg train --resume %s`", step, total, run_dir)
        elif val is None or tc.select_on == "last" or not best_path.exists():
            if info.is_main:
                blob = {**model_blob(), "metrics": history[-1] if history else None}
                ckpt.check_finite(blob, best_path, step)
                ckpt.save_atomic(blob, best_path, verify=True)
            barrier(info)
    finally:
        if bar is not None:
            bar.close()
        if runlog is not None:
            runlog.close()
            plot_curves(run_dir)
    segment_seconds = time.perf_counter() - t_start
    seconds = footprint.segments(segment_seconds)["seconds"]  # every segment of a resumed run
    if info.is_main:
        out = {"task": task.name, "model": cfg.model.name, "status": status, "early_stop": early_stop,
               "step": step, "total_steps": total, "seconds": seconds, "segment_seconds": segment_seconds,
               "best": best, "history": history, "footprint": footprint.summary(run_dir)}
        (run_dir / "train_summary.json").write_text(json.dumps(out, indent=1, default=str))
    return FitResult(status, step, total, run_dir, last_path, best_path if best_path.exists() else None, best,
                     seconds, history)


def _window_state(window: dict) -> dict:
    """The partial CSV-row window as plain numbers (sums, step count, seconds so far), for ``last.pt``."""
    return {"loss": window["loss"], "main": window["main"], "aux": window["aux"], "n": window["n"],
            "seconds": time.perf_counter() - window["t"]}


def _best_is_stale(best: Optional[dict], epoch: int, spe: int, patience: int) -> bool:
    """BAM's early stop: at the start of ``epoch``, the best score was reached ``patience`` or more epochs ago."""
    if not patience or best is None:
        return False
    return epoch - math.ceil(best["step"] / spe) >= patience


def _flush(window: dict, step: int, epoch: int, lr: float, runlog: Optional[RunLogger], bar, t0: float) -> None:
    n = max(window["n"], 1)
    now = time.perf_counter()
    row = {"step": step, "epoch": epoch, "loss": window["loss"] / n, "loss_main": window["main"] / n,
           "loss_aux": window["aux"] / n, "lr": lr, "steps_per_s": n / max(now - window["t"], 1e-9)}
    if runlog is not None:
        row["elapsed_s"] = now - t0
        runlog.log_train(row)
    if bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", epoch=epoch)
    window.update(loss=0.0, main=0.0, aux=0.0, n=0, t=now)
