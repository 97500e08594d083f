"""What a run folder holds: the names of the files a run writes, and which of them are present.

One list serves every command that must not write onto a run by accident (`train` into a used
folder, `merge --out`) and the one that clears a run on purpose (`train --overwrite`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Files a run writes into its folder (``last.*.pt``: the fallback and the damaged copy of resume).
RUN_FILES = ("last.pt", "last.prev.pt", "last.damaged.pt", "best.pt", "config.yaml", "meta.json",
             "train_summary.json", "train_log.csv", "val_log.csv", "trainable.json", "curves.png",
             "trained_backbone.safetensors", "initial_backbone.safetensors", "diverged.txt",
             "compare_cell.json")
#: Folders a run (or `svfseg test` next to its checkpoint) writes into its folder.
RUN_FOLDERS = ("test", "tb", "vis")
#: A compare cell's scores with test-time adaptation: ``test_adapt-<adapt.params>/`` (``compare --adapt``).
ADAPT_TEST_PREFIX = "test_adapt-"


def _is_run_file(p: Path) -> bool:
    return (p.name in RUN_FILES or p.name in RUN_FOLDERS or p.name.startswith(ADAPT_TEST_PREFIX)
            or (p.name.startswith("val_episodes_") and p.suffix == ".json"))


def run_files(folder: str | os.PathLike) -> list[Path]:
    """The run files and folders present in ``folder`` (empty when it is missing or holds none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _is_run_file(p))


def is_run_file(path: str | os.PathLike) -> bool:
    """``path`` is (or would be) one of the files of the run in its folder."""
    path = Path(path)
    return _is_run_file(path) and bool(run_files(path.parent))


def clear_run(folder: str | os.PathLike) -> list[Path]:
    """Delete the run files and folders of ``folder`` (``train --overwrite``; call it holding the run lock)."""
    removed = run_files(folder)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
