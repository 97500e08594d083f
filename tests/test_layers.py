"""The import layers ARCHITECTURE.md states, enforced: which svfseg modules may import which, and no cycles.

Every module under src/svfseg is parsed with `ast` (nothing is imported or run). An import counts
wherever it stands: at the top of a module, deferred inside a function, under ``if TYPE_CHECKING``,
or as ``importlib.import_module("svfseg.x")`` with a literal name. ``from svfseg.models import x``
is an import of the module ``svfseg.models.x`` when that file exists, else of ``svfseg.models``
(its ``__init__.py``); relative imports are resolved against the importing module's package.

A rule is one line of RULES. ``only``: the svfseg modules the layer may import besides its own;
``never``: those it must not import. A name covers itself and everything below it
(``svfseg.data`` covers ``svfseg.data.splits``).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import svfseg

PACKAGE = "svfseg"
ROOT = Path(svfseg.__file__).resolve().parent

#: Entry points: the layer above engine/ (ARCHITECTURE.md's top row, and the web app).
ENTRY_POINTS = ("svfseg.cli", "svfseg.__main__", "svfseg.demo", "svfseg.compare", "svfseg.predict",
                "svfseg.report", "svfseg.serve", "svfseg.convert")


@dataclass(frozen=True)
class Rule:
    says: str  # what ARCHITECTURE.md states, as the failure message names it
    layer: tuple[str, ...]  # the importing modules (names and everything below them)
    only: tuple[str, ...] | None = None  # may import nothing of svfseg but these (and itself)
    never: tuple[str, ...] = ()  # must not import these


RULES = (
    Rule("svf/ imports nothing outside itself", ("svfseg.svf",), only=()),
    Rule("config/ imports regimes.py and policies.py only", ("svfseg.config",),
         only=("svfseg.regimes", "svfseg.policies")),
    Rule("regimes.py, policies.py and results.py import nothing of svfseg",
         ("svfseg.regimes", "svfseg.policies", "svfseg.results"), only=()),
    Rule("labels.py imports nothing of svfseg", ("svfseg.labels",), only=()),
    Rule("compare/statistics.py and report/paper.py import nothing of svfseg",
         ("svfseg.compare.statistics", "svfseg.report.paper"), only=()),
    Rule("models/ imports svf/, regimes.py and policies.py only", ("svfseg.models",),
         only=("svfseg.svf", "svfseg.regimes", "svfseg.policies")),
    Rule("models/ never imports engine/", ("svfseg.models",), never=("svfseg.engine",)),
    Rule("models/ imports neither config/ nor data/", ("svfseg.models",), never=("svfseg.config", "svfseg.data")),
    Rule("data/ imports labels.py only", ("svfseg.data",), only=("svfseg.labels",)),
    Rule("data/ never imports models/ or engine/", ("svfseg.data",), never=("svfseg.models", "svfseg.engine")),
    Rule("metrics.py imports no engine/", ("svfseg.metrics",), never=("svfseg.engine",)),
    Rule("engine/losses.py imports labels.py only", ("svfseg.engine.losses",), only=("svfseg.labels",)),
    Rule("compare/ imports no other entry point", ("svfseg.compare",),
         never=tuple(e for e in ENTRY_POINTS if e != "svfseg.compare")),
    Rule("report/ imports no other entry point", ("svfseg.report",),
         never=tuple(e for e in ENTRY_POINTS if e != "svfseg.report")),
    Rule("convert/ imports no other entry point", ("svfseg.convert",),
         never=tuple(e for e in ENTRY_POINTS if e != "svfseg.convert")),
    Rule("engine/ imports nothing above it (the entry points)", ("svfseg.engine",), never=ENTRY_POINTS),
    Rule("engine/runfolder.py imports engine/runlock.py only, which imports nothing of svfseg (anyone may ask them)",
         ("svfseg.engine.runfolder", "svfseg.engine.runlock"), only=("svfseg.engine.runlock",)),
    Rule("engine/resolved.py imports config/, data/ and models/ only (every engine module may take a ResolvedRun)",
         ("svfseg.engine.resolved",), only=("svfseg.config", "svfseg.data", "svfseg.models")),
)


def covers(names: tuple[str, ...], module: str) -> bool:
    """``module`` is one of ``names`` or lies below one of them (dotted, not textual, prefixes)."""
    return any(module == n or module.startswith(n + ".") for n in names)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package (line {node.lineno})")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str, path: Path, files: dict[str, Path]) -> dict[str, int]:
    """The svfseg modules ``module`` imports, each with the first line that does."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        while name and name not in files:  # `import svfseg.data.io as io` -> the module file
            name = name.rpartition(".")[0]
        if name and name != module and covers((PACKAGE,), name):
            found.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in files else base, node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            add(node.args[0].value, node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    files = module_files(root)
    return {m: imported_names(m, p, files) for m, p in files.items()}


def violations(graph: dict[str, dict[str, int]], rule: Rule) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        if not covers(rule.layer, module):
            continue
        for target, line in sorted(targets.items()):
            if covers(rule.layer, target):
                continue
            bad = covers(rule.never, target) or (rule.only is not None and not covers(rule.only, target))
            if bad:
                out.append(f"{module} (line {line}) imports {target}")
    return out


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan, iterative)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


GRAPH = import_graph()


def test_the_graph_sees_the_package():
    # A parser that silently found nothing would make every rule pass.
    assert len(GRAPH) > 50 and "svfseg.svf.layers" in GRAPH and "svfseg.engine.run" in GRAPH
    assert any(covers(("svfseg.svf",), t) for t in GRAPH["svfseg.models.policy"])
    for rule in RULES:
        assert any(covers(rule.layer, m) for m in GRAPH), f"rule {rule.says!r}: no module in {rule.layer}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.says)
def test_layer_rule(rule):
    bad = violations(GRAPH, rule)
    assert not bad, f"ARCHITECTURE.md: {rule.says}; found:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles (deferred imports count):\n  " + "\n  ".join(" -> ".join(c) for c in found)


# -- the checker itself, on a small package written here ---------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


def test_checker_resolves_relative_deferred_and_package_imports(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "svf/__init__.py": "from .layers import L\n",
        "svf/layers.py": "def f():\n    from ..models import heads  # deferred, relative, a submodule\n",
        "models/__init__.py": "",
        "models/heads.py": "import importlib\nimportlib.import_module('svfseg.svf')\n",
    })
    graph = import_graph(pkg)
    assert graph["svfseg.svf"] == {"svfseg.svf.layers": 1}
    assert graph["svfseg.svf.layers"] == {"svfseg.models.heads": 2}
    assert graph["svfseg.models.heads"] == {"svfseg.svf": 2}
    assert violations(graph, RULES[0]) == ["svfseg.svf.layers (line 2) imports svfseg.models.heads"]
    assert cycles(graph) == [["svfseg.models.heads", "svfseg.svf", "svfseg.svf.layers"]]
