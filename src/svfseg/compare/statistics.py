"""Paired differences with their intervals: a t-interval over training seeds, a bootstrap over test episodes (no svfseg imports)."""
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


def episode_miou(records: Sequence[Sequence[int]], weights=None):
    """mIoU of per-episode counts, per row of ``weights`` (how often each episode is drawn; None: once each).

    Args:
        records: One row per episode: ``[index, class, inter_fg, union_fg, inter_bg, union_bg]``.
        weights: (B, E) draw counts (a bootstrap's resamples), or None.

    Returns:
        (B,) mIoU over the classes drawn at least once (a class's IoU is its summed intersection over its
        summed union; an empty union scores 0), as `svfseg test` computes it.
    """
    import numpy as np

    rec = np.asarray(records, dtype=np.int64)
    classes, cls = np.unique(rec[:, 1], return_inverse=True)
    onehot = np.zeros((len(rec), len(classes)))
    onehot[np.arange(len(rec)), cls] = 1.0
    w = np.ones((1, len(rec))) if weights is None else np.asarray(weights, dtype=float)
    inter = w @ (onehot * rec[:, 2:3])
    union = w @ (onehot * rec[:, 3:4])
    drawn = (w @ onehot) > 0
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return (iou * drawn).sum(1) / np.maximum(drawn.sum(1), 1)


def paired_bootstrap_miou(groups: Sequence[tuple[Sequence, Sequence]], *, resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> PairedInterval:
    """Interval for mIoU(a) - mIoU(b) on the same test episodes, by a paired bootstrap over episodes.

    mIoU is a ratio of per-class sums over all episodes, so whole episodes are resampled (with
    replacement) and the sums recomputed; a and b are resampled together (the same draws), so the
    interval covers which test episodes were drawn, with the trained models held fixed (not the
    training seed's noise: that is the t-interval over seeds).

    Args:
        groups: One ``(a, b)`` per episode set (e.g. a (fold, shot) test file); ``a[m]`` / ``b[m]`` are
            trained model m's per-episode records (``[index, class, inter_fg, union_fg, inter_bg, union_bg]``)
            with and without the change. The statistic is the mean over groups of the mean over models of
            the differences; each group is resampled on its own, every model of it on the same draws.
        resamples: Bootstrap draws.
        seed: Seed of the draws.
        level: Two-sided level (percentile interval).

    Raises:
        ValueError: a group's sides (or models) do not hold the same episodes, or nothing is given.
    """
    import numpy as np

    if not groups:
        raise ValueError("paired_bootstrap_miou: no episode set given")
    observed, draws_total, n_total = [], [], 0
    for g, (a, b) in enumerate(groups):
        if len(a) != len(b) or not a:
            raise ValueError(f"paired_bootstrap_miou: expected the same non-empty list of models on both sides, "
                             f"got {len(a)} and {len(b)}")
        a = [sorted(map(list, m)) for m in a]
        b = [sorted(map(list, m)) for m in b]
        keys = [r[:2] for r in a[0]]
        if any([r[:2] for r in m] != keys for m in (*a, *b)):
            raise ValueError("paired_bootstrap_miou: the two sides (or the models) were not scored on the same "
                             "episodes")
        n = len(keys)
        draws = np.random.default_rng([seed, g]).integers(0, n, size=(resamples, n))
        weights = np.zeros((resamples, n))
        np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
        draws_total.append(np.mean([episode_miou(x, weights) - episode_miou(y, weights) for x, y in zip(a, b)], 0))
        observed.append(float(np.mean([episode_miou(x)[0] - episode_miou(y)[0] for x, y in zip(a, b)])))
        n_total += n
    diffs = np.mean(draws_total, axis=0)
    low, high = np.quantile(diffs, [0.5 - level / 2, 0.5 + level / 2])
    return PairedInterval(float(np.mean(observed)), float(low), float(high), n_total, level)
