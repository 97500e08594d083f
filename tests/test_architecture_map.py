"""ARCHITECTURE.md names the tree as it is: every source file it names exists, and every source file is named.

How a name is read (the rule the map is written to):

- A name is a backticked path without spaces that ends in ``.py`` (a file) or ``/`` (a folder).
- A name with a ``/`` that starts with ``tests/`` or ``benchmarks/`` is relative to the repository;
  any other name with a ``/`` is relative to ``src/svfseg`` (``engine/loop.py``, ``models/heads/``).
- A bare file name (``plan.py``) belongs to the last folder named before it on the same line
  (``compare/``: ... ``plan.py``); with no folder before it on its line, to the top level
  (``regimes.py`` is ``src/svfseg/regimes.py``).
- Every ``.py`` file under ``src/svfseg`` is named, except the ``__init__.py`` of a package whose folder
  is named (the folder stands for its re-exports) and the top-level ``__init__.py`` (the package).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "svfseg"
MAP = REPO / "ARCHITECTURE.md"
_NAME = re.compile(r"`([^`\s]+(?:\.py|/))`")
_REPO_RELATIVE = ("tests/", "benchmarks/")


def named_paths(text: str) -> tuple[set[Path], set[Path]]:
    """The (files, folders) the map names, resolved by the module docstring's rule."""
    files, folders = set(), set()
    for line in text.splitlines():
        folder = None
        for name in _NAME.findall(line):
            base = REPO if name.startswith(_REPO_RELATIVE) else SRC
            if name.endswith("/"):
                folder = base / name.rstrip("/")
                folders.add(folder)
            elif "/" in name:
                files.add(base / name)
            else:
                files.add((folder or SRC) / name)
    return files, folders


def test_the_reading_rule_on_a_written_example():
    text = ("| a | `regimes.py`, `engine/loop.py` |\n"
            "| b | `compare/`: what runs `plan.py`; `cells.py` |\n"
            "| c | `models/heads/` (`bam.py`) and `tests/test_layers.py`; `python -m x y.py` |\n")
    files, folders = named_paths(text)
    assert files == {SRC / "regimes.py", SRC / "engine" / "loop.py", SRC / "compare" / "plan.py",
                     SRC / "compare" / "cells.py", SRC / "models" / "heads" / "bam.py", REPO / "tests" / "test_layers.py"}
    assert folders == {SRC / "compare", SRC / "models" / "heads"}


def test_every_named_file_and_folder_exists():
    files, folders = named_paths(MAP.read_text())
    missing = sorted(str(p.relative_to(REPO)) for p in files | folders if not p.exists())
    assert missing == [], "ARCHITECTURE.md names what is not in the tree"


def test_every_source_file_is_named():
    files, folders = named_paths(MAP.read_text())
    unnamed = []
    for path in sorted(SRC.rglob("*.py")):
        if path in files or path == SRC / "__init__.py":
            continue
        if path.name == "__init__.py" and path.parent in folders:
            continue
        unnamed.append(str(path.relative_to(SRC)))
    assert unnamed == [], "source files ARCHITECTURE.md does not name"


@pytest.mark.parametrize("heading", ["## How `--resume` works", "## What a run folder holds and who writes each file"])
def test_the_map_has_its_sections(heading):
    assert heading in MAP.read_text()
