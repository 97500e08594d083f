"""Paired differences between training regimes with a t-interval over seeds (no svfseg imports)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference and its two-sided confidence interval.

    Attributes:
        mean: Mean of the paired differences.
        low: Lower end of the interval (None with fewer than two pairs).
        high: Upper end (None with fewer than two pairs).
        n: Number of pairs.
        level: Confidence level, e.g. 0.95.
    """

    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int
    level: float

    def verdict(self) -> str:
        """"better", "worse", "within" (the interval holds 0) or "unknown" (no interval)."""
        if self.low is None or self.high is None:
            return "unknown"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within"


def paired_t_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedInterval:
    """Interval for the mean of ``a[i] - b[i]`` (pairs = training seeds): ``mean +- t_{n-1} * sd / sqrt(n)``.

    Args:
        a: Scores of one regime, one per seed.
        b: Scores of the reference regime for the same seeds (same episodes).
        level: Two-sided confidence level.

    Returns:
        A :class:`PairedInterval` (no interval with one pair: a single seed says nothing about
        the seed-to-seed spread).

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    from scipy.stats import t as student_t

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_t_interval: expected two equally long non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return PairedInterval(mean, None, None, n, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n, level)
