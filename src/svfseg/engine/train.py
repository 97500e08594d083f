"""Meta-training loop: poly SGD, AMP, validation with best/last checkpoints, resume, Ctrl-C, DDP."""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig, to_dict
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.data import EpochBatchSampler, make_loader
from svfseg.engine.distributed import DistInfo, all_reduce_sum, barrier, resolve_device, sync_trainable_batchnorm
from svfseg.engine.evaluate import amp_dtype, autocast, evaluate, unwrap
from svfseg.engine.model import forward_episode
from svfseg.engine.optim import build_optimizer, poly_lr, set_lr
from svfseg.engine.runlog import RunLogger, plot_curves
from svfseg.losses import fewshot_loss, valid_pixel_count

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped without applying that step."""


@dataclass
class ValSet:
    """Episodes checkpoints are selected on: the dataset, the classes scored, and a label."""

    dataset: Dataset
    class_ids: Sequence[int]
    on: str = "test_fold"


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


def _model_blob(model: nn.Module, cfg: ExperimentConfig, describe: dict, step: int, epoch: int) -> dict:
    return {"format": ckpt.FORMAT, "model": unwrap(model).state_dict(), "config": to_dict(cfg),
            "describe": describe, "step": step, "epoch": epoch}


def fit(
    cfg: ExperimentConfig,
    model: nn.Module,
    train_set: Dataset,
    *,
    run_dir: Path,
    describe: dict,
    val: Optional[ValSet] = None,
    info: Optional[DistInfo] = None,
    resume_state: Optional[dict] = None,
) -> FitResult:
    """Meta-train ``model`` on ``train_set`` as ``cfg`` says, writing checkpoints and logs to ``run_dir``.

    The learning rate is ``poly_lr(step)`` times each group's multiplier, set before every step.
    ``last.pt`` (resumable: model, optimiser, scaler, step, RNG, data position) is written at
    every epoch end, every ``train.checkpoint_every`` steps and on Ctrl-C/SIGTERM; ``best.pt``
    when the selection score improves. A NaN/inf loss raises :class:`NonFiniteLoss` before
    that step is applied, leaving the last good checkpoint in place.

    Args:
        cfg: experiment config.
        model: the few-shot model (CPU or already on the device; not yet DDP-wrapped).
        train_set: training episodes (``set_epoch`` + ``len``).
        run_dir: run folder.
        describe: model description stored in checkpoints (see ``engine.model.describe``).
        val: episodes for validation/selection; None = no validation (best = last).
        info: process-group info (None: single process on ``cfg.device``).
        resume_state: a loaded ``last.pt`` to continue from.

    Returns:
        A :class:`FitResult`.
    """
    info = info or DistInfo(device=resolve_device(cfg.device))
    device = info.device
    run_dir = Path(run_dir)
    tc, oc = cfg.train, cfg.optim
    # Dropout and other in-model randomness use the global torch RNG: seed it per process and
    # carry its state in checkpoints so a resumed run draws the same numbers.
    torch.manual_seed(cfg.seed + info.rank)

    model = sync_trainable_batchnorm(model.to(device), info)
    decay_groups = ("svf",) if cfg.svf.decay_to == "pretrained" else ()
    optimizer, ref_decay = build_optimizer(model, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay,
                                           lr_mult=oc.lr_mult, decay_to_pretrained=decay_groups)
    dtype = amp_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    spe = steps_per_epoch(cfg, len(train_set))
    total = tc.epochs * spe
    step, best, history = 0, None, []
    if resume_state is not None:
        ckpt.check_compatible(describe, resume_state["describe"], run_dir / "last.pt")
        ckpt.load_model_state(unwrap(model), resume_state["model"], run_dir / "last.pt")
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        if ref_decay is not None:
            ref_decay.load_state_dict(resume_state["reference_decay"])
        step, best, history = resume_state["step"], resume_state.get("best"), list(resume_state.get("history", []))
        if resume_state.get("total_steps") != total:
            logger.warning("resume: the run now has %d steps, the checkpoint was made for %s; the poly schedule "
                           "changes from here on", total, resume_state.get("total_steps"))
        ckpt.restore_rng(resume_state["rng_per_rank"][info.rank] if info.rank < len(resume_state["rng_per_rank"])
                         else resume_state["rng_per_rank"][0])
        logger.info("resumed %s at step %d/%d (epoch %d)", run_dir, step, total, step // spe)
    if info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        # No buffer broadcast: the SVF layers keep U and Vh as buffers (millions of values for a
        # full backbone), which the default would re-send from rank 0 every step. Every buffer
        # here is constant during training (all BatchNorm is frozen, U/Vh/LUTs never change),
        # so the ranks stay identical without it.
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    model.train()

    def validate(net: nn.Module) -> ValResult:
        r = evaluate(net, val.dataset, class_ids=val.class_ids, device=device, info=info, amp=tc.amp,
                     batch_size=cfg.eval.batch_size, workers=cfg.data.workers, progress=tc.progress,
                     desc=f"val ({val.on})")
        return ValResult(
            row={"on": val.on, "miou": r["miou"], "fb_iou": r["fb_iou"], "episodes": r["episodes"]},
            best={"on": val.on, "miou": r["miou"], "fb_iou": r["fb_iou"],
                  "per_class": {str(k): v for k, v in r["per_class"].items()},
                  "episode_fingerprint": r["episode_fingerprint"]},
            message=("step %d: val (%s) mIoU %.2f FB-IoU %.2f over %d episodes%s",
                     val.on, 100 * r["miou"], 100 * r["fb_iou"], r["episodes"]))

    return run_training(
        cfg, info, model=model, optimizer=optimizer, scaler=scaler, ref_decay=ref_decay, train_set=train_set,
        loader=make_loader, spe=spe, total=total, run_dir=run_dir, describe=describe, step=step, best=best,
        history=history, resumed=resume_state is not None,
        train_step=lambda net, batch, i: _train_step(net, batch, optimizer, scaler, ref_decay, cfg, info, dtype, i),
        validate=validate if val is not None else None)


@dataclass
class ValResult:
    """One validation pass, as a trainer's ``validate`` callback reports it to :func:`run_training`."""

    row: dict                          # val.csv row without step/epoch/best (``miou`` is the selection score)
    best: dict                         # best.pt ``metrics`` / FitResult.best without step/epoch
    message: tuple                     # logger format (step first, "%s" last for the best-so-far mark) + args
    history_extra: dict = field(default_factory=dict)   # extra keys kept in the history row


def run_training(
    cfg: ExperimentConfig,
    info: DistInfo,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ref_decay,
    train_set: Dataset,
    loader: Callable,
    spe: int,
    total: int,
    run_dir: Path,
    describe: dict,
    step: int,
    best: Optional[dict],
    history: list,
    resumed: bool,
    train_step: Callable[[nn.Module, dict, int], dict],
    validate: Optional[Callable[[nn.Module], ValResult]],
    desc: str = "train",
    log: logging.Logger = logger,
    summary: Optional[dict] = None,
) -> FitResult:
    """The loop :func:`fit` and the BAM base learner share, from ``step`` to ``total`` (or a stop).

    Sets ``poly_lr`` before every step, stops on Ctrl-C/SIGTERM or ``train.stop_after_steps``
    (agreed across processes), logs a window mean every ``train.log_every`` steps, writes
    ``last.pt`` at epoch ends / every ``train.checkpoint_every`` steps / on a stop, validates
    every ``train.val_every`` epochs and writes ``best.pt`` on a better ``miou`` (or the last
    model when nothing selects), and writes ``train_summary.json``.

    Args:
        model: the model being trained (already on the device and DDP-wrapped where distributed).
        optimizer, scaler, ref_decay: stored in ``last.pt`` (``ref_decay`` may be None).
        loader: ``loader(train_set, batch_sampler=, workers=, pin_memory=)`` -> iterable of batches.
        step, best, history: where the run stands (from a resume state or fresh).
        resumed: whether the run continues from a checkpoint (the logs are cut back to ``step``).
        train_step: ``train_step(model, batch, step)`` applies one step and returns its
            ``loss``/``main``/``aux`` values.
        validate: ``validate(model)`` -> :class:`ValResult`; None = no validation (best = last).
        desc: progress-bar label.
        log: logger of the validation and stop lines.
        summary: extra leading keys of ``train_summary.json``.
    """
    tc, oc = cfg.train, cfg.optim
    device = info.device
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    sampler = EpochBatchSampler(len(train_set), tc.batch_size, spe, cfg.seed, info.rank, info.world_size)
    runlog = RunLogger(run_dir, resume_step=step if resumed else None,
                       tensorboard=tc.tensorboard) if info.is_main else None
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    best_metric = None if best is None else best["miou"]

    def save_last(status: str) -> None:
        states = gather_rng(info)
        if info.is_main:
            blob = _model_blob(model, cfg, describe, step, step // spe)
            blob.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), total_steps=total,
                        reference_decay=ref_decay.state_dict() if ref_decay is not None else None,
                        rng_per_rank=states, best=best, history=history, status=status,
                        data_position={"epoch": step // spe, "step_in_epoch": step % spe, "steps_per_epoch": spe})
            ckpt.save_atomic(blob, last_path)
        barrier(info)

    def validate_and_select() -> None:
        nonlocal best, best_metric
        if validate is None:
            return
        v = validate(model)
        improved = tc.select_on != "last" and (best_metric is None or v.row["miou"] > best_metric)
        row = {"step": step, "epoch": step // spe, **v.row, "best": int(improved)}
        history.append({**row, **v.history_extra})
        fmt, *args = v.message
        log.info(fmt, step, *args, "  (best so far)" if improved else "")
        if runlog is not None:
            runlog.log_val(row)
        if improved:
            best_metric = v.row["miou"]
            best = {"step": step, "epoch": step // spe, **v.best}
            if info.is_main:
                blob = _model_blob(model, cfg, describe, step, step // spe)
                blob["metrics"] = best
                ckpt.save_atomic(blob, best_path)

    t_start = time.perf_counter()
    status = "finished"
    bar = _progress(total, step, tc.progress and info.is_main, desc)
    window = {"loss": 0.0, "main": 0.0, "aux": 0.0, "n": 0, "t": time.perf_counter()}
    try:
        with StopRequest() as stop:
            while step < total:
                epoch, first = divmod(step, spe)
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(epoch)
                sampler.set_epoch(epoch, first)
                for batch in loader(train_set, batch_sampler=sampler, workers=cfg.data.workers,
                                    pin_memory=device.type == "cuda"):
                    want_stop = stop.requested or (tc.stop_after_steps is not None and step >= tc.stop_after_steps)
                    if info.distributed:
                        want_stop = bool(all_reduce_sum(torch.tensor([float(want_stop)]), info).item())
                    if want_stop:
                        status = "interrupted"
                        break
                    lr = poly_lr(step, total, oc.lr, oc.power, oc.warmup_steps)
                    set_lr(optimizer, lr)
                    stats = train_step(model, batch, step)
                    step += 1
                    for k in ("loss", "main", "aux"):
                        window[k] += stats[k]
                    window["n"] += 1
                    if bar is not None:
                        bar.update(1)
                    if step % tc.log_every == 0 or step == total:
                        _flush(window, step, epoch, lr, runlog, bar, t_start)
                    if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step % spe:
                        save_last("running")
                if status == "interrupted":
                    break
                if tc.val_every and ((step // spe) % tc.val_every == 0 or step == total):
                    validate_and_select()
                save_last("running" if step < total else "finished")
        if status == "interrupted":
            save_last("interrupted")
            log.warning("stopped at step %d/%d; continue with `svfseg train --resume %s`", step, total, run_dir)
        elif validate is None or tc.select_on == "last" or not best_path.exists():
            if info.is_main:
                blob = _model_blob(model, cfg, describe, step, step // spe)
                blob["metrics"] = history[-1] if history else None
                ckpt.save_atomic(blob, best_path)
            barrier(info)
    finally:
        if bar is not None:
            bar.close()
        if runlog is not None:
            runlog.close()
            plot_curves(run_dir)
    seconds = time.perf_counter() - t_start
    if info.is_main:
        out = {**(summary or {}), "status": status, "step": step, "total_steps": total, "seconds": seconds,
               "best": best, "history": history}
        (run_dir / "train_summary.json").write_text(json.dumps(out, indent=1, default=str))
    return FitResult(status, step, total, run_dir, last_path, best_path if best_path.exists() else None, best,
                     seconds, history)


def _train_step(model, batch, optimizer, scaler, ref_decay, cfg, info, dtype, step) -> dict:
    device = info.device
    nb = device.type == "cuda"
    target = batch["query_mask"].to(device, non_blocking=nb)
    normalizer = None
    if info.distributed:
        # Divide the summed CE by the global pixel count (x world size, since DDP averages the
        # gradients) so W processes compute exactly the gradient of one process on the batch.
        normalizer = all_reduce_sum(valid_pixel_count(target), info) / info.world_size
    with autocast(device, dtype):
        out = forward_episode(model, batch, device, non_blocking=nb)
    logits, aux = (out.logits, tuple(out.aux_logits)) if hasattr(out, "logits") else (out, ())
    loss, parts = fewshot_loss(logits, aux, target, aux_weight=cfg.train.aux_weight, normalizer=normalizer)
    stats = torch.stack([loss.detach(), parts["main"], parts["aux"]]).float()
    if info.distributed:
        stats = all_reduce_sum(stats, info)
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
    if cfg.optim.grad_clip:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    # Under DDP each process's share is normalised by global pixels / W, so the sum over the
    # W processes is W times the batch loss.
    w = info.world_size
    return {"loss": values[0] / w, "main": values[1] / w, "aux": values[2] / w}


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


def _progress(total: int, initial: int, enabled: bool, desc: str = "train"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


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
