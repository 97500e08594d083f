"""A run folder: the one module that names the files of a run, tells its status, clears it and locks it.

Every command that writes or reads a run's files asks a :class:`RunFolder` for their paths: training
(``engine.run``, ``engine.state``, ``engine.loop``, the logger, the footprint, the tasks), ``compare``
(a cell's status and record), ``report`` (the summary beside a result), ``serve`` (a checkpoint's
recorded results) and ``demo`` (the checkpoints it keeps). No other module joins a run file's name.

It imports the standard library and the run lock only (``tests/test_layers.py``, ``tests/test_torch_free.py``):
anything may ask it without an import cycle.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from svfseg.engine.runlock import LOCK_NAME, RunLock

#: The statuses of a run folder (:meth:`RunFolder.status`), from nothing to done.
FRESH, RESUMABLE, FINISHED, DIVERGED, SCORED = "fresh", "resumable", "finished", "diverged", "scored"

#: The file every results folder (``svfseg test``, a compare cell's ``test/``) holds, and its Markdown twin.
RESULTS_FILE, RESULTS_MARKDOWN = "results.json", "results.md"

#: Files a run writes into its folder (``last.*.pt``: the fallback and the damaged copy of resume).
_FILES = {"last": "last.pt", "previous": "last.prev.pt", "damaged": "last.damaged.pt", "best": "best.pt",
          "config": "config.yaml", "meta": "meta.json", "summary": "train_summary.json",
          "train_log": "train_log.csv", "val_log": "val_log.csv", "curves": "curves.png",
          "trainable": "trainable.json", "trained_backbone": "trained_backbone.safetensors",
          "initial_backbone": "initial_backbone.safetensors", "diverged_marker": "diverged.txt",
          "cell_record": "compare_cell.json", "forms": "svf_forms.json"}
#: Folders a run (or `svfseg test` next to its checkpoint) writes into its folder.
_FOLDERS = {"tensorboard": "tb", "test": "test", "vis": "vis"}
_VAL_EPISODES = "val_episodes_"
#: A compare cell's scores with test-time adaptation: ``test_adapt-<adapt.params>/`` (``compare --adapt``).
_ADAPT_TEST = "test_adapt-"


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, then rename it over ``path`` (never half a file).

    A failed write (a full disk, an interrupt) leaves the earlier ``path`` as it was and no temporary.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``text`` written to ``path`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj, **dumps) -> Path:
    """``obj`` as JSON (``json.dumps(obj, **dumps)``, indent 1 unless given), written atomically."""
    return write_text_atomic(path, json.dumps(obj, **{"indent": 1, **dumps}))


def results_file(folder: str | os.PathLike) -> Path:
    """The ``results.json`` of a results folder (``svfseg test --out``, a run's ``test_*``, a compare cell's ``test``)."""
    return Path(folder) / RESULTS_FILE


def results_markdown(folder: str | os.PathLike) -> Path:
    """The ``results.md`` beside :func:`results_file`."""
    return Path(folder) / RESULTS_MARKDOWN


@dataclass(frozen=True)
class RunFolder:
    """The folder of one training run: its paths, its status, clearing and locking it.

    Attributes:
        path: the folder (``cfg.run_dir()``); nothing is created by making this object.
    """

    path: Path

    def __init__(self, path: str | os.PathLike | "RunFolder"):
        object.__setattr__(self, "path", Path(path.path if isinstance(path, RunFolder) else path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # -- the files ---------------------------------------------------------------------------
    @property
    def last(self) -> Path:
        """``last.pt``: the resumable checkpoint (``engine.state.TrainingState.write_last``)."""
        return self.path / _FILES["last"]

    @property
    def previous(self) -> Path:
        """``last.prev.pt``: the ``last.pt`` the latest save replaced (``checkpoint.save_atomic(keep_previous)``)."""
        return self.path / _FILES["previous"]

    @property
    def damaged(self) -> Path:
        """``last.damaged.pt``: a damaged ``last.pt`` moved aside by a resume that fell back to ``last.prev.pt``."""
        return self.path / _FILES["damaged"]

    @property
    def best(self) -> Path:
        """``best.pt``: the weights selected on validation (or the last ones)."""
        return self.path / _FILES["best"]

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved config (``engine.run.write_run_metadata``; ``--resume`` reads it)."""
        return self.path / _FILES["config"]

    @property
    def meta(self) -> Path:
        """``meta.json``: version, commit, command and every start of the run."""
        return self.path / _FILES["meta"]

    @property
    def summary(self) -> Path:
        """``train_summary.json``: status, steps, seconds, best, history, footprint (``engine.loop``)."""
        return self.path / _FILES["summary"]

    @property
    def train_log(self) -> Path:
        return self.path / _FILES["train_log"]

    @property
    def val_log(self) -> Path:
        return self.path / _FILES["val_log"]

    @property
    def curves(self) -> Path:
        return self.path / _FILES["curves"]

    @property
    def tensorboard(self) -> Path:
        return self.path / _FOLDERS["tensorboard"]

    @property
    def trainable(self) -> Path:
        """``trainable.json``: trainable parameters per group (``engine.footprint.write_trainable``)."""
        return self.path / _FILES["trainable"]

    @property
    def trained_backbone(self) -> Path:
        """``trained_backbone.safetensors``: the trained backbone tensors, when few of them train."""
        return self.path / _FILES["trained_backbone"]

    @property
    def initial_backbone(self) -> Path:
        """``initial_backbone.safetensors``: the trained backbone tensors at step 0 (movement's reference)."""
        return self.path / _FILES["initial_backbone"]

    @property
    def forms(self) -> Path:
        """``svf_forms.json``: the SVF forms plan the run computes with (``engine.forms``; ``svf.plan`` takes it)."""
        return self.path / _FILES["forms"]

    @property
    def diverged_marker(self) -> Path:
        """``diverged.txt``: why a compare cell diverged (a rerun does not train it again)."""
        return self.path / _FILES["diverged_marker"]

    @property
    def cell_record(self) -> Path:
        """``compare_cell.json``: the settings a compare cell was made with."""
        return self.path / _FILES["cell_record"]

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    def val_episodes(self, on: str) -> Path:
        """The validation episodes a run selects its checkpoints on (``on``: ``test_fold`` / ``base_heldout``)."""
        return self.path / f"{_VAL_EPISODES}{on}.json"

    def test_dir(self, name: str = "test") -> Path:
        """A results folder beside the checkpoints (``test``: a compare cell's; ``test_<protocol>_<K>shot``: `test`'s)."""
        return self.path / name

    def adapt_test_dir(self, params: str) -> Path:
        """A compare cell's results scored with test-time adaptation of ``params`` (``compare --adapt``)."""
        return self.path / f"{_ADAPT_TEST}{params}"

    def results(self, name: str = "test") -> Path:
        """``results.json`` of :meth:`test_dir`."""
        return results_file(self.test_dir(name))

    def results_files(self) -> list[Path]:
        """Every ``results.json`` beside the checkpoints: ``test/`` first, then ``test_*/`` newest first."""
        found = [self.results()] + sorted(self.path.glob(f"test_*/{RESULTS_FILE}"), key=lambda p: p.stat().st_mtime,
                                          reverse=True)
        return [f for f in found if f.is_file()]

    # -- what the folder holds ---------------------------------------------------------------
    def read_summary(self) -> Optional[dict]:
        """``train_summary.json`` as a dict; None when it is missing or unreadable."""
        return _read_json(self.summary)

    def read_cell_record(self) -> Optional[dict]:
        """``compare_cell.json`` as a dict; None when it is missing or unreadable."""
        return _read_json(self.cell_record)

    def diverged_reason(self) -> Optional[str]:
        """Why the run diverged (``diverged.txt``), None when it did not."""
        try:
            return self.diverged_marker.read_text().strip()
        except FileNotFoundError:
            return None

    def mark_diverged(self, reason: str) -> None:
        """Record that the run diverged, and why (a compare does not train it again)."""
        write_text_atomic(self.diverged_marker, f"{reason}\n")

    def resumable(self) -> bool:
        """A ``last.pt`` (or the ``last.prev.pt`` a resume falls back to) is there."""
        return self.last.exists() or self.previous.exists()

    def status(self) -> str:
        """``diverged`` (a compare marked it), ``scored`` (finished, with ``test/results.json``), ``finished``
        (the summary says so), ``resumable`` (a ``last.pt``) or ``fresh`` (nothing to continue)."""
        if self.diverged_marker.exists():
            return DIVERGED
        summary = self.read_summary()
        if summary is not None and summary.get("status") == "finished":
            return SCORED if self.results().exists() else FINISHED
        return RESUMABLE if self.resumable() else FRESH

    def present(self) -> list[Path]:
        """The run files and folders present (empty when the folder is missing or holds none)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if _is_run_file(p))

    def owns(self, path: str | os.PathLike) -> bool:
        """``path`` is (or would be) one of this run's files, and the folder holds a run."""
        path = Path(path)
        return path.resolve().parent == self.path.resolve() and _is_run_file(path) and bool(self.present())

    # -- changing it -------------------------------------------------------------------------
    def clear(self) -> list[Path]:
        """Delete the run files and folders (``train --overwrite``, ``compare --force``); hold :meth:`lock` first."""
        removed = self.present()
        for p in removed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return removed

    def lock(self, what: str = "svfseg") -> RunLock:
        """The folder's exclusive lock (a context manager; refused at once when another process holds it).

        Take it before anything of the folder is read to decide or changed (:meth:`clear` included)."""
        return RunLock(self.path, what)


def _is_run_file(p: Path) -> bool:
    return (p.name in _FILES.values() or p.name in _FOLDERS.values() or p.name.startswith(_ADAPT_TEST)
            or (p.name.startswith(_VAL_EPISODES) and p.suffix == ".json"))


def _read_json(path: Path) -> Optional[dict]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None
