"""The regime declarations and settings are torch-free (ast: deferred imports count too).

The svfseg-to-svfseg import rules (models/ imports neither config/ nor data/, ...) are rows of
tests/test_layers.py; this file checks what that test does not: no torch below the config.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "svfseg"

# (modules: a file or folder under src/svfseg, imports they must not make, why)
RULES = [
    ("regimes.py", ("torch",), "the regime specs are torch-free data at the bottom"),
    ("policies.py", ("torch",), "the svf:/lora: settings are torch-free data at the bottom"),
    ("config", ("torch",), "the config is torch-free"),
    ("engine/runfolder.py", ("torch", "numpy"), "a run folder's names and status are stdlib work"),
    ("engine/runlock.py", ("torch", "numpy"), "the run lock is stdlib only (a lock holder starts in milliseconds)"),
]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("where,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_import_rule(where, forbidden, why):
    target = SRC / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    bad = [f"{f.relative_to(SRC)}:{line} imports {name}" for f in files for line, name in _imports(f)
           if any(name == p or name.startswith(p + ".") for p in forbidden)]
    assert bad == [], why


def test_the_rule_sees_a_deferred_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from svfseg.config import ExperimentConfig\n")
    assert _imports(f) == [(2, "svfseg.config")]
