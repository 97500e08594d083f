"""One training run from a config: run folder, every check before the first write, task, data, model, loop.

What a resume reads, checks and restores is ``engine.state``'s; this module only passes it along.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import svfseg
from svfseg.config import ExperimentConfig, dump_yaml, git_commit, to_dict
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.data import resolve_benchmark
from svfseg.engine.distributed import DistInfo, barrier, cleanup, init_distributed
from svfseg.engine.loop import FitResult, fit
from svfseg.engine.model import build_model, check_model_names, describe, preflight
from svfseg.engine.runfiles import clear_run, write_text_atomic
from svfseg.engine.runlock import RunLock
from svfseg.engine.state import TrainingState, load_resume_state
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
    write_text_atomic(meta_path, json.dumps(meta, indent=1))


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
        check_model_names(cfg)  # what only the model registry knows, before any data is read
        task = get_task(model_recipe(cfg.model.name).task)
        # The lock comes first (a second process on this folder is refused), then every check:
        # config.yaml and meta.json are written only once the run is known to start.
        with RunLock(run_dir, "svfseg train") if info.is_main else contextlib.nullcontext():
            if info.is_main:
                ckpt.remove_stale_temporaries(run_dir)
            if overwrite and cfg.resume:
                raise ValueError(f"{run_dir}: --overwrite starts the run afresh, --resume continues it; give one")
            saved = load_resume_state(cfg, run_dir, is_main=info.is_main, overwrite=overwrite)
            if saved is not None:
                _warn_config_changes(saved["config"], to_dict(cfg))
            bench = resolve_benchmark(cfg)  # the class split, read once for the data, the model and its checks
            preflight(cfg, bench)
            train_set = task.train_data(cfg, bench)
            val = task.eval_set(cfg, run_dir, info, bench)  # made and checked; its file is written below
            torch.manual_seed(cfg.seed)  # the head's initial weights depend only on the seed
            model = build_model(cfg, pretrained=saved is None, bench=bench)
            task.check_training(cfg, model, info)
            # the one restore of a resumed run (step count checked; weights, optimiser, RNG, counters), before any write
            state = TrainingState(cfg, model, run_dir=run_dir, describe=describe(model, cfg, bench), info=info,
                                  train_items=len(train_set), resume_from=saved)
            del saved
            if info.is_main:
                check_room_for_checkpoints(run_dir, model)
                if overwrite:
                    removed = clear_run(run_dir)
                    if removed:
                        logger.warning("--overwrite: removed the earlier run's %d file(s) from %s", len(removed),
                                       run_dir)
                if val is not None:
                    val.write()  # new validation episodes, kept for a resume (after the clear: never the old run's)
                write_run_metadata(run_dir, cfg, argv, resumed=state.resumed)
                logger.info("torch threads: %d (threads=%s; see the README on choosing it)", torch.get_num_threads(),
                            cfg.threads)
            barrier(info)
            return fit(cfg, state, train_set, task=task, val=val)
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


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    quiet = {"resume", "train.stop_after_steps", "train.progress", "threads"}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = prefix + k
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("optim.lr_mult", "model.head"):
            _warn_config_changes(a, b, key + ".")
        elif a != b and key not in quiet:
            logger.warning("resume: config key '%s' changed from %r to %r", key, a, b)
