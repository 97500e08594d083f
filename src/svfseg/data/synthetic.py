"""synthetic-5i: a procedural few-shot segmentation benchmark written in the Pascal layout.

Twenty classes, each a shape family drawn with its own texture family and colour statistics
(class ``c`` and ``c + 10`` share a texture, so shape matters too); colours overlap heavily across
classes and the cluttered, textured background uses the same colours and textures, so colour
look-up does not solve it. Each image holds 1-3 objects of different classes (scale, rotation,
aspect and outline jitter, occlusion), 0-2 textured distractor blobs labelled background, and a
thin 255 band on every object border as in VOC. Output is deterministic in the seed (same seed,
same bytes) and independent of the number of worker processes.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import multiprocessing
import os
from pathlib import Path

import cv2
import numpy as np

from svfseg.data.io import DataError, atomic_dir, write_list
from svfseg.data.synthetic_shapes import SHAPES, TEXTURES, random_blob, shape_polygons, texture
from svfseg.labels import IGNORE_LABEL

__all__ = ["generate_synthetic", "render_image", "scaled_min_pixels", "CLASS_NAMES", "MARKER"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
CLASS_SHAPES = SHAPES
CLASS_TEXTURES = tuple(TEXTURES[c % len(TEXTURES)] for c in range(len(SHAPES)))
CLASS_NAMES = tuple(f"{s}-{t}" for s, t in zip(CLASS_SHAPES, CLASS_TEXTURES))  # == splits.SYNTHETIC_CLASSES (tested)
# Class hue centres spread irregularly; per-instance hue noise (sd 0.1 turn) makes them overlap.
HUE_CENTRES = tuple((c * 0.381966) % 1.0 for c in range(len(SHAPES)))
_SPLIT_CODE = {"train": 1, "val": 2}


def scaled_min_pixels(size: int) -> int:
    """Small-object threshold for images of longer side ``size``: 2,048 px scaled by (size / 473)^2.

    The 2,048-px rule was made for Pascal images of about 500 px seen at 473 px; keeping the same
    fraction of the image (0.9%) gives 234 px at 160 px.
    """
    return max(1, int(round(2048 * (size / 473.0) ** 2)))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.95))


def _class_colours(c: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h = HUE_CENTRES[c]
    a = _hsv(h + rng.normal(0, 0.1), rng.uniform(0.35, 0.95), rng.uniform(0.5, 1.0))
    b = _hsv(h + 0.5 + rng.normal(0, 0.1), rng.uniform(0.25, 0.9), rng.uniform(0.12, 0.55))
    return (a, b) if rng.random() < 0.5 else (b, a)


def _paint(img, label, fill, holes, *, centre, radius, angle, aspect, tex, colours, rng, class_id):
    """Rasterise one object (or distractor when class_id is 0 and label is None) into img/label."""
    h, w = img.shape[:2]
    ca, sa = np.cos(angle), np.sin(angle)
    rot = np.array([[ca, -sa], [sa, ca]])
    to_px = lambda p: (p * [1.0, aspect]) @ rot.T * radius + centre  # noqa: E731
    mask = np.zeros((h, w), np.uint8)
    sh = 4  # sub-pixel vertex precision for fillPoly
    cv2.fillPoly(mask, [np.round(to_px(p) * (1 << sh)).astype(np.int32) for p in fill], 1, cv2.LINE_8, sh)
    if holes:
        cv2.fillPoly(mask, [np.round(to_px(p) * (1 << sh)).astype(np.int32) for p in holes], 0, cv2.LINE_8, sh)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0
    y0, y1, x0, x1 = max(ys.min() - 2, 0), min(ys.max() + 3, h), max(xs.min() - 2, 0), min(xs.max() + 3, w)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = (xx - centre[0]) / radius, (yy - centre[1]) / radius
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    p = texture(tex, u, v, rng)[..., None]
    shade = 1.0 + 0.25 * (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))[..., None]
    col = (colours[0] * p + colours[1] * (1.0 - p)) * shade
    alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.float32), (3, 3), 0.6)[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1.0 - alpha) + col * alpha
    if label is not None:
        label[mask.astype(bool)] = class_id
    return len(ys)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    k = int(rng.integers(2, 5))
    field = np.stack([_random_colour(rng) for _ in range(k * k)]).reshape(k, k, 3).astype(np.float32)
    img = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    if rng.random() < 0.7:  # a faint full-frame texture so texture alone does not mark objects
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        s = max(h, w) * rng.uniform(0.15, 0.35)
        p = texture(TEXTURES[int(rng.integers(len(TEXTURES)))], (xx - w / 2) / s, (yy - h / 2) / s, rng)[..., None]
        a = rng.uniform(0.15, 0.45)
        img = img * (1 - a) + a * (p * _random_colour(rng) + (1 - p) * _random_colour(rng))
    for _ in range(int(rng.integers(3, 9))):  # clutter strokes
        pts = np.round(rng.uniform([0, 0], [w, h], (int(rng.integers(2, 5)), 2))).astype(np.int32)
        cv2.polylines(img, [pts], False, _random_colour(rng).tolist(), int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def render_image(seed: int, split: str, i: int, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``i`` of a split: RGB uint8 (H, W, 3) and class-id label uint8 (H, W).

    The longer side is ``size``, the other 75-100% of it; randomness is ``default_rng([seed, split, i])``.
    """
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
    short = int(round(size * rng.uniform(0.75, 1.0)))
    h, w = (short, size) if rng.random() < 0.5 else (size, short)
    img = _background(rng, h, w)
    label = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(0, 3))):  # textured distractors, labelled background
        _paint(img, None, [random_blob(rng)], [], centre=rng.uniform([0, 0], [w, h]),
               radius=size * rng.uniform(0.1, 0.22), angle=rng.uniform(0, 2 * np.pi), aspect=1.0,
               tex=TEXTURES[int(rng.integers(len(TEXTURES)))], colours=(_random_colour(rng), _random_colour(rng)),
               rng=rng, class_id=0)
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    classes = rng.choice(len(CLASS_NAMES), size=n, replace=False)
    centres: list[np.ndarray] = []
    for c in classes:
        radius = size * rng.uniform(0.15, 0.28)
        for _ in range(10):  # spread the objects so that occlusion is partial
            centre = rng.uniform([radius * 0.6, radius * 0.6], [w - radius * 0.6, h - radius * 0.6])
            if all(np.linalg.norm(centre - o) > 0.9 * radius for o in centres):
                break
        centres.append(centre)
        fill, holes = shape_polygons(CLASS_SHAPES[c], rng)
        _paint(img, label, fill, holes, centre=centre, radius=radius, angle=rng.uniform(0, 2 * np.pi),
               aspect=rng.uniform(0.85, 1.15), tex=CLASS_TEXTURES[c], colours=_class_colours(int(c), rng),
               rng=rng, class_id=int(c) + 1)
    bw = max(1, int(round(size / 160)))  # VOC's ~5 px band at ~500 px is ~1.6 px at 160 px
    kernel = np.ones((2 * bw + 1, 2 * bw + 1), np.uint8)
    label[cv2.dilate(label, kernel) != cv2.erode(label, kernel)] = IGNORE_LABEL
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label


def _render_job(args) -> tuple[str, str]:
    root, seed, split, i, size = args
    img, label = render_image(seed, split, i, size)
    name = f"syn_{split}_{i:05d}"
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    ok2, png = cv2.imencode(".png", label)
    if not (ok and ok2):
        raise DataError(f"{root}: could not encode synthetic image {name}")
    (Path(root) / "JPEGImages" / f"{name}.jpg").write_bytes(jpg.tobytes())
    (Path(root) / "SegmentationClassAug" / f"{name}.png").write_bytes(png.tobytes())
    return name, hashlib.sha256(jpg.tobytes() + png.tobytes()).hexdigest()


def _params(seed, n_train, n_val, size) -> dict:
    return {"seed": int(seed), "n_train": int(n_train), "n_val": int(n_val), "size": int(size),
            "generator_version": GENERATOR_VERSION}


def generate_synthetic(root: str | os.PathLike, *, seed: int = 0, n_train: int = 2000, n_val: int = 500,
                       size: int = 160, workers: int | None = None) -> Path:
    """Generate synthetic-5i at ``root`` (Pascal layout), or reuse it if already made with these parameters.

    A marker ``synthetic.json`` records the parameters, a sha256 fingerprint of every file's
    bytes and the recommended ``min_pixels``. A root made with other parameters is regenerated;
    a non-empty folder without the marker is never touched.

    Args:
        root: output folder.
        seed: generator seed.
        n_train, n_val: image counts.
        size: longer image side in pixels.
        workers: processes (default: all cores, at most 8).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    params = _params(seed, n_train, n_val, size)
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("params") == params and (root / "val.txt").is_file():
                return root
        except ValueError:
            pass
        log.info("%s: synthetic data made with other parameters; regenerating", root)
    elif root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: expected an empty folder or a synthetic-5i root (with {MARKER}), "
                        f"found other files; not overwriting")
    if min(n_train, n_val) < 1 or size < 32:
        raise ValueError(f"need n_train, n_val >= 1 and size >= 32, got {n_train}, {n_val}, {size}")
    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    with atomic_dir(root, replace=True) as tmp:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClassAug").mkdir()
        jobs = [(str(tmp), seed, sp, i, size) for sp, n in (("train", n_train), ("val", n_val)) for i in range(n)]
        if workers > 1 and len(jobs) > 64:
            with multiprocessing.get_context().Pool(workers) as pool:
                done = pool.map(_render_job, jobs, chunksize=32)
        else:
            done = [_render_job(j) for j in jobs]
        digest = hashlib.sha256()
        for name, h in done:
            digest.update(f"{name}:{h}\n".encode())
        for sp, n in (("train", n_train), ("val", n_val)):
            names = [f"syn_{sp}_{i:05d}" for i in range(n)]
            write_list(tmp / f"{sp}.txt", [(f"JPEGImages/{m}.jpg", f"SegmentationClassAug/{m}.png") for m in names])
        blob = {"benchmark": "synthetic", "params": params, "fingerprint": digest.hexdigest()[:16],
                "min_pixels": scaled_min_pixels(size), "classes": list(CLASS_NAMES)}
        (tmp / MARKER).write_text(json.dumps(blob, indent=1))
    log.info("%s: generated synthetic-5i (%d train + %d val at %d px)", root, n_train, n_val, size)
    return root
