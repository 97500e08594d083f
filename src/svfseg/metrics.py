"""Few-shot segmentation metrics: per-class IoU sums, mIoU over novel classes, FB-IoU."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = 255


def episode_counts(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Intersection and union of one binary prediction against its label.

    Args:
        pred: (H, W) integer tensor in {0, 1} (1 = the episode's class).
        target: (H, W) integer tensor in {0, 1, ignore_index}, same size as ``pred``.
        ignore_index: label value excluded from both intersection and union.

    Returns:
        int64 tensor ``[inter_fg, union_fg, inter_bg, union_bg]`` on the CPU.
    """
    if pred.shape != target.shape:
        raise ValueError(f"episode_counts: prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    valid = target != ignore_index
    p = pred.bool() & valid
    t = (target == 1) & valid
    pb = (~pred.bool()) & valid
    tb = (target == 0) & valid
    out = torch.stack([(p & t).sum(), (p | t).sum(), (pb & tb).sum(), (pb | tb).sum()])
    return out.to(device="cpu", dtype=torch.int64)


@dataclass
class IoUAccumulator:
    """Sums of intersection and union per class (and for foreground/background) over episodes.

    The sums are exact integers, so accumulators from different processes or shards merge to
    exactly what one process would have counted (see :meth:`merge` and :meth:`as_tensor`).

    Args:
        class_ids: the classes scored by mIoU (the fold's novel classes, 1-based).
    """

    class_ids: Sequence[int]
    inter: torch.Tensor = field(init=False)
    union: torch.Tensor = field(init=False)
    episodes: torch.Tensor = field(init=False)
    fb: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.class_ids = tuple(int(c) for c in self.class_ids)
        if len(set(self.class_ids)) != len(self.class_ids) or not self.class_ids:
            raise ValueError(f"IoUAccumulator: class_ids must be distinct and non-empty, got {self.class_ids}")
        n = len(self.class_ids)
        self._index = {c: i for i, c in enumerate(self.class_ids)}
        self.inter = torch.zeros(n, dtype=torch.int64)
        self.union = torch.zeros(n, dtype=torch.int64)
        self.episodes = torch.zeros(n, dtype=torch.int64)
        self.fb = torch.zeros(4, dtype=torch.int64)  # inter_fg, union_fg, inter_bg, union_bg

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: int) -> torch.Tensor:
        """Add one episode.

        Args:
            pred: (H, W) binary prediction.
            target: (H, W) label in {0, 1, 255}.
            class_id: the episode's class (must be one of ``class_ids``).

        Returns:
            This episode's counts ``[inter_fg, union_fg, inter_bg, union_bg]``.
        """
        cid = int(class_id)
        if cid not in self._index:
            raise KeyError(f"IoUAccumulator: class {cid} is not among the scored classes {self.class_ids}")
        counts = episode_counts(pred, target)
        i = self._index[cid]
        self.inter[i] += counts[0]
        self.union[i] += counts[1]
        self.episodes[i] += 1
        self.fb += counts
        return counts

    def merge(self, other: "IoUAccumulator") -> "IoUAccumulator":
        """Add another accumulator's sums into this one (same class ids required)."""
        if tuple(other.class_ids) != tuple(self.class_ids):
            raise ValueError(f"IoUAccumulator.merge: class ids differ: {self.class_ids} vs {other.class_ids}")
        self.load_tensor(self.as_tensor() + other.as_tensor())
        return self

    def as_tensor(self) -> torch.Tensor:
        """All sums as one flat int64 tensor (what a distributed all-reduce sums)."""
        return torch.cat([self.inter, self.union, self.episodes, self.fb])

    def load_tensor(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`as_tensor`."""
        n = len(self.class_ids)
        flat = flat.to(device="cpu", dtype=torch.int64)
        if flat.numel() != 3 * n + 4:
            raise ValueError(f"IoUAccumulator.load_tensor: expected {3 * n + 4} values, got {flat.numel()}")
        self.inter, self.union, self.episodes, self.fb = (
            flat[:n].clone(), flat[n:2 * n].clone(), flat[2 * n:3 * n].clone(), flat[3 * n:].clone())

    def compute(self) -> dict:
        """Scores from the sums.

        Returns:
            dict with ``miou`` (mean IoU over classes that had at least one episode),
            ``fb_iou`` (mean of foreground and background IoU, each from sums over all episodes),
            ``per_class`` {class_id: IoU or NaN when the class had no episode}, ``episodes``
            (total), ``episodes_per_class`` and ``missing_classes``. Scores are fractions in [0, 1].
        """
        per_class = {}
        for c, i, u, e in zip(self.class_ids, self.inter.tolist(), self.union.tolist(), self.episodes.tolist()):
            per_class[c] = (i / u if u > 0 else 1.0) if e > 0 else math.nan
        seen = [v for v in per_class.values() if not math.isnan(v)]
        fg = _ratio(self.fb[0], self.fb[1])
        bg = _ratio(self.fb[2], self.fb[3])
        return {
            "miou": sum(seen) / len(seen) if seen else math.nan,
            "fb_iou": (fg + bg) / 2 if int(self.episodes.sum()) else math.nan,
            "fg_iou": fg,
            "bg_iou": bg,
            "per_class": per_class,
            "episodes": int(self.episodes.sum()),
            "episodes_per_class": dict(zip(self.class_ids, self.episodes.tolist())),
            "missing_classes": [c for c, v in per_class.items() if math.isnan(v)],
        }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    # An empty union (nothing predicted, nothing labelled) is a perfect score, not a division by 0.
    return float(num) / float(den) if int(den) > 0 else 1.0


def summarize_runs(values: Iterable[float]) -> dict:
    """Mean, population std, best and all values of a score over several seeds."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize_runs: no values")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {"mean": mean, "std": std, "best": max(vals), "values": vals}
