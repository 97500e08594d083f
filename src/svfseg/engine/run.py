"""One training run from a config: run folder, every check before the first write, task, data, model, loop.

What a resume reads, checks, warns about and restores is ``engine.state``'s (``resume_point``, called
once here); this module only passes it along.
"""
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
from svfseg.config import ExperimentConfig, dump_yaml, git_commit
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.distributed import DistInfo, cleanup, init_distributed
from svfseg.engine.loop import FitResult, fit
from svfseg.engine.model import build_model, check_model_names, describe, preflight
from svfseg.engine.resolved import resolve_run
from svfseg.engine.runfolder import RunFolder, write_text_atomic
from svfseg.engine.runlock import RunLock
from svfseg.engine.runtime import threads_for
from svfseg.engine.state import TrainingState, resume_point
from svfseg.engine.tasks import get_task
from svfseg.engine.tasks.base import EvalSet
from svfseg.models import model_recipe

logger = logging.getLogger(__name__)


def write_run_metadata(run_dir: str | os.PathLike | RunFolder, cfg: ExperimentConfig,
                       argv: Optional[Sequence[str]] = None, *, resumed: bool = False) -> None:
    """``config.yaml`` (the resolved config) and ``meta.json`` (version, commit, command, torch), each atomic.

    ``meta.json`` keeps the first command under ``command`` and appends every start (fresh or
    resumed) to ``history``; nothing earlier is overwritten.
    """
    folder = RunFolder(run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder.config, dump_yaml(cfg))
    command = list(argv) if argv is not None else sys.argv
    meta = {"svfseg_version": svfseg.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "command": command, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    old = _read_meta(folder.meta) if resumed else {}
    start = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "resume": resumed, "command": command, "host": meta["host"], "svfseg_version": meta["svfseg_version"],
             "git_commit": meta["git_commit"]}
    if old:
        meta = {**meta, **{k: v for k, v in old.items() if k != "history"}}
    meta["history"] = [*old.get("history", []), start]
    write_text_atomic(folder.meta, json.dumps(meta, indent=1))


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


def train_run(cfg: ExperimentConfig, *, run_dir: Optional[str | os.PathLike] = None,
              argv: Optional[Sequence[str]] = None, info: Optional[DistInfo] = None, overwrite: bool = False,
              lock: Optional[RunLock] = None) -> FitResult:
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
        lock: the run folder's lock, already held by the caller (``compare`` takes it before it
            looks at a cell); None: taken here.

    Returns:
        The :class:`~svfseg.engine.loop.FitResult`.
    """
    own_group = info is None
    info = info or init_distributed(cfg.device)
    try:
        folder = RunFolder(run_dir or cfg.run_dir())
        check_model_names(cfg)  # what only the model registry knows, before any data is read
        task = get_task(model_recipe(cfg.model.name).task)
        if lock is not None and not (lock.held and lock.run_dir == folder.path):
            raise ValueError(f"train_run: the lock given is not held on {folder.path}")
        # The lock comes first (a second process on this folder is refused), then every check:
        # config.yaml and meta.json are written only once the run is known to start.
        own_lock = info.is_main and lock is None
        # the threads key holds for the whole run, however it was started (a compare cell, the demo, a script)
        with threads_for(cfg.threads), folder.lock("svfseg train") if own_lock else contextlib.nullcontext():
            if info.is_main:
                ckpt.remove_stale_temporaries(folder.path)
            resume = resume_point(cfg, folder, is_main=info.is_main, overwrite=overwrite)  # all --resume decides
            run = resolve_run(cfg)  # the class split, read once for the data, the model and its checks
            preflight(run)
            train_set = task.train_data(run)
            val = task.eval_set(run, folder, info, resume)  # made and checked; its file is written below
            torch.manual_seed(cfg.seed)  # the head's initial weights depend only on the seed
            model = build_model(run, pretrained=resume is None)
            # the one restore of a resumed run (step count checked; weights, optimiser, RNG, counters), before any write
            state = TrainingState(cfg, model, run_dir=folder, describe=describe(model, run), info=info,
                                  train_items=len(train_set), resume_from=resume)
            del resume
            if info.is_main:
                check_room_for_checkpoints(folder.path, model)

            def start() -> None:  # fit calls it once the task's own checks have passed
                _start_files(folder, cfg, argv, val, overwrite=overwrite, resumed=state.resumed)

            return fit(cfg, state, train_set, task=task, val=val, start=start)
    finally:
        if own_group:
            cleanup(info)


def _start_files(folder: RunFolder, cfg: ExperimentConfig, argv: Optional[Sequence[str]], val: Optional[EvalSet], *,
                 overwrite: bool, resumed: bool) -> None:
    """A run's first writes, every check passed (main process): an overwritten run's files gone, the new
    validation episodes, ``config.yaml`` and ``meta.json``."""
    if overwrite:
        removed = folder.clear()
        if removed:
            logger.warning("--overwrite: removed the earlier run's %d file(s) from %s", len(removed), folder.path)
    if val is not None:
        val.write()  # new validation episodes, kept for a resume (after the clear: never the old run's)
    write_run_metadata(folder, cfg, argv, resumed=resumed)
    logger.info("torch threads: %d (threads=%s; see the README on choosing it)", torch.get_num_threads(), cfg.threads)


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
