"""What the page uploads, read and checked: supports, queries, ground truths; sizes capped; errors name each file."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from svfseg.data.io import DataError, image_size, read_image, read_mask, wxh
from svfseg.labels import IGNORE_LABEL
from svfseg.predict import PredictInputError, binary_mask
from svfseg.serve.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERIES, MAX_SHOTS

__all__ = ["MAX_SHOTS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_QUERIES", "ServeError", "SupportSlot", "QueryFile",
           "check_pixels", "read_rgb_upload", "object_classes", "is_binary", "read_mask_upload", "read_supports",
           "check_queries", "gt_key", "read_ground_truth", "unpack_mask", "editor_background", "brush_radius",
           "is_jpeg", "support_mask", "ground_truth_class"]

GT_SUFFIXES = ("_mask", "_gt", "_label")  # "cat.png" is the ground truth of query "cat.jpg", so is "cat_mask.png"
_JPEG_MAGIC = b"\xff\xd8"


class ServeError(ValueError):
    """A problem the page shows the user instead of a result (bad upload, checkpoint that does not load)."""


@dataclass
class SupportSlot:
    """One support as the page sends it: an image file and either a mask file or painted strokes."""

    image: Optional[str] = None
    mask: Optional[str] = None
    painted: Optional[np.ndarray] = None  # (H, W) bool, from the image editor's layers
    mask_class: Optional[int] = None  # the object's value in a class-index mask (the page's class picker)

    @property
    def used(self) -> bool:
        return bool(self.image) or bool(self.mask) or self.painted is not None


@dataclass
class QueryFile:
    """A query checked from its header only: decoded one at a time when it is segmented."""

    name: str
    path: str
    hw: Optional[tuple[int, int]]  # None: the header could not be read (the decoder will say why)


def _named(label: str, path: str) -> str:
    # Uploads live under hashed temp folders; the page names the file as the user knows it.
    return f"{label} ({Path(path).name})"


def check_pixels(path: str, label: str, max_pixels: int) -> Optional[tuple[int, int]]:
    """(H, W) from the file's header, refused above ``max_pixels`` before a pixel is decoded.

    Returns:
        None when the header cannot be read (the reader then names the problem).

    Raises:
        ServeError: the image has more than ``max_pixels`` pixels.
    """
    where = _named(label, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            h, w = image_size(path)
    except Image.DecompressionBombError:  # above PIL's own limit, far above any sensible --max-pixels
        raise ServeError(f"{where}: more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP; at most "
                         f"{max_pixels / 1e6:g} MP per image (--max-pixels): downscale it first") from None
    except (OSError, ValueError, SyntaxError):
        return None
    if h * w > max_pixels:
        raise ServeError(f"{where}: {w}x{h} pixels ({h * w / 1e6:.1f} MP); at most {max_pixels / 1e6:g} MP per "
                         f"image (--max-pixels): downscale it first")
    return h, w


def read_rgb_upload(path: str, label: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An uploaded image as RGB uint8, read by the data package's reader (the one training uses)."""
    check_pixels(path, label, max_pixels)
    try:
        return read_image(path)
    except DataError as e:
        reason = str(e).removeprefix(f"{Path(path)}: ")
        raise ServeError(f"{_named(label, path)}: cannot read it: {reason}") from None


def is_binary(values) -> bool:
    """0/1, 0/255 or 0/1/255 (1 the object, 255 an ignored border): what `predict` takes without options."""
    # 0/1/255 reads 255 as the ignored border; a 0/255 mask (255 the object) is within the same set
    return set(values) <= {0, 1, IGNORE_LABEL}


def object_classes(values) -> list[int]:
    """The classes a class picker offers for a mask with these values: all but background 0 and ignore 255."""
    return [] if is_binary(values) else [v for v in values if v not in (0, IGNORE_LABEL)]


def is_jpeg(path: str) -> bool:
    """Whether the file starts as a JPEG does (its name may say PNG)."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == _JPEG_MAGIC
    except OSError:
        return False


def read_mask_upload(path: str, label: str, expect_hw: Optional[tuple[int, int]], *, max_pixels: int,
                     mask_class: Optional[int] = None, allow_empty: bool = False, what: str = "its support image"
                     ) -> np.ndarray:
    """An uploaded mask as {0, 1} uint8: binary as it is, a class-index mask by its picked class.

    Raises:
        ServeError: unreadable, too large, a JPEG (blurred values), a class-index mask without a class,
            another size than ``expect_hw``, or empty (unless ``allow_empty``).
    """
    where = _named(label, path)
    check_pixels(path, label, max_pixels)
    try:
        arr = read_mask(path)  # the data package's reader: values as stored, a cut-off file refused
    except DataError as e:
        reason = str(e).removeprefix(f"{Path(path)}: ")
        raise ServeError(f"{where}: cannot read it as a mask image ({reason})") from None
    if expect_hw is not None and tuple(arr.shape[:2]) != tuple(expect_hw):
        raise ServeError(f"{where}: mask is {wxh(arr.shape)} but {what} is {wxh(expect_hw)} (width x height)")
    values = np.unique(arr).tolist()
    if not is_binary(values):
        if is_jpeg(path):
            raise ServeError(f"{where}: a JPEG mask ({len(values)} grey levels: JPEG blurs the edges into values "
                             f"between 0 and 255); save the mask as PNG")
        if mask_class is None:
            shown = ", ".join(map(str, object_classes(values)[:12]))
            raise ServeError(f"{where}: a class-index mask (classes {shown}); pick the object's class in the "
                             f"'object class' box under it")
    try:
        return binary_mask(arr, where, allow_empty=allow_empty,
                           mask_class=None if is_binary(values) else mask_class)
    except PredictInputError as e:
        raise ServeError(str(e)) from None


def _resize_painted(painted: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    # The editor may hand back its canvas at another scale than the file: strokes are approximate anyway.
    return np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) >= 128


def read_supports(slots: Sequence[SupportSlot], *, max_pixels: int = DEFAULT_MAX_PIXELS
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The used support slots as RGB images and {0, 1} masks (an uploaded mask wins over strokes).

    Raises:
        ServeError: no support, more than :data:`MAX_SHOTS`, a mask without image, an image
            without mask, an unreadable or too large file, a mask of another size, an empty mask.
    """
    used = [(i, s) for i, s in enumerate(slots, 1) if s.used]
    if not used:
        raise ServeError("no support: upload a support image and its mask (or paint the object on it)")
    if len(used) > MAX_SHOTS:
        raise ServeError(f"{len(used)} supports given; at most {MAX_SHOTS} (K-shot, K = 1..{MAX_SHOTS})")
    rgbs, masks = [], []
    for i, slot in used:
        if not slot.image:
            raise ServeError(f"support {i}: a mask but no image; upload the image the mask belongs to")
        rgb = read_rgb_upload(slot.image, f"support {i} image", max_pixels)
        rgbs.append(rgb)
        masks.append(support_mask(i, slot, rgb.shape[:2], max_pixels=max_pixels))
    return rgbs, masks


def support_mask(i: int, slot: SupportSlot, hw: tuple[int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> np.ndarray:
    """Support ``i``'s mask as {0, 1} at the image's (H, W) ``hw``: the uploaded file (by its picked class),
    else the painted strokes (scaled to the image).

    Raises:
        ServeError: no mask, an unreadable or too large file, another size than ``hw``, an empty mask.
    """
    if slot.mask:
        return read_mask_upload(slot.mask, f"support {i} mask", hw, max_pixels=max_pixels, mask_class=slot.mask_class)
    if slot.painted is None:
        raise ServeError(f"support {i}: no mask; upload its mask or paint the object on the image")
    painted = np.asarray(slot.painted, dtype=bool)
    if painted.shape != tuple(hw):
        painted = _resize_painted(painted, hw)
    try:
        return binary_mask(painted.astype(np.uint8), f"support {i} painted mask")
    except PredictInputError as e:
        raise ServeError(str(e)) from None


def ground_truth_class(slots: Sequence[SupportSlot]) -> Optional[int]:
    """The class a class-index ground truth is read as: the one class picked for the supports, else None."""
    picked = {s.mask_class for s in slots if s.used and s.mask and s.mask_class is not None}
    return picked.pop() if len(picked) == 1 else None


def check_queries(paths: Sequence[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_queries: int = DEFAULT_MAX_QUERIES) -> list[QueryFile]:
    """The queries, named by file stem (made unique so outputs do not collide), checked from their headers.

    Raises:
        ServeError: none, more than ``max_queries``, or one above ``max_pixels``.
    """
    if not paths:
        raise ServeError("no query: upload one or more images to segment")
    if len(paths) > max_queries:
        raise ServeError(f"{len(paths)} queries given; at most {max_queries} per request (--max-queries): "
                         f"segment them in several requests")
    out, seen = [], set()
    for p in paths:
        stem = Path(p).stem
        name, n = stem, 2
        while name in seen:
            name, n = f"{stem}_{n}", n + 1
        seen.add(name)
        out.append(QueryFile(name, str(p), check_pixels(str(p), "query", max_pixels)))
    return out


def gt_key(path: str) -> str:
    """The query name a ground-truth file belongs to: its stem less ``_mask``, ``_gt`` or ``_label``."""
    stem = Path(path).stem
    for suffix in GT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_ground_truth(gt_paths: Sequence[str], queries: Sequence[QueryFile], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                      mask_class: Optional[int] = None) -> dict[str, np.ndarray]:
    """Ground-truth masks by query name, paired by file name only (``q.png`` or ``q_mask.png`` for ``q.jpg``).

    Kept bit-packed (``np.packbits``): a request holds every ground truth while it segments.

    Args:
        gt_paths: the uploaded masks.
        queries: the checked queries.
        max_pixels: the per-image cap.
        mask_class: the class picked for the supports; a class-index ground truth is that class.

    Raises:
        ServeError: masks matching no query (all named), two masks for one query, unreadable, or of another
            size than its query.
    """
    if not gt_paths:
        return {}
    by_name = {q.name: q for q in queries}
    unmatched = [p for p in gt_paths if gt_key(p) not in by_name]
    if unmatched:
        raise ServeError("; ".join(f"ground truth {Path(p).name}: no query named {gt_key(p)!r}" for p in unmatched)
                         + f" (name each like its query: one of {', '.join(sorted(by_name))}, optionally with "
                           f"{', '.join(GT_SUFFIXES)})")
    pairs: dict[str, str] = {}
    for p in gt_paths:
        key = gt_key(p)
        if key in pairs:
            raise ServeError(f"ground truths {Path(pairs[key]).name} and {Path(p).name} both belong to query "
                             f"{key!r}; upload one")
        pairs[key] = p
    out = {}
    for key, p in pairs.items():
        q = by_name[key]
        mask = read_mask_upload(p, f"ground truth of {key}", q.hw, max_pixels=max_pixels, mask_class=mask_class,
                                allow_empty=True, what="the query")
        out[key] = np.packbits(mask.astype(bool))
    return out


def unpack_mask(packed: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A ground truth of :func:`read_ground_truth` back as (H, W) {0, 1} uint8."""
    return np.unpackbits(packed, count=hw[0] * hw[1]).reshape(hw)


def editor_background(path: Optional[str], max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
                      ) -> Optional[np.ndarray]:
    """The support image for the painting canvas, at most ``max_side`` px on its longer side; None if unusable."""
    if not path:
        return None
    try:
        rgb = read_rgb_upload(path, "support image", max_pixels)
    except ServeError:  # reported at Run time, with the file's name
        return None
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    return rgb


def brush_radius(shape: Sequence[int]) -> int:
    """A brush radius relative to the canvas: 1/25 of its shorter side, at least 2 px."""
    return max(2, round(min(shape[:2]) / 25))


@dataclass(frozen=True)
class AdaptRequest:
    """Fine-tune ``params`` on the request's supports before segmenting (None steps/lr: the checkpoint's recorded
    choice, else the defaults)."""

    params: str
    steps: Optional[int] = None
    lr: Optional[float] = None


def adapt_choices() -> list[tuple[str, str]]:
    """The page's adaptation picker: (label, ``adapt.params``), "no" first."""
    from svfseg.regimes import ADAPT_REGISTRY, NO_ADAPTATION

    return [("no", NO_ADAPTATION)] + [(f"{s.name}: {s.trains}", s.name) for s in ADAPT_REGISTRY.values()
                                      if s.backbone or s.head]


def adapt_request(params: Optional[str], steps, lr) -> Optional[AdaptRequest]:
    """The page's adaptation inputs as a request (None: do not adapt), checked.

    Raises:
        ServeError: an unknown choice, steps outside 0..MAX_ADAPT_STEPS, or a learning rate that is not > 0.
    """
    from svfseg.regimes import adapt_name, adapt_trains
    from svfseg.serve.limits import MAX_ADAPT_STEPS

    try:
        if not params or not adapt_trains(params):
            return None
        params = adapt_name(params)
    except ValueError as e:
        raise ServeError(f"adapt: {e}") from None
    if steps is not None and (not float(steps).is_integer() or not 0 <= steps <= MAX_ADAPT_STEPS):
        raise ServeError(f"adapt: expected steps 0..{MAX_ADAPT_STEPS}, found {steps}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and lr == lr):
        raise ServeError(f"adapt: expected a learning rate > 0, found {lr}")
    return AdaptRequest(params, None if steps is None else int(steps), None if lr is None else float(lr))
