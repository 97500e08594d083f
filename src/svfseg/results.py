"""Results, rendered one way: seed statistics (one std definition), percentages, Markdown tables.

Used by `svfseg test` (the tasks' results.md), `svfseg report`, `svfseg compare` and the demo.
The std over seeds is the **sample** standard deviation (n - 1 in the denominator, 0 for one
value) everywhere, and every header that shows one says so (`STD_NOTE`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Optional, Sequence

__all__ = ["DASH", "STD_NOTE", "SeedStats", "format_stats", "group_by_seed", "markdown_table", "mean_std", "pct",
           "seed_stats", "size_text", "summarize_runs"]

logger = logging.getLogger(__name__)

DASH = "–"
#: How a "± std" is computed, for table headers and notes.
STD_NOTE = "sample std, n-1"


@dataclass(frozen=True)
class SeedStats:
    """A score over seeds: mean, sample std (n - 1; 0 for one value), count, values."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...]


def seed_stats(values: Iterable[Optional[float]]) -> Optional[SeedStats]:
    """Mean, sample std (n - 1) and count of the given values, None and NaN left out; None when none remain."""
    vals = tuple(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return SeedStats(mean, std, n, vals)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample std) of ``values`` (`seed_stats`); NaN, NaN when there are none."""
    s = seed_stats(values)
    return (math.nan, math.nan) if s is None else (s.mean, s.std)


def summarize_runs(values: Iterable[float]) -> dict:
    """Mean, sample std, best and all values of a score over several seeds (results.json's ``summary``)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize_runs: no values")
    s = seed_stats(vals)
    return {"mean": s.mean if s else math.nan, "std": s.std if s else math.nan, "best": max(vals), "values": vals}


def pct(v: object, signed: bool = False, missing: str = DASH, *, digits: int = 2, unit: str = "") -> str:
    """A fraction as a percentage: ``pct(0.6123)`` is ``"61.23"``; ``missing`` for None/NaN/inf.

    Args:
        signed: with its sign (a difference).
        digits: decimals; tables of results keep 2, the web page's one-glance figures 1.
        unit: appended to a number (``"%"`` where no header says the column is in percent).
    """
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return missing
    return f"{100 * v:{'+' if signed else ''}.{digits}f}{unit}"


def format_stats(s: Optional[SeedStats], digits: int = 2, *, with_n: bool = False) -> str:
    """``"61.50"`` for one value, ``"61.50 ± 0.50"`` for several (``" (n=2)"`` with ``with_n``), ``"–"`` for none."""
    if s is None:
        return DASH
    text = f"{s.mean:.{digits}f}"
    if s.n > 1:
        text += f" ± {s.std:.{digits}f}"
    if with_n:
        text += f" (n={s.n})"
    return text


def size_text(n: Optional[int]) -> str:
    """A file size in kB below 1 MB, else MB; ``DASH`` for none."""
    if not n:
        return DASH
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def group_by_seed(entries: Iterable[dict], key: Callable[[dict], Hashable], seed: Callable[[dict], Hashable],
                  what: str = "result") -> dict[Hashable, dict[Hashable, dict]]:
    """``{key: {seed: entry}}``; a second entry for the same key and seed replaces the first, with a warning.

    Args:
        entries: result entries (dicts; ``"file"`` names them in the warning when present).
        key: the setting an entry belongs to (e.g. model, regime, shot, fold).
        seed: its training seed (or another identity of the training run).
        what: what an entry is, for the warning.
    """
    out: dict[Hashable, dict[Hashable, dict]] = {}
    for e in entries:
        slot = out.setdefault(key(e), {})
        s = seed(e)
        if s in slot:
            logger.warning("two %ss for %s, training seed %s: using %s", what, key(e), s, e.get("file", "the last"))
        slot[s] = e
    return out


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"markdown_table: expected {len(header)} cells per row, found {len(r)}: {list(r)}")
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)
