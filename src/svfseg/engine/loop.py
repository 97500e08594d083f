"""The one training loop: poly lr, AMP, when to validate and checkpoint, Ctrl-C/SIGTERM, NaN stop, DDP.

What a step computes and how validation scores come from the task (``svfseg.engine.tasks``); the
model, optimiser and counters, and how they are written and resumed, from the
:class:`~svfseg.engine.state.TrainingState`. What is left here is the same for every task: the
schedule, the step, logging, when to validate, checkpoint and stop.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.data.samplers import EpochBatchSampler
from svfseg.engine.data import make_loader
from svfseg.engine.distributed import DistInfo, all_reduce_sum, barrier
from svfseg.engine.footprint import Footprint, write_trainable
from svfseg.engine.optim import poly_lr, set_lr
from svfseg.engine.runfolder import write_json_atomic
from svfseg.engine.runlog import LogWindow, RunLogger, plot_curves
from svfseg.engine.runtime import progress_bar
from svfseg.engine.state import TrainingState
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


def fit(cfg: ExperimentConfig, state: TrainingState, train_set: Dataset, *, task: Task,
        val: Optional[EvalSet] = None, start: Optional[Callable[[], None]] = None) -> FitResult:
    """Train ``state.model`` on ``train_set`` as ``cfg`` and ``task`` say, from ``state.step`` to the end.

    The learning rate is ``poly_lr(step)`` times each group's ``optim.lr_mult``. ``last.pt`` is
    written at every epoch end, every ``train.checkpoint_every`` steps and on Ctrl-C/SIGTERM or
    ``train.stop_after_steps``; ``best.pt`` when the validation ``miou`` improves, or the last
    model when nothing selects. A NaN/inf loss raises :class:`NonFiniteLoss` before that step is
    applied, leaving the last good checkpoint. Stops are agreed across processes.

    Args:
        cfg: Experiment config.
        state: The model, optimiser and counters: step 0, or restored from a ``last.pt``.
        train_set: Training items (``set_epoch`` if it has one + ``len``).
        task: What a step computes and how validation scores (:class:`~svfseg.engine.tasks.base.Task`).
        val: Items checkpoints are selected on; None = no validation (best = last).
        start: The caller's first writes (``engine.run.train_run``: ``config.yaml``, ``meta.json``, the
            validation episodes), made on the main process once the task's checks have passed.
    """
    info, tc, oc, spe, run_dir = state.info, cfg.train, cfg.optim, state.steps_per_epoch, state.run_dir
    if len(train_set) != state.train_items:
        raise ValueError(f"fit: the training set has {len(train_set)} items, the TrainingState was made for "
                         f"{state.train_items} (its steps per epoch and schedule); build both from the same set")
    task.check_training(cfg, state.model, info)  # before anything of the run is written
    if info.is_main and start is not None:
        start()
    barrier(info)
    folder, resume = state.folder, state.resume
    net = _for_processes(state.model, info, task)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_trainable(folder, state.model)
    state.write_forms()  # a plan given (svf.plan) or resumed is in the run folder from the start
    # Movement is measured from the run's step-0 weights (written to the run folder at step 0, read
    # back by the resume); a resumed run adds the earlier segments' seconds and peak memory (kept in last.pt).
    footprint = Footprint(state.model, info.device, start_step=state.step, earlier=state.earlier_segments,
                          initial=resume.initial_backbone() if resume is not None and info.is_main else None)
    if info.is_main and resume is None:
        footprint.write_initial(folder.initial_backbone)
    sampler = EpochBatchSampler(len(train_set), tc.batch_size, spe, cfg.seed, info.rank, info.world_size)
    runlog = RunLogger(folder, keep_through=resume.log_rows_through() if resume is not None else None,
                       tensorboard=tc.tensorboard) if info.is_main else None
    window, t_start = LogWindow(state.log_window), time.perf_counter()
    bar = progress_bar(state.total, desc=task.train_desc, enabled=tc.progress and info.is_main, unit="step",
                       initial=state.step, leave=True)
    status, early_stop, half_val = "finished", False, _validates_half_way(val, tc)

    def save_last(now: str) -> None:
        state.write_last(now, segments=footprint.segments(time.perf_counter() - t_start), log_window=window.state())

    try:
        with StopRequest() as stop:
            while state.step < state.total:
                epoch, first = divmod(state.step, spe)
                if first == 0 and _best_is_stale(state.best, epoch, spe, tc.early_stop_epochs):
                    logger.info("early stop before epoch %d: the best validation score (step %d) is %d or more "
                                "epochs old (train.early_stop_epochs)", epoch, state.best["step"],
                                tc.early_stop_epochs)
                    early_stop = True
                    break
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(epoch)
                sampler.set_epoch(epoch, first)
                for batch in make_loader(train_set, batch_sampler=sampler, workers=cfg.data.workers,
                                         pin_memory=info.device.type == "cuda", collate_fn=task.collate_fn):
                    if _stop_agreed(stop, state.step, tc, info):
                        status = "interrupted"
                        break
                    if state.forms_pending:
                        _measure_forms(state, batch, task, cfg)
                    lr = poly_lr(state.step, state.total, oc.lr, oc.power, oc.warmup_steps)
                    set_lr(state.optimizer, lr)
                    window.add(_train_step(net, batch, state, task, cfg, footprint))
                    state.step += 1
                    if bar is not None:
                        bar.update(1)
                    if state.step % tc.log_every == 0 or state.step == state.total:
                        window.flush(state.step, epoch, lr, runlog, bar, t_start)
                    if half_val and epoch > 0 and state.step % spe == round(spe / 2) + 1:
                        _validate_and_select(net, state, task, val, cfg, runlog)
                    if tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step % spe:
                        save_last("running")
                if status == "interrupted":
                    break
                if tc.val_every and (state.epoch % tc.val_every == 0 or state.step == state.total):
                    _validate_and_select(net, state, task, val, cfg, runlog)
                save_last("running" if state.step < state.total else "finished")
        if early_stop:
            save_last("finished")
        if status == "interrupted":
            save_last("interrupted")
            logger.warning("stopped at step %d/%d; continue with `svfseg train --resume %s`", state.step,
                           state.total, run_dir)
        elif val is None or tc.select_on == "last" or not state.best_path.exists():
            state.write_best(state.history[-1] if state.history else None)
            barrier(info)
    finally:
        if bar is not None:
            bar.close()
        if runlog is not None:
            runlog.close()
            plot_curves(folder)
    return _finish(state, task, cfg, status, early_stop, footprint, time.perf_counter() - t_start)


def _for_processes(model: nn.Module, info: DistInfo, task: Task) -> nn.Module:
    """``model`` in train mode, DDP-wrapped when there are several processes."""
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=task.broadcast_buffers)
    return model.train()


def _measure_forms(state: TrainingState, batch: dict, task: Task, cfg: ExperimentConfig) -> None:
    """The SVF forms plan, measured by rank 0 on one forward of the first batch (engine.forms)."""
    alone = DistInfo(device=state.info.device)  # the measuring forward runs on rank 0 only: no collectives
    state.measure_forms(lambda: task.loss(state.model, batch, cfg, alone, state.dtype))


def _train_step(net: nn.Module, batch: dict, state: TrainingState, task: Task, cfg: ExperimentConfig,
                footprint: Footprint) -> list[float]:
    """One optimiser step on ``batch``; its [loss, main, aux]. A non-finite loss raises before anything is applied."""
    loss, stats = task.loss(net, batch, cfg, state.info, state.dtype)
    values = stats.tolist()
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLoss(f"loss is {values[0]} (main {values[1]}, aux {values[2]}) at step {state.step + 1}; "
                            f"training stopped before applying it. The last good checkpoint is kept. Lower "
                            f"optim.lr, set optim.grad_clip, or use train.amp=off/bf16.")
    optimizer, scaler = state.optimizer, state.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if state.reference_decay is not None:
        state.reference_decay.apply()
    if not footprint.gradient_scale:
        footprint.observe_gradients(optimizer)
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return values


def _validate_and_select(net: nn.Module, state: TrainingState, task: Task, val: Optional[EvalSet],
                         cfg: ExperimentConfig, runlog: Optional[RunLogger]) -> None:
    """Score ``net`` on ``val``, log it, and write ``best.pt`` when it is the best so far."""
    if val is None:
        return
    v = task.validate(net, val, cfg, state.info)
    row, improved = state.record_validation(v.row, v.best, v.history_extra, select=cfg.train.select_on != "last")
    fmt, *args = v.message
    logger.info(fmt, state.step, *args, "  (best so far)" if improved else "")
    if runlog is not None:
        runlog.log_val(row)
    if improved:
        state.write_best(state.best)


def _stop_agreed(stop: StopRequest, step: int, tc, info: DistInfo) -> bool:
    """A signal arrived or ``train.stop_after_steps`` is reached, on any process (all of them then stop)."""
    want = stop.requested or (tc.stop_after_steps is not None and step >= tc.stop_after_steps)
    if info.distributed:
        want = bool(all_reduce_sum(torch.tensor([float(want)]), info).item())
    return want


def _validates_half_way(val: Optional[EvalSet], tc) -> bool:
    """BAM's extra validation half-way through each epoch but the first, on short schedules."""
    return bool(val is not None and tc.val_every and tc.half_epoch_val_max_epochs
                and tc.epochs <= tc.half_epoch_val_max_epochs)


def _best_is_stale(best: Optional[dict], epoch: int, spe: int, patience: int) -> bool:
    """BAM's early stop: at the start of ``epoch``, the best score was reached ``patience`` or more epochs ago."""
    if not patience or best is None:
        return False
    return epoch - math.ceil(best["step"] / spe) >= patience


def _finish(state: TrainingState, task: Task, cfg: ExperimentConfig, status: str, early_stop: bool,
            footprint: Footprint, segment_seconds: float) -> FitResult:
    """``train_summary.json`` (main process) and the :class:`FitResult`."""
    seconds = footprint.segments(segment_seconds)["seconds"]  # every segment of a resumed run
    folder = state.folder
    if state.info.is_main:
        out = {"task": task.name, "model": cfg.model.name, "status": status, "early_stop": early_stop,
               "step": state.step, "total_steps": state.total, "seconds": seconds,
               "segment_seconds": segment_seconds, "best": state.best, "history": state.history,
               "footprint": footprint.summary(folder)}
        # compare reads it to tell a finished cell: never half a file
        write_json_atomic(folder.summary, out, default=str)
    return FitResult(status, state.step, state.total, folder.path, state.last_path,
                     state.best_path if state.best_path.exists() else None, state.best, seconds, state.history)
