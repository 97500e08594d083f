"""Result tables shared by `svfseg report` and `svfseg compare`: per-seed grouping, mean +- std (n), Markdown."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Optional, Sequence

__all__ = ["SeedStats", "seed_stats", "format_stats", "group_by_seed", "markdown_table", "DASH"]

logger = logging.getLogger(__name__)

DASH = "–"


@dataclass(frozen=True)
class SeedStats:
    """A score over training seeds: mean, population std (as ``metrics.summarize_runs``), count, values."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...]


def seed_stats(values: Iterable[Optional[float]]) -> Optional[SeedStats]:
    """Mean, population std and count of the given values, None and NaN left out; None when none remain."""
    vals = tuple(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return SeedStats(mean, std, len(vals), vals)


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
