"""What `svfseg serve` does, as plain functions: read uploads, segment with cached models, write results."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from svfseg.predict import (PredictInputError, binary_mask, read_binary_mask, read_mask_array, read_rgb,
                            save_mask_png, segment_query, support_tensors)

logger = logging.getLogger(__name__)

MAX_SHOTS = 5
GT_SUFFIXES = ("_mask", "_gt", "_label")  # "cat.png" is the ground truth of query "cat.jpg", so is "cat_mask.png"
RED = (230, 40, 40)


class ServeError(ValueError):
    """A problem the page shows the user instead of a result (bad upload, checkpoint that does not load)."""


@dataclass
class SupportSlot:
    """One support as the page sends it: an image file and either a mask file or painted strokes."""

    image: Optional[str] = None
    mask: Optional[str] = None
    painted: Optional[np.ndarray] = None  # (H, W) bool, from the image editor's layers

    @property
    def used(self) -> bool:
        return bool(self.image) or bool(self.mask) or self.painted is not None


@dataclass
class LoadedModel:
    """A checkpoint's merged model, kept for the server's lifetime."""

    model: torch.nn.Module
    cfg: Any
    load_seconds: float


class ModelCache:
    """Loads each checkpoint once (merged weights, eval mode) and serialises inference on it.

    Args:
        device: torch device of every model.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.loads = 0
        self._models: dict[str, LoadedModel] = {}
        # One lock for loading and inference: the Gradio queue already runs one request at a
        # time, this keeps callers outside the queue (tests, scripts) from sharing a model concurrently.
        self.lock = threading.RLock()

    def get(self, checkpoint: str | os.PathLike) -> tuple[LoadedModel, bool]:
        """The loaded model of ``checkpoint`` and whether this call loaded it.

        Raises:
            ServeError: the file is missing or is not a loadable svfseg checkpoint (not cached, so
                a fixed file loads on the next request).
        """
        key = str(Path(checkpoint).resolve())
        with self.lock:
            if key in self._models:
                return self._models[key], False
            t0 = time.perf_counter()
            try:
                from svfseg.engine.model import load_for_inference
                from svfseg.models import export_merged

                model, cfg, _ = load_for_inference(checkpoint, device=self.device)
                # Merged: plain conv weights, so inference costs what a frozen-backbone model costs.
                model = export_merged(model, inplace=True) if hasattr(model, "regime") else model
            except Exception as e:  # noqa: BLE001 - any failure here means "this checkpoint does not load"
                logger.warning("checkpoint %s does not load: %s", checkpoint, e)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch's reasons run to paragraphs
                raise ServeError(f"checkpoint {checkpoint} does not load: {first}") from None
            self.loads += 1
            loaded = LoadedModel(model, cfg, time.perf_counter() - t0)
            self._models[key] = loaded
            return loaded, True


def painted_mask(editor_value: Optional[dict]) -> Optional[np.ndarray]:
    """Strokes of an image-editor value (``{"background", "layers", "composite"}``, RGBA arrays) as an
    (H, W) bool mask: a pixel is foreground where any layer is not transparent. None when nothing is painted."""
    layers = (editor_value or {}).get("layers") or []
    alphas = [np.asarray(layer)[..., 3] > 0 for layer in layers
              if layer is not None and np.asarray(layer).ndim == 3 and np.asarray(layer).shape[2] == 4]
    if not alphas:
        return None
    fg = np.logical_or.reduce(alphas)
    return fg if fg.any() else None


def _shown(e: Exception, path: str, label: str) -> ServeError:
    # Uploads live under hashed temp folders; the page names the file as the user knows it.
    return ServeError(str(e).replace(str(path), f"{label} ({Path(path).name})"))


def _read_image(path: str, label: str) -> np.ndarray:
    try:
        return read_rgb(path)
    except PredictInputError as e:
        raise _shown(e, path, label) from None
    except Image.DecompressionBombError as e:
        raise ServeError(f"{label} ({Path(path).name}): too many pixels ({e})") from None


def read_supports(slots: Sequence[SupportSlot]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The used support slots as RGB images and {0, 1} masks (an uploaded mask wins over strokes).

    Raises:
        ServeError: no support, more than :data:`MAX_SHOTS`, a mask without image, an image
            without mask, an unreadable file, a mask of another size, an empty mask.
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
        rgb = _read_image(slot.image, f"support {i} image")
        if slot.mask:
            try:
                mask = read_binary_mask(slot.mask, rgb.shape[:2])
            except PredictInputError as e:
                raise _shown(e, slot.mask, f"support {i} mask") from None
        elif slot.painted is not None:
            painted = np.asarray(slot.painted, dtype=bool)
            if painted.shape != rgb.shape[:2]:
                # The editor may hand back its canvas at another scale than the file: strokes are approximate anyway.
                painted = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize(
                    (rgb.shape[1], rgb.shape[0]), Image.NEAREST)) >= 128
            mask = binary_mask(painted.astype(np.uint8), f"support {i} painted mask")
        else:
            raise ServeError(f"support {i}: no mask; upload its mask or paint the object on the image")
        rgbs.append(rgb)
        masks.append(mask)
    return rgbs, masks


def read_queries(paths: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(name, RGB) per query file; names are file stems, made unique so output files do not collide."""
    if not paths:
        raise ServeError("no query: upload one or more images to segment")
    out, seen = [], set()
    for p in paths:
        stem = Path(p).stem
        name, n = stem, 2
        while name in seen:
            name, n = f"{stem}_{n}", n + 1
        seen.add(name)
        out.append((name, _read_image(p, "query")))
    return out


def _gt_key(path: str) -> str:
    stem = Path(path).stem
    for suffix in GT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_ground_truth(gt_paths: Sequence[str], queries: Sequence[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Ground-truth {0, 1} masks by query name, matched by file name (``q.png`` or ``q_mask.png`` for
    query ``q.jpg``); a single query and a single mask pair up whatever their names.

    Raises:
        ServeError: a mask matching no query, unreadable, or of another size than its query.
    """
    if not gt_paths:
        return {}
    shapes = {name: rgb.shape[:2] for name, rgb in queries}
    pairs = []
    for p in gt_paths:
        key = _gt_key(p)
        if key not in shapes and len(gt_paths) == 1 and len(queries) == 1:
            key = queries[0][0]
        if key not in shapes:
            raise ServeError(f"ground truth {Path(p).name}: no query named {key!r} (name it like its query: "
                             f"one of {', '.join(sorted(shapes))}, optionally with _mask)")
        pairs.append((key, p))
    out = {}
    for key, p in pairs:
        label = f"ground truth of {key}"
        try:
            arr = read_mask_array(p)
        except PredictInputError as e:
            raise _shown(e, p, label) from None
        if tuple(arr.shape[:2]) != tuple(shapes[key]):
            raise ServeError(f"{label} ({Path(p).name}): mask is {arr.shape[0]}x{arr.shape[1]} but the query is "
                             f"{shapes[key][0]}x{shapes[key][1]}")
        out[key] = binary_mask(arr, label, allow_empty=True)
    return out


def foreground_iou(pred: np.ndarray, gt: np.ndarray) -> Optional[float]:
    """IoU of the foreground; None when both are empty (undefined)."""
    from svfseg.metrics import episode_counts

    inter, union = (int(v) for v in episode_counts(torch.from_numpy(pred.astype(np.int64)),
                                                   torch.from_numpy(gt.astype(np.int64)))[:2])
    return inter / union if union else None


@dataclass
class QueryResult:
    """One query's outputs with one checkpoint."""

    name: str
    mask: Path
    overlay: Path
    foreground_fraction: float
    iou: Optional[float] = None


@dataclass
class CheckpointRun:
    """Every query segmented by one checkpoint."""

    checkpoint: str
    label: str
    results: list[QueryResult]
    seconds: float
    load_seconds: float = 0.0  # > 0 only when this request loaded the model


@dataclass
class Request:
    """A whole request: one run per checkpoint and the zip of all outputs."""

    runs: list[CheckpointRun]
    zip_path: Path
    shots: int
    notes: list[str] = field(default_factory=list)


def checkpoint_label(path: str | os.PathLike) -> str:
    """A short folder-safe name for a checkpoint: ``runs/demo/svf/best.pt`` -> ``svf-best``."""
    p = Path(path)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{p.parent.name}-{p.stem}" if p.parent.name else p.stem).strip("-")


def segment_with(cache: ModelCache, checkpoint: str, sup_rgb: Sequence[np.ndarray], sup_mask: Sequence[np.ndarray],
                 queries: Sequence[tuple[str, np.ndarray]], gts: dict[str, np.ndarray], out_dir: Path,
                 *, size: Optional[int] = None) -> CheckpointRun:
    """Segment every query with one checkpoint; writes ``<name>_mask.png`` (what ``svfseg predict`` writes)
    and ``<name>_overlay.png`` into ``out_dir``."""
    from svfseg.engine.vis import overlay

    loaded, fresh = cache.get(checkpoint)
    size = size or loaded.cfg.data.test_size
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with cache.lock, torch.inference_mode():
        t0 = time.perf_counter()
        s_img, s_mask = support_tensors(sup_rgb, sup_mask, size, cache.device)
        preds = [segment_query(loaded.model, rgb, s_img, s_mask, size, cache.device) for _, rgb in queries]
        seconds = time.perf_counter() - t0
    for (name, rgb), pred in zip(queries, preds):
        mask_path = save_mask_png(pred, out_dir / f"{name}_mask.png")
        overlay_path = out_dir / f"{name}_overlay.png"
        Image.fromarray(overlay(rgb, pred.astype(np.uint8), RED)).save(overlay_path)
        iou = foreground_iou(pred, gts[name]) if name in gts else None
        results.append(QueryResult(name, mask_path, overlay_path, float(pred.mean()), iou))
    return CheckpointRun(str(checkpoint), checkpoint_label(checkpoint), results, seconds,
                         loaded.load_seconds if fresh else 0.0)


def run_request(cache: ModelCache, checkpoints: Sequence[str], slots: Sequence[SupportSlot], query_paths: Sequence[str],
                gt_paths: Sequence[str], out_dir: str | os.PathLike, *, size: Optional[int] = None) -> Request:
    """Everything the page's Run button does, without the page.

    Args:
        cache: the server's models.
        checkpoints: one checkpoint, or two to compare on the same inputs.
        slots: the support slots (unused ones are skipped).
        query_paths: query image files.
        gt_paths: optional ground-truth masks, matched to queries by name.
        out_dir: a fresh folder for this request's outputs.
        size: test size (default: each checkpoint's ``data.test_size``).

    Returns:
        The runs, in the order of ``checkpoints``, and the zip of every output file.

    Raises:
        ServeError: anything the user can fix; the message names the input.
    """
    if not checkpoints:
        raise ServeError("no checkpoint selected")
    sup_rgb, sup_mask = read_supports(slots)
    queries = read_queries(query_paths)
    gts = read_ground_truth(gt_paths, queries)
    out_dir = Path(out_dir)
    runs, folders = [], set()
    for ck in checkpoints:
        label = checkpoint_label(ck)
        folder, n = label, 2
        while folder in folders:
            folder, n = f"{label}_{n}", n + 1
        folders.add(folder)
        runs.append(segment_with(cache, ck, sup_rgb, sup_mask, queries, gts, out_dir / folder, size=size))
    zip_path = out_dir / "svfseg_results.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in out_dir.rglob("*.png")):
            zf.write(f, f.relative_to(out_dir).as_posix())
    notes = [f"{len(gts)} of {len(queries)} queries have a ground truth"] if gts else []
    return Request(runs, zip_path, len(sup_rgb), notes)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def summary_markdown(req: Request) -> str:
    """The result table the page shows: per query and checkpoint, foreground fraction and IoU; then timings."""
    lines = ["| query | checkpoint | foreground | IoU |", "| --- | --- | --- | --- |"]
    for run in req.runs:
        for r in run.results:
            lines.append(f"| {r.name} | {run.label} | {_pct(r.foreground_fraction)} | {_pct(r.iou)} |")
    timing = "; ".join(f"{run.label}: {run.seconds:.2f} s for {len(run.results)} "
                       f"quer{'y' if len(run.results) == 1 else 'ies'}"
                       + (f" (+ {run.load_seconds:.1f} s loading the model)" if run.load_seconds else "")
                       for run in req.runs)
    return "\n".join(lines) + f"\n\n{req.shots}-shot. Time: {timing}." + "".join(f" {n}." for n in req.notes)
