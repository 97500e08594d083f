"""Class splits: benchmark + fold -> novel / base class ids (Pascal-5i, COCO-20i, synthetic-5i)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Split", "BENCHMARKS", "CONVENTIONS", "num_classes", "num_folds", "class_split", "class_names"]

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# COCO 2014 category names in increasing original category id; the position + 1 is the contiguous id.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Imported lazily by synthetic.py as well; kept here so splits need no generator import.
SYNTHETIC_CLASSES = (
    "disc-stripes", "square-checker", "triangle-dots", "star-rings", "cross-zigzag",
    "ring-grid", "hexagon-waves", "crescent-blotches", "heart-spokes", "arrow-plaid",
    "diamond-stripes", "lshape-checker", "tshape-dots", "ellipse-rings", "pentagon-zigzag",
    "semicircle-grid", "gear-waves", "hourglass-blotches", "bolt-spokes", "trapezoid-plaid",
)

BENCHMARKS = {"pascal": PASCAL_CLASSES, "coco": COCO_CLASSES, "synthetic": SYNTHETIC_CLASSES}
CONVENTIONS = ("interleaved", "consecutive")


@dataclass(frozen=True)
class Split:
    """Novel (test) and base (train) class ids of one fold; ids are 1-based, 0 is background."""

    novel: tuple[int, ...]
    base: tuple[int, ...]


def _check_benchmark(benchmark: str) -> tuple[str, ...]:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[benchmark]


def num_classes(benchmark: str) -> int:
    """Number of foreground classes (20 for pascal and synthetic, 80 for coco)."""
    return len(_check_benchmark(benchmark))


def num_folds(benchmark: str) -> int:
    """Number of cross-validation folds (4 for every benchmark)."""
    _check_benchmark(benchmark)
    return 4


def class_names(benchmark: str) -> tuple[str, ...]:
    """Class names indexed by ``class_id - 1``."""
    return _check_benchmark(benchmark)


def class_split(benchmark: str, fold: int, convention: str = "interleaved") -> Split:
    """Novel / base classes of a fold.

    Pascal-5i and synthetic-5i: fold i novel = 5i+1 .. 5i+5 (``convention`` is ignored).
    COCO-20i: "interleaved" (PFENet ``use_split_coco``, BAM, SVF): fold i novel = {i+1, i+5, ..., i+77};
    "consecutive": fold i novel = 20i+1 .. 20i+20.

    Args:
        benchmark: "pascal", "coco" or "synthetic".
        fold: 0..3.
        convention: "interleaved" (default) or "consecutive"; only matters for coco.

    Returns:
        Split with sorted 1-based novel and base ids.
    """
    n = num_classes(benchmark)
    if not isinstance(fold, int) or not 0 <= fold < num_folds(benchmark):
        raise ValueError(f"fold for {benchmark!r} must be an int in 0..3, got {fold!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown COCO fold convention {convention!r}: expected one of {CONVENTIONS}")
    per_fold = n // 4
    if benchmark == "coco" and convention == "interleaved":
        novel = tuple(fold + 1 + 4 * k for k in range(per_fold))
    else:
        novel = tuple(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))
    base = tuple(c for c in range(1, n + 1) if c not in novel)
    return Split(novel=novel, base=base)
