"""COCO 2014 sources: instance annotations -> semantic class-id masks with contiguous ids 1..80.

Overlaps: instances are painted in decreasing area, so a smaller instance lying on a larger one
stays visible (it would otherwise vanish under it). ``iscrowd`` regions become 255 (ignore),
but only where no regular instance was painted: a crowd region is uncertain, an instance is not.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from svfseg.data.io import DataError
from svfseg.labels import IGNORE_LABEL

__all__ = ["load_coco_annotations", "coco_mask", "KNOWN_COUNTS"]

KNOWN_COUNTS = {"train": 82081, "val": 40137}


def load_coco_annotations(path: str | Path) -> tuple[list[dict], dict[int, list[dict]], dict[int, int]]:
    """Read an ``instances_*.json``.

    Returns:
        (images sorted by file name, annotations grouped by image id, category id -> contiguous id).
    """
    path = Path(path)
    try:
        blob = json.loads(path.read_text())
        cats = sorted(c["id"] for c in blob["categories"])
        images = sorted(blob["images"], key=lambda im: im["file_name"])
        anns: dict[int, list[dict]] = {}
        for a in blob["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected a COCO instances json (images, annotations, categories): {e}") from None
    return images, anns, {c: i + 1 for i, c in enumerate(cats)}


def _decode(segm, h: int, w: int) -> np.ndarray:
    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:  # compressed RLE
        rle = segm
    return mask_utils.decode(rle).astype(bool)


def coco_mask(image: dict, anns: list[dict], cat_map: dict[int, int]) -> np.ndarray:
    """Semantic mask (uint8) of one image: class ids 1..80, 0 background, 255 crowd/ignore."""
    h, w = int(image["height"]), int(image["width"])
    out = np.zeros((h, w), np.uint8)
    painted = np.zeros((h, w), bool)
    crowd = np.zeros((h, w), bool)
    regular = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0)))
    for a in regular:
        if a["category_id"] not in cat_map:
            raise DataError(f"annotation {a.get('id')} of image {image['file_name']}: unknown category "
                            f"{a['category_id']}")
        m = _decode(a["segmentation"], h, w)
        out[m] = cat_map[a["category_id"]]
        painted |= m
    for a in anns:
        if a.get("iscrowd", 0):
            crowd |= _decode(a["segmentation"], h, w)
    out[crowd & ~painted] = IGNORE_LABEL
    return out
