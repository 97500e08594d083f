"""Segment your own query images from a few annotated support images (`svfseg predict`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from svfseg.results import pct

logger = logging.getLogger(__name__)


class PredictInputError(ValueError):
    """An input image or mask cannot be used; the message names the file."""


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), read as training reads it (:func:`svfseg.data.io.read_image`:
    EXIF orientation applied, 16-bit/greyscale/palette converted); errors name the file."""
    from svfseg.data.io import DataError, read_image

    path = Path(path)
    if not path.is_file():
        raise PredictInputError(f"{path}: no such image file")
    try:
        return read_image(path)
    except DataError as e:
        why = str(e).removeprefix(f"{path}: ")
        raise PredictInputError(f"{path}: cannot read it as an image ({why})") from None


def read_binary_mask(path: str | os.PathLike, expect_hw: Optional[tuple[int, int]] = None, *,
                     mask_class: Optional[int] = None, threshold: Optional[int] = None) -> np.ndarray:
    """A support mask as uint8 {0, 1}.

    Accepted without options: values 0/1, 0/255, or 0/1/255 (1 the object, 255 an ignored
    border), as greyscale, palette or RGB, and a 16-bit 0/65535 mask (values as stored). Any other value (a class-index PNG, an anti-aliased
    edge) is refused, since guessing which pixels are the object could silently pick a border;
    ``mask_class=C`` takes the pixels equal to C instead; ``threshold=T`` the pixels >= T (a
    drawn, anti-aliased 0..255 mask: T = 128).

    Args:
        path: mask file.
        expect_hw: the support image's (H, W); the mask must have the same size.
        mask_class: the value of the object's pixels in a multi-valued mask.
        threshold: foreground is ``value >= threshold`` (for greyscale masks with soft edges).

    Raises:
        PredictInputError: unreadable, other values, wrong size, or no foreground pixel.
    """
    return binary_mask(read_mask_array(path), str(path), expect_hw, mask_class=mask_class, threshold=threshold)


def read_mask_array(path: str | os.PathLike) -> np.ndarray:
    """A mask file's values as int64 (H, W), read by :func:`svfseg.data.io.read_mask` (palette and greyscale
    as stored, colour as luminance, never rotated; a truncated file refused); errors name the file."""
    from svfseg.data.io import DataError, read_mask

    path = Path(path)
    if not path.is_file():
        raise PredictInputError(f"{path}: no such mask file")
    try:
        return read_mask(path)
    except DataError as e:
        why = str(e).removeprefix(f"{path}: ")
        raise PredictInputError(f"{path}: cannot read it as a mask image ({why})") from None


def binary_mask(arr: np.ndarray, where: str, expect_hw: Optional[tuple[int, int]] = None, *,
                allow_empty: bool = False, mask_class: Optional[int] = None,
                threshold: Optional[int] = None) -> np.ndarray:
    """A mask array (greyscale or channels) as uint8 {0, 1}, checked (the values as :func:`read_binary_mask`).

    Args:
        arr: (H, W) or (H, W, C) integer array.
        where: what to name in errors (a file path, "support 2").
        expect_hw: the image's (H, W); the mask must have the same size.
        allow_empty: accept a mask without foreground (a ground truth may show no object).
        mask_class: the value of the object's pixels in a multi-valued mask.
        threshold: foreground is ``value >= threshold``.

    Raises:
        PredictInputError: other values, wrong size, or no foreground pixel unless ``allow_empty``.
    """
    arr = np.asarray(arr).astype(np.int64)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    values = set(np.unique(arr).tolist())
    if mask_class is not None and threshold is not None:
        raise PredictInputError(f"{where}: give mask_class or threshold, not both")
    if threshold is not None:
        fg = arr >= threshold
    elif mask_class is not None:
        fg = arr == mask_class
        if not fg.any():
            raise PredictInputError(f"{where}: expected pixels of --mask-class {mask_class}, found only values "
                                    f"{sorted(values)[:12]}")
    elif values <= {0, 1} or values <= {0, 1, 255} or values <= {0, 65535}:
        fg = arr == 1
        for full in (255, 65535):  # a 0/255 mask, or a 16-bit one (read as stored, not scaled to 8 bits)
            if not fg.any() and full in values:
                fg = arr == full
    else:
        raise PredictInputError(f"{where}: expected a binary mask (values 0/1, 0/255, 0/1/255 or 16-bit 0/65535), "
                                f"found values "
                                f"{sorted(values)[:12]}; for a class-index PNG pick the object with --mask-class C")
    if expect_hw is not None and tuple(fg.shape) != tuple(expect_hw):
        from svfseg.data.io import wxh

        raise PredictInputError(f"{where}: mask is {wxh(fg.shape)} but its support image is {wxh(expect_hw)} "
                                f"(width x height)")
    if not allow_empty and not fg.any():
        raise PredictInputError(f"{where}: the support mask has no foreground pixel (expected 1 or 255 where "
                                f"the object is)")
    return fg.astype(np.uint8)


MIN_SIZE = 32
#: Largest --size: the model's input is size x size, its activations grow with the square.
MAX_SIZE = 4096


def output_names(queries: Sequence[str | os.PathLike]) -> list[str]:
    """One output stem per query, unique: a repeated file stem gets its folder names in front.

    ``a/q.jpg`` and ``b/q.jpg`` become ``a_q`` and ``b_q``; a unique stem stays as it is.
    """
    paths = [Path(q) for q in queries]
    stems = [p.stem for p in paths]
    names = []
    for i, p in enumerate(paths):
        name = p.stem
        depth = 1
        while stems.count(p.stem) > 1 and depth <= len(p.parent.parts):
            name = "_".join([*p.parent.parts[-depth:], p.stem]).replace(os.sep, "_").lstrip("_") or p.stem
            others = ["_".join([*o.parent.parts[-depth:], o.stem]).lstrip("_")
                      for j, o in enumerate(paths) if j != i and o.stem == p.stem]
            if name not in others:
                break
            depth += 1
        names.append(name)
    for i, n in enumerate(names):  # the same path given twice, or parents that never differ
        if names.count(n) > 1:
            names[i] = f"{n}_{names[:i].count(n) + 1}" if names[:i].count(n) else n
    return names


def _prepare(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    from svfseg.data.transforms import TestTransform

    img, lbl, valid = TestTransform(size=size)(image, mask)
    return torch.from_numpy(np.asarray(img)), torch.from_numpy(np.asarray(lbl)).long(), valid


def support_tensors(sup_rgb: Sequence[np.ndarray], sup_mask: Sequence[np.ndarray], size: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """K support images and masks as the model's (1, K, 3, S, S) and (1, K, S, S) inputs."""
    prepared = [_prepare(r, m, size) for r, m in zip(sup_rgb, sup_mask)]
    s_img = torch.stack([p[0] for p in prepared])[None].to(device)
    s_mask = torch.stack([p[1] for p in prepared])[None].to(device)
    return s_img, s_mask


def segment_query(model: torch.nn.Module, rgb: np.ndarray, s_img: torch.Tensor, s_mask: torch.Tensor, size: int,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """One query's binary prediction at its own size, (H, W) int64 in {0, 1}; call under no_grad."""
    from svfseg.engine.evaluator import predictions_at_original_size

    q_img, _, valid = _prepare(rgb, np.zeros(rgb.shape[:2], np.uint8), size)
    logits = model(q_img[None].to(device), s_img, s_mask)
    return predictions_at_original_size(logits, torch.tensor([valid]), [rgb.shape[:2]])[0].cpu().numpy()


def save_mask_png(pred: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a {0, 1} prediction as the 0/255 greyscale PNG that ``predict`` writes."""
    Image.fromarray((pred * 255).astype(np.uint8), mode="L").save(path)
    return Path(path)


@torch.no_grad()
def predict(
    checkpoint: str | os.PathLike,
    supports: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    queries: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    size: Optional[int] = None,
    device: str = "cpu",
    overwrite: bool = False,
    mask_class: Optional[int] = None,
    mask_threshold: Optional[int] = None,
    adapt: Optional[str] = None,
    adapt_steps: Optional[int] = None,
    adapt_lr: Optional[float] = None,
    progress: bool = False,
) -> list[dict]:
    """Segment each query with the object the support masks show.

    Args:
        checkpoint: a training checkpoint or a merged export (``svfseg merge``).
        supports: (image, mask) paths; their number is the shot K.
        queries: query image paths.
        out_dir: where ``<query>_mask.png`` (0/255) and ``<query>_overlay.png`` go (queries
            sharing a file stem get their folder names in front, see :func:`output_names`).
        size: test size (longer side, >= 32); default the checkpoint config's ``data.test_size``.
        device: torch device.
        overwrite: replace output files that exist (otherwise they are an error, before any work).
        mask_class: the object's value in multi-valued support masks (see :func:`read_binary_mask`).
        mask_threshold: foreground is ``value >= mask_threshold`` in greyscale support masks.
        adapt: ``adapt.params`` to fine-tune on the supports once before the queries (None / "none": no
            adaptation); steps and lr are ``adapt_steps``/``adapt_lr``, or chosen on the checkpoint's base-class
            validation episodes when not given (its ``data.root`` must then exist).
        adapt_steps: adaptation steps.
        adapt_lr: adaptation learning rate.
        progress: a progress bar over the adaptation's steps.

    Returns:
        One dict per query: ``query``, ``mask``, ``overlay`` paths, ``foreground_fraction``,
        ``renamed`` (True when the name was made unique) and ``adapted`` (what adapted and how long it
        took; None without adaptation).
    """
    from svfseg.engine.model import load_for_inference
    from svfseg.engine.vis import episode_panel

    if not supports:
        raise PredictInputError("predict: at least one --support IMAGE MASK pair is needed")
    if not queries:
        raise PredictInputError("predict: at least one --query image is needed")
    if size is not None and size < MIN_SIZE:
        raise PredictInputError(f"predict: expected --size >= {MIN_SIZE} (the longer side in pixels), found {size}")
    if size is not None and size > MAX_SIZE:
        raise PredictInputError(f"predict: expected --size <= {MAX_SIZE} (the longer side in pixels; the model's "
                                f"memory grows with its square), found {size}")
    from svfseg.engine.distributed import resolve_device

    try:
        device = str(resolve_device(device))
    except ValueError as e:
        raise PredictInputError(f"predict: --device {device}: {e}") from None
    out_dir = Path(out_dir)
    names = output_names(queries)
    outputs = [(out_dir / f"{n}_mask.png", out_dir / f"{n}_overlay.png") for n in names]
    existing = [str(f) for pair in outputs for f in pair if f.exists()]
    if existing and not overwrite:
        raise PredictInputError(f"{existing[0]}: output file exists ({len(existing)} in all); choose another --out "
                                f"or pass --overwrite")
    # Read every input first, so a bad file fails before the model is loaded.
    sup_rgb, sup_mask = [], []
    for img_path, mask_path in supports:
        rgb = read_rgb(img_path)
        sup_rgb.append(rgb)
        sup_mask.append(read_binary_mask(mask_path, rgb.shape[:2], mask_class=mask_class, threshold=mask_threshold))
    q_rgb = [read_rgb(q) for q in queries]
    model, cfg, _ = load_for_inference(checkpoint, device=device)
    size = size or cfg.data.test_size
    s_img, s_mask = support_tensors(sup_rgb, sup_mask, size, device)
    adapted = _adapt(model, cfg, s_img, s_mask, adapt, adapt_steps, adapt_lr, progress)
    net = adapted.adapter.model if adapted is not None else model
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path, rgb, name, (mask_path, overlay_path) in zip(queries, q_rgb, names, outputs):
        pred = segment_query(net, rgb, s_img, s_mask, size, device)
        save_mask_png(pred, mask_path)
        Image.fromarray(episode_panel(sup_rgb, sup_mask, rgb, pred.astype(np.uint8))).save(overlay_path)
        results.append({"query": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "foreground_fraction": float(pred.mean()), "renamed": name != Path(path).stem,
                        "adapted": adapted.record() if adapted is not None else None})
        logger.info("%s -> %s (%s foreground)", path, mask_path, pct(float(pred.mean()), digits=1, unit="%"))
    return results


def _adapt(model, cfg, s_img: torch.Tensor, s_mask: torch.Tensor, params: Optional[str], steps: Optional[int],
           lr: Optional[float], progress: bool):
    """The model adapted to the supports once (``svfseg.engine.adapt.run.adapt_to_supports``), or None."""
    from svfseg.regimes import adapt_trains

    try:
        if params is None or not adapt_trains(params):
            return None
    except ValueError as e:
        raise PredictInputError(f"predict: --adapt: {e}") from None
    from svfseg.engine.adapt.run import adapt_to_supports

    try:
        adapted = adapt_to_supports(model, cfg, s_img[0], s_mask[0], params=params, steps=steps, lr=lr,
                                    progress=progress)
    except FileNotFoundError as e:
        raise PredictInputError(f"predict: --adapt {params}: its steps and lr are chosen on the checkpoint's "
                                f"base-class validation episodes, but {e}; or give --adapt-steps N and --adapt-lr LR"
                                ) from None
    r = adapted.record()
    logger.info("adapted %s (%d values) on the %d support(s): %s in %.1f s", r["params"], r["trainable"],
                s_img.shape[1], "no adaptation (chosen on validation)" if not r["steps"] else
                f"{r['steps']} steps at lr {r['lr']:g} ({r['source']})", r["seconds"])
    return adapted
