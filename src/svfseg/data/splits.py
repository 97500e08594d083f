"""Class splits: benchmark (+ a custom root's metadata) + fold -> novel / base class ids."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Split", "CustomClasses", "BENCHMARKS", "CUSTOM", "CONVENTIONS", "num_classes", "num_folds",
           "class_split", "class_names", "consecutive_folds"]

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
# A user's dataset: classes and folds come from the root's dataset.yaml (svfseg.data.meta).
CUSTOM = "custom"
CONVENTIONS = ("interleaved", "consecutive")


@dataclass(frozen=True)
class Split:
    """Novel (test) and base (train) class ids of one fold; ids are 1-based, 0 is background."""

    novel: tuple[int, ...]
    base: tuple[int, ...]


@dataclass(frozen=True)
class CustomClasses:
    """The classes and folds of a custom benchmark (what a root's ``dataset.yaml`` says).

    Attributes:
        names: class names; class id ``i`` is ``names[i - 1]`` (0 is background).
        folds: the novel class ids of every fold; the base classes of a fold are all the others.
    """

    names: tuple[str, ...]
    folds: tuple[tuple[int, ...], ...]


def consecutive_folds(n_classes: int, n_folds: int) -> tuple[tuple[int, ...], ...]:
    """Pascal-style folds: consecutive blocks of ids, sizes differing by at most one (earlier blocks larger)."""
    if not 1 <= n_folds <= n_classes:
        raise ValueError(f"folds must be in 1..{n_classes} (the number of classes), got {n_folds}")
    size, extra = divmod(n_classes, n_folds)
    out, start = [], 1
    for f in range(n_folds):
        n = size + (f < extra)
        out.append(tuple(range(start, start + n)))
        start += n
    return tuple(out)


def _check_benchmark(benchmark: str, meta: CustomClasses | None = None) -> tuple[str, ...]:
    if benchmark == CUSTOM:
        if meta is None:
            raise ValueError("benchmark 'custom' takes its classes from the root's dataset.yaml: expected its "
                             "metadata (svfseg.data.benchmark.Benchmark.resolve reads it), found none")
        return meta.names
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: expected one of {sorted(BENCHMARKS) + [CUSTOM]}")
    return BENCHMARKS[benchmark]


def num_classes(benchmark: str, meta: CustomClasses | None = None) -> int:
    """Number of foreground classes (20 for pascal and synthetic, 80 for coco; custom: ``meta``)."""
    return len(_check_benchmark(benchmark, meta))


def num_folds(benchmark: str, meta: CustomClasses | None = None) -> int:
    """Number of cross-validation folds (4 for the built-in benchmarks; custom: ``meta``)."""
    _check_benchmark(benchmark, meta)
    return len(meta.folds) if benchmark == CUSTOM else 4


def class_names(benchmark: str, meta: CustomClasses | None = None) -> tuple[str, ...]:
    """Class names indexed by ``class_id - 1``."""
    return _check_benchmark(benchmark, meta)


def class_split(benchmark: str, fold: int, convention: str = "interleaved",
                meta: CustomClasses | None = None) -> Split:
    """Novel / base classes of a fold.

    Pascal-5i and synthetic-5i: fold i novel = 5i+1 .. 5i+5 (``convention`` is ignored).
    COCO-20i: "interleaved" (PFENet ``use_split_coco``, BAM, SVF): fold i novel = {i+1, i+5, ..., i+77};
    "consecutive": fold i novel = 20i+1 .. 20i+20.

    Args:
    Custom: the novel ids that ``meta.folds[fold]`` lists.

    Args:
        benchmark: "pascal", "coco", "synthetic" or "custom".
        fold: 0..3 (custom: 0..len(meta.folds) - 1).
        convention: "interleaved" (default) or "consecutive"; only matters for coco.
        meta: the classes and folds of a custom root; ignored for the built-in benchmarks.

    Returns:
        Split with sorted 1-based novel and base ids.
    """
    n = num_classes(benchmark, meta)
    folds = num_folds(benchmark, meta)
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold for {benchmark!r} must be an int in 0..{folds - 1}, got {fold!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown COCO fold convention {convention!r}: expected one of {CONVENTIONS}")
    if benchmark == CUSTOM:
        novel = tuple(sorted(meta.folds[fold]))
        return Split(novel=novel, base=tuple(c for c in range(1, n + 1) if c not in novel))
    per_fold = n // 4
    if benchmark == "coco" and convention == "interleaved":
        novel = tuple(fold + 1 + 4 * k for k in range(per_fold))
    else:
        novel = tuple(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))
    base = tuple(c for c in range(1, n + 1) if c not in novel)
    return Split(novel=novel, base=base)
