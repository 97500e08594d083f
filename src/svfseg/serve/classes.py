"""The page's class picker for a class-index mask: the classes present, named by the checkpoint's data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from svfseg.data.io import DataError, read_mask
from svfseg.results import pct
from svfseg.serve.inputs import ServeError, check_pixels, is_jpeg, object_classes
from svfseg.serve.limits import DEFAULT_MAX_PIXELS

__all__ = ["MaskClass", "mask_classes", "class_name", "class_choices", "default_class"]


@dataclass(frozen=True)
class MaskClass:
    """One object class present in a class-index mask."""

    value: int  # the pixel value (the class id in the dataset's numbering)
    fraction: float  # of the mask's pixels


def mask_classes(path: Optional[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[MaskClass]:
    """The object classes of a class-index mask, by value; [] for a binary mask and for a file the picker cannot use.

    A JPEG (its blurred values are no classes: Segment says to save it as PNG), an unreadable file and one
    above ``max_pixels`` give [] too: the picker stays hidden and Segment names the problem.
    """
    if not path or is_jpeg(path):
        return []
    try:
        check_pixels(path, "mask", max_pixels)
        values, counts = np.unique(read_mask(path), return_counts=True)
    except (ServeError, DataError, OSError, ValueError):
        return []
    objects = set(object_classes(values.tolist()))
    total = int(counts.sum())
    return [MaskClass(int(v), c / total) for v, c in zip(values.tolist(), counts.tolist()) if v in objects]


def class_name(value: int, names: Sequence[str]) -> Optional[str]:
    """The dataset's name of class ``value`` (ids start at 1: 0 is background); None outside the names."""
    return names[value - 1] if 1 <= value <= len(names) else None


def class_choices(classes: Sequence[MaskClass], names: Sequence[str] = ()) -> list[tuple[str, int]]:
    """The picker's entries: ``("15 person (23% of the image)", 15)``, or ``("15 (23% of the image)", 15)``
    where the checkpoint's data names no class 15."""
    out = []
    for c in classes:
        name = class_name(c.value, names)
        out.append((f"{c.value}{f' {name}' if name else ''} ({pct(c.fraction, digits=0, unit='%')} of the image)",
                    c.value))
    return out


def default_class(classes: Sequence[MaskClass]) -> Optional[int]:
    """The class the picker starts on: the largest (the object a support is most often about); None when none."""
    return max(classes, key=lambda c: (c.fraction, -c.value)).value if classes else None
