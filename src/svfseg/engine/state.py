"""A training run's resumable state and its checkpoint life cycle: everything ``--resume`` decides, in one file.

:class:`TrainingState` is what continues a run: the model, the optimiser (with the AMP grad scaler
and SVF's decay towards the pretrained values), the step, the best validation score and the
validation history, every process's RNG, the data position, the earlier segments' footprint and
the partial log row. It is written here (``last.pt``, keeping the file it replaces as
``last.prev.pt``; ``best.pt``), found again here for ``--resume`` (a damaged ``last.pt`` falls back
to ``last.prev.pt``), checked here and restored here, once: the checkpoint's weights are loaded
into the model in :meth:`TrainingState._restore` and nowhere else.

What else a resume decides is a :class:`Resume`, made once by :func:`resume_point` and handed to
those who ask: which validation episodes to read back (the task), which log rows to keep (the
logger) and the step-0 weights movement is measured from (the footprint).

The way through: ``svfseg train --resume RUN`` -> :func:`resume_config` (the run's own config) ->
``engine.run.train_run`` -> :func:`resume_point` (the checks, the file, the warnings) ->
:class:`TrainingState` (the restore) -> ``engine.loop.fit`` (the steps).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from svfseg.config import ExperimentConfig, load_config, to_dict
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.distributed import DistInfo, barrier, resolve_device, sync_trainable_batchnorm
from svfseg.engine.forms import CHECKPOINT_KEY, initial_forms, measure_forms, needs_measuring, write_forms
from svfseg.engine.optim import build_optimizer
from svfseg.engine.runfolder import RunFolder
from svfseg.engine.runtime import amp_dtype

logger = logging.getLogger(__name__)

#: What a ``last.pt`` must hold to continue a run.
RESUMABLE_KEYS = ("model", "optimizer", "describe", "step", "rng_per_rank")
#: Config keys a resume may change without a warning (how it runs, not what it computes).
_QUIET_CHANGES = {"resume", "train.stop_after_steps", "train.progress", "threads"}


def steps_per_epoch(cfg: ExperimentConfig, n: int) -> int:
    """Optimiser steps per epoch: ``train.steps_per_epoch`` or pool size // global batch."""
    steps = cfg.train.steps_per_epoch or n // cfg.train.batch_size
    if steps < 1:
        raise ValueError(f"the training pool has {n} episodes, fewer than train.batch_size={cfg.train.batch_size}; "
                         f"lower the batch size or set train.steps_per_epoch")
    return steps


def resume_config(run_dir: str | os.PathLike | RunFolder, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config of an existing run folder with ``resume=true`` and any further overrides."""
    folder = RunFolder(run_dir)
    if not folder.config.exists():
        raise FileNotFoundError(f"--resume {folder.path}: no {folder.config.name} there (is it a run folder?)")
    return load_config(folder.config, [*overrides, "resume=true"])


class Resume:
    """What ``--resume`` decided beyond the restore (:class:`TrainingState` does that), for those who ask.

    Args:
        checkpoint: the ``last.pt`` (or ``last.prev.pt``) read once by :func:`load_resume_state`.
        folder: the run folder.
    """

    def __init__(self, checkpoint: dict, folder: str | os.PathLike | RunFolder):
        self._checkpoint: Optional[dict] = checkpoint
        self.folder = RunFolder(folder)
        #: The step the run continues from.
        self.step = int(checkpoint["step"])

    def take_checkpoint(self) -> dict:
        """The checkpoint, handed over once (to :class:`TrainingState`'s restore; not kept: it holds every weight)."""
        blob, self._checkpoint = self._checkpoint, None
        if blob is None:
            raise RuntimeError(f"resume {self.folder.path}: its checkpoint was restored already")
        return blob

    def validation_file(self, on: str) -> Optional[Path]:
        """The run's own validation episodes (``on``), read back so that it selects on the same ones; None when
        the file is gone (new episodes are then made from the seed and kept)."""
        path = self.folder.val_episodes(on)
        return path if path.exists() else None

    def log_rows_through(self) -> int:
        """The last step whose CSV/TensorBoard rows are kept: rows written after ``last.pt`` are written again."""
        return self.step

    def initial_backbone(self) -> Optional[dict]:
        """The trained backbone tensors at step 0 (what movement is measured from), None when missing or unreadable."""
        path = self.folder.initial_backbone
        if not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged file: movement is measured from the resume point
            logger.warning("%s: unreadable (%s); movement is measured from step %d", path, e, self.step)
            return None


def resume_if_resumable(cfg: ExperimentConfig, run_dir: str | os.PathLike | RunFolder) -> bool:
    """Turn ``cfg.resume`` on when the run folder holds a ``last.pt`` to continue (``compare``'s cells); whether it did.

    Without one, whatever the folder holds is from an attempt that never checkpointed: the caller
    starts it afresh (``train_run(..., overwrite=not cfg.resume)``).
    """
    folder = RunFolder(run_dir)
    if folder.resumable():
        cfg.resume = True
        logger.info("resuming %s", folder.path)
    return cfg.resume


def resume_point(cfg: ExperimentConfig, run_dir: str | os.PathLike | RunFolder, *, is_main: bool = True,
                 overwrite: bool = False) -> Optional[Resume]:
    """Everything ``--resume`` decides before a run starts, called once (``engine.run.train_run``).

    A fresh run (``cfg.resume`` off) gets None after the folder is checked (:func:`load_resume_state`);
    a resume gets the :class:`Resume` of its ``last.pt``, read once, with a warning per config key
    that changed since the checkpoint.

    Raises:
        ValueError: ``overwrite`` and ``cfg.resume`` together.
        FileNotFoundError, CheckpointError, FileExistsError: as :func:`load_resume_state`.
    """
    folder = RunFolder(run_dir)
    if overwrite and cfg.resume:
        raise ValueError(f"{folder.path}: --overwrite starts the run afresh, --resume continues it; give one")
    saved = load_resume_state(cfg, folder, is_main=is_main, overwrite=overwrite)
    if saved is None:
        return None
    _warn_config_changes(saved["config"], to_dict(cfg))
    return Resume(saved, folder)


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = prefix + k
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("optim.lr_mult", "model.head"):
            _warn_config_changes(a, b, key + ".")
        elif a != b and key not in _QUIET_CHANGES:
            logger.warning("resume: config key '%s' changed from %r to %r", key, a, b)


def load_resume_state(cfg: ExperimentConfig, run_dir: str | os.PathLike | RunFolder, *, is_main: bool = True,
                      overwrite: bool = False) -> Optional[dict]:
    """The run folder's ``last.pt`` when ``cfg.resume`` is set; None for a fresh run.

    A ``last.pt`` that is missing, truncated or not a training checkpoint falls back to
    ``last.prev.pt`` (the one it replaced) with a warning; the damaged file is kept as
    ``last.damaged.pt``.

    Args:
        cfg: Experiment config (``resume`` read).
        run_dir: The run folder.
        is_main: This process may move a damaged ``last.pt`` aside (one process under DDP).
        overwrite: A fresh run may replace the run files in ``run_dir`` (``train --overwrite``).

    Returns:
        The loaded checkpoint, or None.

    Raises:
        FileNotFoundError: ``cfg.resume`` is set but there is no ``last.pt`` (nor ``last.prev.pt``).
        CheckpointError: ``last.pt`` is damaged and there is no good ``last.prev.pt``.
        FileExistsError: A fresh run would write into a folder that holds run files
            (:meth:`RunFolder.present`, e.g. a finished run whose ``last.pt`` was deleted) and
            ``overwrite`` is off.
    """
    folder = RunFolder(run_dir)
    if cfg.resume:
        if not folder.resumable():
            raise FileNotFoundError(f"resume: {folder.last} does not exist (start the run without resume=true)")
        return _load_or_fall_back(folder, is_main)
    if overwrite:
        return None
    present = folder.present()
    if present:
        names = ", ".join(p.name for p in present[:6]) + (", ..." if len(present) > 6 else "")
        how = (f"continue it with `svfseg train --resume {folder.path}`, " if folder.resumable() else
               f"its {folder.last.name} is gone, so it cannot be resumed; ")
        raise FileExistsError(f"{folder.path} already holds a run ({names}); {how}replace it with "
                              f"`svfseg train --overwrite ...` or start another with name=<new name>")
    return None


def _load_or_fall_back(folder: RunFolder, is_main: bool) -> dict:
    """``last.pt``, or ``last.prev.pt`` with a warning when ``last.pt`` is missing, damaged or foreign."""
    last, prev = folder.last, folder.previous
    try:
        return ckpt.read_checkpoint(last, RESUMABLE_KEYS, "a resumable svfseg training checkpoint")
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        if not prev.exists():
            raise
        state = ckpt.read_checkpoint(prev, RESUMABLE_KEYS, "a resumable svfseg training checkpoint")
        logger.warning("resume: %s; continuing from the previous checkpoint %s (step %s)", e, prev.name,
                       state.get("step"))
        if is_main and last.exists():
            # keep the damaged file for a look, out of the way of the next save's rotation
            os.replace(last, folder.damaged)
        return state


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


class TrainingState:
    """The model on its device and everything else that continues the run; restored from ``resume_from``.

    Creating it moves the model to ``info.device`` (trainable BatchNorm synchronised under DDP on
    GPUs, ``train.channels_last`` applied), seeds the in-model randomness per process and builds the
    optimiser over the model's parameter groups. Nothing is written.

    Args:
        cfg: Experiment config.
        model: The model (not DDP-wrapped); trained in place.
        run_dir: Run folder (``last.pt``/``best.pt``): a path or its :class:`RunFolder`.
        describe: Model description stored in checkpoints and checked on resume (``engine.model.describe``).
        train_items: Size of the training pool (with ``train.batch_size``: the steps per epoch).
        info: Process-group info (None: one process on ``cfg.device``).
        resume_from: The :class:`Resume` of :func:`resume_point` (or a ``last.pt`` loaded by
            :func:`load_resume_state`) to continue, kept as :attr:`resume`; None: step 0.

    Raises:
        CheckpointMismatch: ``resume_from`` was written for another model, fold or class count.
        ValueError: ``resume_from`` is already past the run's step count.
    """

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, *, run_dir: str | os.PathLike | RunFolder,
                 describe: dict, train_items: int, info: Optional[DistInfo] = None,
                 resume_from: Optional[Resume | dict] = None):
        info = info or DistInfo(device=resolve_device(cfg.device))
        self.folder = RunFolder(run_dir)
        self.cfg, self.info, self.run_dir, self.describe = cfg, info, self.folder.path, describe
        self.train_items = train_items
        self.steps_per_epoch = steps_per_epoch(cfg, train_items)
        self.total = cfg.train.epochs * self.steps_per_epoch
        # Dropout and other in-model randomness use the global torch RNG: seeded per process, and
        # its state travels in last.pt so that a resumed run draws the same numbers.
        torch.manual_seed(cfg.seed + info.rank)
        model = sync_trainable_batchnorm(model.to(info.device), info)
        self.model = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
        oc = cfg.optim
        self.optimizer, self.reference_decay = build_optimizer(
            self.model, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay, lr_mult=oc.lr_mult,
            decay_to_pretrained=("svf",) if cfg.svf.decay_to == "pretrained" else ())
        self.dtype = amp_dtype(cfg.train.amp, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        self.step, self.best, self.history = 0, None, []
        #: From the checkpoint resumed: the earlier segments' footprint and the partial CSV row.
        self.earlier_segments: Optional[dict] = None
        self.log_window: Optional[dict] = None
        if isinstance(resume_from, dict):
            resume_from = Resume(resume_from, self.folder)
        #: What the resume decided (None: a fresh run): the log rows kept, the step-0 weights.
        self.resume: Optional[Resume] = resume_from
        self.resumed = resume_from is not None
        blob = resume_from.take_checkpoint() if resume_from is not None else None
        # the SVF forms plan: the checkpoint's, svf.plan's, or measured on the first step (engine.forms)
        self.forms = initial_forms(self.model, cfg.svf.plan, blob)
        self.forms_pending = needs_measuring(self.model, self.forms)
        if blob is not None:
            self._restore(blob)

    @property
    def last_path(self) -> Path:
        return self.folder.last

    @property
    def best_path(self) -> Path:
        return self.folder.best

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def best_metric(self) -> Optional[float]:
        return None if self.best is None else self.best["miou"]

    def _restore(self, blob: dict) -> None:
        """Continue from ``blob``: weights, optimiser, scaler, reference decay, counters, this process's RNG."""
        path = self.last_path
        if blob["step"] > self.total:
            raise ValueError(f"--resume {self.run_dir}: the checkpoint is at step {blob['step']}, but the config "
                             f"gives {self.total} steps in all (train.epochs x steps per epoch); raise train.epochs "
                             f"to continue")
        ckpt.check_compatible(self.describe, blob["describe"], path)
        ckpt.load_model_state(self.model, blob["model"], path)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scaler.load_state_dict(blob["scaler"])
        if self.reference_decay is not None:
            self.reference_decay.load_state_dict(blob["reference_decay"])
        self.step, self.best, self.history = blob["step"], blob.get("best"), list(blob.get("history", []))
        self.earlier_segments, self.log_window = blob.get("segments"), blob.get("log_window")
        if blob.get("total_steps") != self.total:
            logger.warning("resume: the run now has %d steps, the checkpoint was made for %s; the poly schedule "
                           "changes from here on", self.total, blob.get("total_steps"))
        rng = blob["rng_per_rank"]
        ckpt.restore_rng(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
        logger.info("resumed %s at step %d/%d (epoch %d)", self.run_dir, self.step, self.total, self.epoch)

    def measure_forms(self, run_forward) -> None:
        """Measure the forms plan on ``run_forward`` (rank 0, one forward of the first batch), share it, record it."""
        self.forms = measure_forms(self.model, run_forward, self.info)
        self.forms_pending = False
        self.write_forms()

    def write_forms(self) -> None:
        """``svf_forms.json`` in the run folder, when the run has a plan (main process only)."""
        if self.info.is_main and self.forms is not None:
            write_forms(self.run_dir, self.forms)

    def record_validation(self, scores: dict, best: dict, extra: dict, *, select: bool) -> tuple[dict, bool]:
        """Add a validation to the history: (its log row, whether it is the best so far; then ``best`` is kept)."""
        improved = select and (self.best_metric is None or scores["miou"] > self.best_metric)
        row = {"step": self.step, "epoch": self.epoch, **scores, "best": int(improved)}
        self.history.append({**row, **extra})
        if improved:
            self.best = {"step": self.step, "epoch": self.epoch, **best}
        return row, improved

    def _weights(self) -> dict:
        return {"format": ckpt.FORMAT, "model": self.model.state_dict(), "config": to_dict(self.cfg),
                "describe": self.describe, "step": self.step, "epoch": self.epoch,
                CHECKPOINT_KEY: self.forms.to_dict() if self.forms is not None else None}

    def write_last(self, status: str, *, segments: dict, log_window: dict) -> None:
        """Write ``last.pt`` (every process calls this: the RNG states are gathered).

        NaN/inf weights with a finite loss never replace the last sane file; the file replaced stays
        as ``last.prev.pt``, the fallback of ``--resume``.
        """
        states = gather_rng(self.info)
        if self.info.is_main:
            spe = self.steps_per_epoch
            blob = {**self._weights(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "total_steps": self.total, "log_window": log_window, "segments": segments,
                    "reference_decay": self.reference_decay.state_dict() if self.reference_decay else None,
                    "rng_per_rank": states, "best": self.best, "history": self.history, "status": status,
                    "data_position": {"epoch": self.epoch, "step_in_epoch": self.step % spe, "steps_per_epoch": spe}}
            ckpt.check_finite(blob, self.last_path, self.step)
            ckpt.save_atomic(blob, self.last_path, keep_previous=True, verify=True)
        barrier(self.info)

    def write_best(self, metrics: Optional[dict]) -> None:
        """Write ``best.pt``: the weights now, with ``metrics`` (main process only)."""
        if self.info.is_main:
            blob = {**self._weights(), "metrics": metrics}
            ckpt.check_finite(blob, self.best_path, self.step)
            ckpt.save_atomic(blob, self.best_path, verify=True)
