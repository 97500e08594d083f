"""One training run from a config: run folder, the model's task and data, the model, the loop, resume."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import svfseg
from svfseg.config import ExperimentConfig, dump_yaml, git_commit, load_config, to_dict
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.distributed import DistInfo, barrier, cleanup, init_distributed
from svfseg.engine.loop import FitResult, fit, steps_per_epoch
from svfseg.engine.model import build_model, describe, preflight
from svfseg.engine.runfiles import clear_run, run_files
from svfseg.engine.runlock import RunLock
from svfseg.engine.tasks import get_task
from svfseg.models import model_recipe

logger = logging.getLogger(__name__)


def write_run_metadata(run_dir: Path, cfg: ExperimentConfig, argv: Optional[Sequence[str]] = None,
                       *, resumed: bool = False) -> None:
    """``config.yaml`` (the resolved config) and ``meta.json`` (version, commit, command, torch).

    ``meta.json`` keeps the first command under ``command`` and appends every start (fresh or
    resumed) to ``history``; nothing earlier is overwritten.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    command = list(argv) if argv is not None else sys.argv
    meta = {"svfseg_version": svfseg.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "command": command, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    meta_path = run_dir / "meta.json"
    old = _read_meta(meta_path) if resumed else {}
    start = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "resume": resumed, "command": command, "host": meta["host"], "svfseg_version": meta["svfseg_version"],
             "git_commit": meta["git_commit"]}
    if old:
        meta = {**meta, **{k: v for k, v in old.items() if k != "history"}}
    meta["history"] = [*old.get("history", []), start]
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    if "history" not in meta and "command" in meta:  # written before histories existed
        meta["history"] = [{"resume": False, "command": meta["command"]}]
    return meta


def check_resume_steps(state: Optional[dict], total: int, run_dir: Path) -> None:
    """Refuse a resume whose checkpoint is already past the run's (new) step count."""
    if state is not None and state.get("step", 0) > total:
        raise ValueError(f"--resume {run_dir}: the checkpoint is at step {state['step']}, but the config gives "
                         f"{total} steps in all (train.epochs x steps per epoch); raise train.epochs to continue")


def load_resume_state(cfg: ExperimentConfig, run_dir: Path, *, is_main: bool = True,
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
        FileExistsError: A fresh run would write into a folder that holds run files (any of
            :data:`~svfseg.engine.runfiles.RUN_FILES`, e.g. a finished run whose ``last.pt`` was
            deleted) and ``overwrite`` is off.
    """
    last = run_dir / "last.pt"
    if cfg.resume:
        if not last.exists() and not ckpt.previous_path(last).exists():
            raise FileNotFoundError(f"resume: {last} does not exist (start the run without resume=true)")
        return _load_or_fall_back(last, is_main)
    if overwrite:
        return None
    present = run_files(run_dir)
    if present:
        names = ", ".join(p.name for p in present[:6]) + (", ..." if len(present) > 6 else "")
        resumable = last.exists() or ckpt.previous_path(last).exists()
        how = (f"continue it with `svfseg train --resume {run_dir}`, " if resumable else
               "its last.pt is gone, so it cannot be resumed; ")
        raise FileExistsError(f"{run_dir} already holds a run ({names}); {how}replace it with "
                              f"`svfseg train --overwrite ...` or start another with name=<new name>")
    return None


def _load_or_fall_back(last: Path, is_main: bool) -> dict:
    """``last.pt``, or ``last.prev.pt`` with a warning when ``last.pt`` is missing, damaged or foreign."""
    prev = ckpt.previous_path(last)
    try:
        return _training_checkpoint(last)
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        if not prev.exists():
            raise
        state = _training_checkpoint(prev)
        logger.warning("resume: %s; continuing from the previous checkpoint %s (step %s)", e, prev.name,
                       state.get("step"))
        if is_main and last.exists():
            # keep the damaged file for a look, out of the way of the next save's rotation
            os.replace(last, last.with_name(f"{last.stem}.damaged{last.suffix}"))
        return state


def _training_checkpoint(path: Path) -> dict:
    state = ckpt.load(path)
    missing = [k for k in ("model", "optimizer", "describe", "step", "rng_per_rank") if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{path}: expected a resumable svfseg training checkpoint, found one without "
                                   f"{missing}")
    return state


def train_run(cfg: ExperimentConfig, *, run_dir: Optional[Path] = None, argv: Optional[Sequence[str]] = None,
              info: Optional[DistInfo] = None, overwrite: bool = False) -> FitResult:
    """Train as ``cfg`` says (``cfg.resume``: continue the run folder's ``last.pt``).

    The model's recipe names the task that trains it (few-shot episodes, semantic
    segmentation, ...); this function is the same for all of them.

    Args:
        cfg: experiment config.
        run_dir: run folder (default ``cfg.run_dir()``).
        argv: the command line, recorded in ``meta.json``.
        info: process-group info (default: from the torchrun environment).
        overwrite: a fresh run replaces the run files already in the folder (deleted once every
            check has passed); refused with ``cfg.resume``.

    Returns:
        The :class:`~svfseg.engine.loop.FitResult`.
    """
    own_group = info is None
    info = info or init_distributed(cfg.device)
    try:
        run_dir = Path(run_dir or cfg.run_dir())
        task = get_task(model_recipe(cfg.model.name).task)
        # The lock comes first (a second process on this folder is refused), then every check:
        # config.yaml and meta.json are written only once the run is known to start.
        with RunLock(run_dir, "svfseg train") if info.is_main else contextlib.nullcontext():
            if info.is_main:
                ckpt.remove_stale_temporaries(run_dir)
            if overwrite and cfg.resume:
                raise ValueError(f"{run_dir}: --overwrite starts the run afresh, --resume continues it; give one")
            state = load_resume_state(cfg, run_dir, is_main=info.is_main, overwrite=overwrite)
            if state is not None:
                _warn_config_changes(state["config"], to_dict(cfg))
            preflight(cfg)
            train_set = task.train_data(cfg)
            check_resume_steps(state, cfg.train.epochs * steps_per_epoch(cfg, len(train_set)), run_dir)
            val = task.eval_set(cfg, run_dir, info)
            torch.manual_seed(cfg.seed)  # the head's initial weights depend only on the seed
            model = build_model(cfg, pretrained=state is None)
            desc = describe(model, cfg)
            if state is not None:
                ckpt.check_compatible(desc, state["describe"], run_dir / "last.pt")
                ckpt.load_model_state(model, state["model"], run_dir / "last.pt")
            if info.is_main:
                check_room_for_checkpoints(run_dir, model)
                if overwrite:
                    removed = clear_run(run_dir)
                    if removed:
                        logger.warning("--overwrite: removed the earlier run's %d file(s) from %s", len(removed),
                                       run_dir)
                write_run_metadata(run_dir, cfg, argv, resumed=state is not None)
                logger.info("torch threads: %d (threads=%s; see the README on choosing it)", torch.get_num_threads(),
                            cfg.threads)
            barrier(info)
            return fit(cfg, model, train_set, task=task, run_dir=run_dir, describe=desc, val=val,
                       info=info, resume_state=state)
    finally:
        if own_group:
            cleanup(info)


def check_room_for_checkpoints(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the run folder cannot be written or its disk cannot take ``last.pt`` + ``best.pt``.

    Otherwise the first epoch would train and only its checkpoint find out (and a fresh run
    would have nothing to resume).

    Raises:
        OSError: the folder is not writable, or too little space (ENOSPC), with the sizes.
    """
    import errno

    from svfseg.engine.outdir import check_output_folder, free_bytes

    check_output_folder(run_dir, "the run folder")
    weights = ckpt.tensor_bytes(model.state_dict())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # last.pt: weights + optimiser state (a momentum buffer per trained tensor); best.pt: weights
    needed = int((2 * weights + trained) * 1.1) + (32 << 20)
    free = free_bytes(run_dir)
    if free < needed:
        raise OSError(errno.ENOSPC, f"{run_dir}: expected about {needed / 1e6:.0f} MB free for last.pt and best.pt "
                                    f"before training, found {free / 1e6:.0f} MB; free some space (or set "
                                    f"output_dir=...) and start again")


def resume_config(run_dir: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config of an existing run folder with ``resume=true`` and any further overrides."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (is it a run folder?)")
    return load_config(path, [*overrides, "resume=true"])


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    quiet = {"resume", "train.stop_after_steps", "train.progress", "threads"}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = prefix + k
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("optim.lr_mult", "model.head"):
            _warn_config_changes(a, b, key + ".")
        elif a != b and key not in quiet:
            logger.warning("resume: config key '%s' changed from %r to %r", key, a, b)
