"""What a task tells the engine: how to step, validate, and score; the shared result records."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.data.collate import collate_episodes
from svfseg.engine.distributed import DistInfo
from svfseg.engine.resolved import ResolvedRun
from svfseg.engine.runfolder import RunFolder, results_file, results_markdown, write_json_atomic, write_text_atomic
from svfseg.engine.state import Resume

logger = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Items checkpoints are selected on: the dataset, the classes scored (None: the dataset's), a label.

    ``save_to``: the file its newly made episodes belong in (a resume reads them back). The task only
    makes and checks them; the run writes the file once every check has passed and the earlier
    run's files are gone (``--overwrite``), by :meth:`write` (``engine.run``'s first writes).
    """

    dataset: Dataset
    class_ids: Optional[Sequence[int]] = None
    on: str = "test_fold"
    save_to: Optional[Path] = None

    def write(self) -> None:
        """Save the new episodes to ``save_to`` (atomic); nothing when they were read from a file."""
        if self.save_to is not None:
            self.dataset.episodes.save(self.save_to)


@dataclass
class ValResult:
    """One validation pass, as a task reports it to the training loop."""

    row: dict                          # val.csv row without step/epoch/best (``miou`` is the selection score)
    best: dict                         # best.pt ``metrics`` / FitResult.best without step/epoch
    message: tuple                     # logger format (step first, "%s" last for the best-so-far mark) + args
    history_extra: dict = field(default_factory=dict)   # extra keys kept in the history row


@dataclass
class TestOptions:
    """What ``svfseg test`` asks of a task beyond the config (each task reads the fields it knows)."""

    protocol: Optional[str] = None     # episode protocol (few-shot)
    episodes: Optional[Path] = None    # fixed episode file (few-shot)
    save_vis: int = 0                  # overlay PNGs to write
    out_dir: Optional[Path] = None     # results folder (default: next to the checkpoint)
    tau: float = 0.9                   # novel-class threshold (generalized setting)
    per_episode: bool = False          # keep each episode's counts in results.json (few-shot; for paired bootstraps)


class Task:
    """Base of the engine's tasks (few-shot episodes, semantic segmentation, the generalized setting).

    A task owns what differs between them: its data, one training step's loss, a validation
    pass, and ``svfseg test``'s scoring and report. The training loop
    (:func:`svfseg.engine.loop.fit`) and the evaluation loop
    (:func:`svfseg.engine.evaluator.evaluation_loop`) are shared.
    """

    name: str = ""
    #: Progress-bar label of training.
    train_desc: str = "train"
    #: Batch collation of its items.
    collate_fn = staticmethod(collate_episodes)
    #: DDP re-sends buffers every step; only needed where BatchNorm statistics train.
    broadcast_buffers: bool = False

    def train_data(self, run: ResolvedRun) -> Dataset:
        """Training items of the resolved run (``engine.resolved.resolve_run``)."""
        raise NotImplementedError(f"task {self.name!r} does not train")

    def eval_set(self, run: ResolvedRun, folder: RunFolder, info: DistInfo,
                 resume: Optional[Resume] = None) -> Optional[EvalSet]:
        """Items checkpoints are selected on (None: no validation).

        Writes nothing: items that must be kept for a resume go in :attr:`EvalSet.save_to` (a file of
        ``folder``). ``resume``: the run's ``engine.state.Resume`` (None: a fresh run), which says what
        a resumed run reads back."""
        return None

    def check_training(self, cfg: ExperimentConfig, model: nn.Module, info: DistInfo) -> None:
        """Refuse a run that cannot train (called before anything is written)."""

    def loss(self, model: nn.Module, batch: dict, cfg: ExperimentConfig, info: DistInfo,
             dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one batch: (loss to back-propagate, detached float (3,) [loss, main, aux] of the global batch)."""
        raise NotImplementedError(f"task {self.name!r} does not train")

    def validate(self, model: nn.Module, val: EvalSet, cfg: ExperimentConfig, info: DistInfo) -> ValResult:
        """Score ``model`` on ``val`` for checkpoint selection."""
        raise NotImplementedError(f"task {self.name!r} does not validate")

    def test(self, checkpoint: str | Path, cfg: Optional[ExperimentConfig], options: TestOptions,
             info: DistInfo) -> dict:
        """``svfseg test``, one skeleton for every task: load the checkpoint once, :meth:`score` it, write
        ``results.json`` + ``results.md`` (main process) in the results folder, return the results."""
        from svfseg.engine.distributed import barrier
        from svfseg.engine.model import checkpoint_config, load_for_inference_run
        from svfseg.engine.resolved import resolve_run

        run = resolve_run(cfg if cfg is not None else checkpoint_config(checkpoint))  # once: model and scoring
        model, run, state = load_for_inference_run(checkpoint, run, device=info.device)
        out_dir = (Path(options.out_dir) if options.out_dir
                   else RunFolder(Path(checkpoint).parent).test_dir(self.results_folder(run.cfg, options)))
        out = self.score(checkpoint, model, run, state, options, out_dir, info)
        out["out_dir"] = str(out_dir)
        write_results(out_dir, out, self.markdown(out), info)
        if info.is_main:
            logger.info("%s -> %s", self.headline(out), out_dir)
        barrier(info)
        return out

    def results_folder(self, cfg: ExperimentConfig, options: TestOptions) -> str:
        """The results folder's name next to the checkpoint (when ``options.out_dir`` is unset)."""
        return f"test_{self.name}"

    def score(self, checkpoint: str | Path, model: nn.Module, run: ResolvedRun, state: dict,
              options: TestOptions, out_dir: Path, info: DistInfo) -> dict:
        """The results of a loaded checkpoint for the resolved run (what ``results.json`` holds)."""
        raise NotImplementedError(f"task {self.name!r} does not test")

    def headline(self, results: dict) -> str:
        """One log line summarising :meth:`score`'s results."""
        return f"{self.name}: results"

    def markdown(self, results: dict) -> str:
        """The Markdown report of :meth:`test`'s results."""
        raise NotImplementedError


def write_results(out_dir: Path, results: dict, markdown: str, info: DistInfo) -> None:
    """``results.json`` + ``results.md`` in ``out_dir`` (main process only), each written atomically."""
    if not info.is_main:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    results, undefined = json_safe(results)
    if undefined:
        # NaN is not JSON; null says "no value" and the note says why there is none.
        results = {**results, "null_values": f"{len(undefined)} value(s) are null because they are not defined "
                                             f"(NaN: e.g. a class with no episode, or a mean over no values): "
                                             f"{undefined[:10]}"}
    write_json_atomic(results_file(out_dir), results, default=str, allow_nan=False)
    write_text_atomic(results_markdown(out_dir), markdown)


def json_safe(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every NaN/inf float (or 0-d tensor/array) replaced by None, and the keys replaced."""
    import math

    if isinstance(obj, dict):
        out, bad = {}, []
        for k, v in obj.items():
            out[k], b = json_safe(v, f"{where}.{k}" if where else str(k))
            bad += b
        return out, bad
    if isinstance(obj, (list, tuple)):
        out, bad = [], []
        for i, v in enumerate(obj):
            o, b = json_safe(v, f"{where}[{i}]")
            out.append(o)
            bad += b
        return out, bad
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [where]
    return obj, []
