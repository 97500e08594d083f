"""Segmentation metrics: per-class IoU sums, mIoU over novel classes, FB-IoU, a multi-class confusion matrix."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from svfseg.labels import IGNORE_LABEL


def episode_counts(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
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

    def compute(self, empty_class: str = "drop") -> dict:
        """Scores from the sums.

        Args:
            empty_class: how a class without any episode counts: "drop" (NaN, left out of
                mIoU: svfseg's rule) or "zero" (IoU 0, and mIoU divides by every class of
                ``class_ids``: PFENet's and BAM's ``inter / (union + 1e-10)`` summed over the
                fold's classes and divided by their count).

        Returns:
            dict with ``miou`` (mean IoU over classes that had at least one episode, or over
            all classes with ``empty_class="zero"``),
            ``fb_iou`` (mean of foreground and background IoU, each from sums over all episodes),
            ``per_class`` {class_id: IoU or NaN when the class had no episode; 0 when its union
            stayed empty, as PFENet counts it}, ``episodes``
            (total), ``episodes_per_class``, ``missing_classes`` and ``empty_class``. Scores are
            fractions in [0, 1].
        """
        if empty_class not in ("drop", "zero"):
            raise ValueError(f"IoUAccumulator.compute: empty_class must be 'drop' or 'zero', got {empty_class!r}")
        missing_value = 0.0 if empty_class == "zero" else math.nan
        per_class = {}
        for c, i, u, e in zip(self.class_ids, self.inter.tolist(), self.union.tolist(), self.episodes.tolist()):
            per_class[c] = _ratio(i, u) if e > 0 else missing_value
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
            "missing_classes": [c for c, e in zip(self.class_ids, self.episodes.tolist()) if e == 0],
            "empty_class": empty_class,
        }


def _ratio(num: float | torch.Tensor, den: float | torch.Tensor) -> float:
    # An empty union (nothing predicted, nothing labelled) scores 0, as PFENet's and BAM's
    # intersection / (union + 1e-10) does, instead of raising a division by zero.
    return float(num) / float(den) if int(den) > 0 else 0.0


class ConfusionMatrix:
    """Pixel confusion matrix over ``num_classes`` labels (255 ignored): exact int64 sums.

    Args:
        num_classes: Label values 0..num_classes-1 (0 = background).
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_LABEL) -> None:
        """Add one prediction (H, W) against its label (H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix: prediction {tuple(pred.shape)} vs label {tuple(target.shape)}")
        t = target.reshape(-1).to("cpu", torch.int64)
        p = pred.reshape(-1).to("cpu", torch.int64)
        keep = t != ignore_index
        t, p = t[keep], p[keep]
        if t.numel() and (int(t.max()) >= self.num_classes or int(t.min()) < 0):
            raise ValueError(f"ConfusionMatrix: label values outside 0..{self.num_classes - 1} (and {ignore_index})")
        self.mat += torch.bincount(t * self.num_classes + p, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def compute(self, class_ids: Optional[Sequence[int]] = None) -> dict:
        """Scores from the sums (fractions in [0, 1]).

        Args:
            class_ids: Benchmark id of each foreground channel 1..C-1 (keys of ``per_class``);
                default the channel numbers.

        Returns:
            ``miou`` (mean IoU over the foreground channels that occur in labels or predictions,
            as BAM's base-learner score: background excluded), ``miou_with_background``,
            ``bg_iou``, ``fb_iou`` (mean of the background IoU and the IoU of "any foreground
            class" vs background), ``pixel_acc`` and ``per_class`` {id: IoU or NaN}.
        """
        m = self.mat.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))
        ids = list(class_ids) if class_ids is not None else list(range(1, self.num_classes))
        if len(ids) != self.num_classes - 1:
            raise ValueError(f"ConfusionMatrix.compute: {len(ids)} class ids for {self.num_classes - 1} "
                             "foreground channels")
        fg = [v for v in iou[1:].tolist() if not math.isnan(v)]
        every = [v for v in iou.tolist() if not math.isnan(v)]
        bg_inter, bg_union = float(m[0, 0]), float(m[0].sum() + m[:, 0].sum() - m[0, 0])
        fg_inter = float(m[1:, 1:].sum())
        fg_union = float(m.sum() - m[0, 0])
        bg = _ratio(bg_inter, bg_union)
        fgi = _ratio(fg_inter, fg_union)
        total = float(m.sum())
        return {
            "miou": sum(fg) / len(fg) if fg else math.nan,
            "miou_with_background": sum(every) / len(every) if every else math.nan,
            "bg_iou": bg,
            "fb_iou": (bg + fgi) / 2,
            "pixel_acc": float(inter.sum()) / total if total else math.nan,
            "per_class": {int(c): float(v) for c, v in zip(ids, iou[1:].tolist())},
        }
