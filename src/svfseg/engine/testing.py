"""`svfseg test`: score a checkpoint with the task its model's recipe allows, write JSON + Markdown."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from svfseg.config import ExperimentConfig
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.distributed import DistInfo
from svfseg.engine.runtime import threads_for
from svfseg.engine.tasks import Task, TestOptions, get_task
from svfseg.models import model_recipe


def checkpoint_model_name(path: str | Path) -> str:
    """The model name in a checkpoint's config (a cheap, memory-mapped look)."""
    state = ckpt.peek(path)
    return str(((state.get("config") or {}).get("model") or {}).get("name", ""))


def select_test_task(checkpoint: str | Path, setting: Optional[str] = None) -> Task:
    """The task that scores ``checkpoint``: ``setting`` (e.g. "generalized") or its recipe's default.

    Raises:
        ValueError: the model's recipe does not offer that setting (the message lists those it does).
    """
    name = checkpoint_model_name(checkpoint)
    allowed = model_recipe(name).test_tasks
    setting = setting or allowed[0]
    if setting not in allowed:
        raise ValueError(f"{checkpoint}: a {name!r} model is scored with {list(allowed)}, not {setting!r}")
    return get_task(setting)


def score_with_task(checkpoint: str | Path, cfg: Optional[ExperimentConfig] = None, *,
                    setting: Optional[str] = None, options: Optional[TestOptions] = None,
                    info: Optional[DistInfo] = None) -> tuple[dict, str]:
    """Score ``checkpoint`` and return (results, their Markdown report); files go to the results folder.

    Args:
        checkpoint: a training checkpoint or merged export.
        cfg: config overriding the checkpoint's own (data root, shot, eval settings).
        setting: the task to score with (default: the recipe's first test task).
        options: protocol, episode file, overlays, output folder, threshold.
        info: process-group info.
    """
    from svfseg.engine.outdir import check_output_folder

    task = select_test_task(checkpoint, setting)
    options = options or TestOptions()
    # the results are written after every episode is scored: the folder must take them
    check_output_folder(options.out_dir or Path(checkpoint).parent, "test --out" if options.out_dir else
                        "the checkpoint's folder (test writes its results there; or give --out)")
    with threads_for(cfg.threads if cfg is not None else None):  # a compare cell scores as it trained
        out = task.test(checkpoint, cfg, options, info or DistInfo())
    return out, task.markdown(out)
