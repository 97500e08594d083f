"""One training run from a config: run folder, the model's task and data, the model, the loop, resume."""
from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import svfseg
from svfseg.config import ExperimentConfig, dump_yaml, git_commit, load_config, to_dict
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.distributed import DistInfo, barrier, cleanup, init_distributed
from svfseg.engine.loop import FitResult, fit
from svfseg.engine.model import build_model, describe, preflight
from svfseg.engine.tasks import get_task
from svfseg.models import model_recipe

logger = logging.getLogger(__name__)


def write_run_metadata(run_dir: Path, cfg: ExperimentConfig, argv: Optional[Sequence[str]] = None) -> None:
    """``config.yaml`` (the resolved config) and ``meta.json`` (version, commit, command, torch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    meta = {"svfseg_version": svfseg.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "command": list(argv) if argv is not None else sys.argv, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def load_resume_state(cfg: ExperimentConfig, run_dir: Path) -> Optional[dict]:
    """The run folder's ``last.pt`` when ``cfg.resume`` is set; None for a fresh run.

    Args:
        cfg: Experiment config (``resume`` read).
        run_dir: The run folder.

    Returns:
        The loaded checkpoint, or None.

    Raises:
        FileNotFoundError: ``cfg.resume`` is set but there is no ``last.pt``.
        FileExistsError: A fresh run would overwrite a run folder that holds a ``last.pt``.
    """
    last = run_dir / "last.pt"
    if cfg.resume:
        if not last.exists():
            raise FileNotFoundError(f"resume: {last} does not exist (start the run without resume=true)")
        return ckpt.load(last)
    if last.exists():
        raise FileExistsError(f"{run_dir} already holds a training run ({last}); continue it with "
                              f"`svfseg train --resume {run_dir}` or start another with name=<new name>")
    return None


def train_run(cfg: ExperimentConfig, *, run_dir: Optional[Path] = None, argv: Optional[Sequence[str]] = None,
              info: Optional[DistInfo] = None) -> FitResult:
    """Train as ``cfg`` says (``cfg.resume``: continue the run folder's ``last.pt``).

    The model's recipe names the task that trains it (few-shot episodes, semantic
    segmentation, ...); this function is the same for all of them.

    Args:
        cfg: experiment config.
        run_dir: run folder (default ``cfg.run_dir()``).
        argv: the command line, recorded in ``meta.json``.
        info: process-group info (default: from the torchrun environment).

    Returns:
        The :class:`~svfseg.engine.loop.FitResult`.
    """
    own_group = info is None
    info = info or init_distributed(cfg.device)
    try:
        run_dir = Path(run_dir or cfg.run_dir())
        task = get_task(model_recipe(cfg.model.name).task)
        state = load_resume_state(cfg, run_dir)
        if state is not None:
            _warn_config_changes(state["config"], to_dict(cfg))
        preflight(cfg)
        # The data checks run before anything is written: a failed check leaves no run folder.
        train_set = task.train_data(cfg)
        val = task.selection_set(cfg, run_dir, info)
        if info.is_main:
            write_run_metadata(run_dir, cfg, argv)
        barrier(info)
        torch.manual_seed(cfg.seed)  # the head's initial weights depend only on the seed
        model = build_model(cfg, pretrained=state is None)
        return fit(cfg, model, train_set, task=task, run_dir=run_dir, describe=describe(model, cfg), val=val,
                   info=info, resume_state=state)
    finally:
        if own_group:
            cleanup(info)


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
