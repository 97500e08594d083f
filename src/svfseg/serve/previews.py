"""What the page shows of the inputs before Segment: each support with the mask the model will get, the queries
with their ground truths; as images and one-line notes, never an exception (Segment reports problems again)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from svfseg.data.io import wxh
from svfseg.results import pct
from svfseg.serve.classes import class_name
from svfseg.serve.inputs import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERIES, ServeError, SupportSlot, check_queries,
                                 gt_key, read_mask_upload, read_rgb_upload, support_mask)

__all__ = ["GIVEN_COLOUR", "PREVIEW_SIDE", "THUMB_SIDE", "fit_within", "SupportPreview", "support_preview",
           "query_thumbnails"]

# Green marks what the user gave (support masks, ground truths), as in `svfseg predict`'s overlay panel;
# red is the model's prediction.
GIVEN_COLOUR = (40, 200, 80)
PREVIEW_SIDE = 384  # a support preview's longer side: enough to judge the mask, small to send
THUMB_SIDE = 192  # a query thumbnail's longer side


def fit_within(rgb: np.ndarray, mask: Optional[np.ndarray], side: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``rgb`` (bilinear) and ``mask`` (nearest) scaled down so the longer side is at most ``side``."""
    h, w = rgb.shape[:2]
    if max(h, w) <= side:
        return rgb, mask
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST))
    return small, mask


def _given_overlay(rgb: np.ndarray, mask: Optional[np.ndarray], side: int) -> np.ndarray:
    """``rgb`` with ``mask`` in green, at most ``side`` px; a small image is enlarged by a whole factor (each pixel a
    block, so the mask's edge stays exact): the browser would blur it when it fills the preview."""
    from svfseg.engine.vis import overlay

    small, small_mask = fit_within(rgb, mask, side)
    out = small if small_mask is None else overlay(small, small_mask, GIVEN_COLOUR)
    factor = side // max(out.shape[:2])
    return np.repeat(np.repeat(out, factor, axis=0), factor, axis=1) if factor > 1 else out


@dataclass
class SupportPreview:
    """One support slot as the page previews it."""

    image: Optional[np.ndarray]  # RGB: the support with its mask in green, or the mask alone; None: nothing to show
    note: str  # Markdown: which mask the model gets and how large it is, or what is missing or wrong


def _mask_source(i: int, slot: SupportSlot, names: Sequence[str]) -> str:
    """Which mask support ``i`` uses: an uploaded file wins over painted strokes (as Segment reads it)."""
    if not slot.mask:
        return "the painted strokes"
    picked = ""
    if slot.mask_class is not None:
        name = class_name(slot.mask_class, names)
        picked = f", class {slot.mask_class}" + (f" ({name})" if name else "")
    text = f"the uploaded mask **{Path(slot.mask).name}**{picked}"
    if slot.painted is not None:
        text += "; the painted strokes are not used while a mask file is given (remove the file to use them)"
    return text


def support_preview(i: int, slot: SupportSlot, names: Sequence[str] = (), *,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> SupportPreview:
    """Support ``i`` with the mask the model will get in green, from the same readers Segment uses.

    Args:
        i: the slot's number, 1-based (named in the note).
        slot: what the slot holds now.
        names: the checkpoint's class names (a picked class is named by them).
        max_pixels: the per-image cap.
    """
    if not slot.used:
        return SupportPreview(None, "")
    if not slot.image:  # the mask alone, so a picked class can be checked before the image is there
        try:
            mask = read_mask_upload(slot.mask, f"support {i} mask", None, max_pixels=max_pixels,
                                    mask_class=slot.mask_class, allow_empty=True)
        except ServeError as e:
            return SupportPreview(None, f"**Support {i}:** {e}")
        grey = np.full(mask.shape + (3,), 60, np.uint8)
        return SupportPreview(_given_overlay(grey, mask, PREVIEW_SIDE),
                              f"Support {i}: {_mask_source(i, slot, names)}; upload its image to see the object on it")
    if not slot.mask and slot.painted is None:
        return SupportPreview(None, f"Support {i}: no mask yet; upload one or paint the object on the image")
    try:
        rgb = read_rgb_upload(slot.image, f"support {i} image", max_pixels)
        mask = support_mask(i, slot, rgb.shape[:2], max_pixels=max_pixels)
    except ServeError as e:
        return SupportPreview(None, f"**Support {i}:** {e}")
    return SupportPreview(_given_overlay(rgb, mask, PREVIEW_SIDE),
                          f"Support {i} ({wxh(rgb.shape)}): the object in green is {_mask_source(i, slot, names)}, "
                          f"{pct(float(mask.mean()), digits=1, unit='%')} of the image")


def query_thumbnails(query_paths: Sequence[str], gt_paths: Sequence[str], *, mask_class: Optional[int] = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, max_queries: int = DEFAULT_MAX_QUERIES
                     ) -> tuple[list[tuple[np.ndarray, str]], str]:
    """Each query small, its ground truth (paired by name, as Segment pairs them) in green, and a caption.

    Returns:
        (thumbnail, caption) per readable query, and a Markdown note on what could not be shown or paired.
    """
    if not query_paths:
        return [], ""
    problems = []
    try:
        queries = check_queries(list(query_paths), max_pixels=max_pixels, max_queries=max_queries)
    except ServeError as e:
        return [], f"**Queries:** {e}"
    gts: dict[str, list[str]] = {}
    for p in gt_paths:
        gts.setdefault(gt_key(p), []).append(p)
    names = {q.name for q in queries}
    problems += [f"ground truth {Path(p).name}: no query named {key!r}" for key, ps in gts.items() if key not in names
                 for p in ps]
    items = []
    for q in queries:
        try:
            rgb = read_rgb_upload(q.path, "query", max_pixels)
        except ServeError as e:
            problems.append(str(e))
            continue
        caption, mask = f"{Path(q.path).name} · {wxh(rgb.shape)}", None
        own = gts.get(q.name, [])
        if len(own) > 1:
            caption += f" · {len(own)} ground truths: upload one"
        elif own:
            try:
                mask = read_mask_upload(own[0], f"ground truth of {q.name}", rgb.shape[:2], max_pixels=max_pixels,
                                        mask_class=mask_class, allow_empty=True, what="the query")
                caption += f" · ground truth {Path(own[0]).name}"
            except ServeError as e:
                caption += " · ground truth not used"
                problems.append(str(e))
        else:
            caption += " · no ground truth"
        items.append((_given_overlay(rgb, mask, THUMB_SIDE), caption))
    return items, "; ".join(problems)
