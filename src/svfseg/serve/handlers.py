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

from svfseg.data.io import wxh
from svfseg.predict import save_mask_png, segment_query, support_tensors
from svfseg.results import markdown_table, pct
from svfseg.serve.inputs import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERIES, MAX_SHOTS, AdaptRequest, QueryFile, ServeError,
                                 SupportSlot, check_queries, ground_truth_class, read_ground_truth, read_rgb_upload,
                                 read_supports, unpack_mask)
from svfseg.serve.previews import fit_within
from svfseg.serve.sources import CheckpointRecord, checkpoint_record

logger = logging.getLogger(__name__)

RED = (230, 40, 40)
OVERLAY_SIDE = 1024  # overlays are for looking at: writing a 12 MP one as PNG took seconds (masks keep full size)
__all__ = ["MAX_SHOTS", "ServeError", "SupportSlot", "read_supports", "ModelCache", "painted_mask", "run_request",
           "summary_markdown", "foreground_iou", "checkpoint_label", "Request", "CheckpointRun", "QueryResult",
           "AdaptRequest", "DEFAULT_ADAPT_STEPS", "DEFAULT_ADAPT_LR"]

#: Adaptation settings used when neither the page nor the checkpoint's record gives them (not chosen on validation).
DEFAULT_ADAPT_STEPS, DEFAULT_ADAPT_LR = 10, 1e-3


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
        self._records: dict[str, CheckpointRecord] = {}
        self._adapters: dict[tuple[str, str], Any] = {}
        # One lock for loading and inference: the Gradio queue already runs one request at a
        # time, this keeps callers outside the queue (tests, scripts) from sharing a model concurrently.
        self.lock = threading.RLock()

    def record(self, checkpoint: str | os.PathLike) -> CheckpointRecord:
        """What the page says about ``checkpoint`` (training data, recorded test score), read once."""
        key = str(Path(checkpoint).resolve())
        with self.lock:
            if key not in self._records:
                self._records[key] = checkpoint_record(checkpoint)
            return self._records[key]

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


    def adapter(self, checkpoint: str | os.PathLike, params: str):
        """The :class:`~svfseg.engine.adapt.EpisodeAdapter` of ``checkpoint`` for ``params``, prepared once (its own
        copy of the model: an SVD of the stages for ``svf``, since the served model is merged)."""
        key = (str(Path(checkpoint).resolve()), params)
        with self.lock:
            if key not in self._adapters:
                from svfseg.engine.adapt import EpisodeAdapter
                from svfseg.policies import AdaptSettings

                loaded, _ = self.get(checkpoint)
                cfg = loaded.cfg
                self._adapters[key] = EpisodeAdapter(loaded.model, AdaptSettings(params=params),
                                                     policy=cfg.svf, lora=cfg.lora)
            return self._adapters[key]


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
    hw: tuple[int, int] = (0, 0)  # the query's (height, width); shown as width x height
    adapted: Optional["QueryResult"] = None  # the same query after adapting to the supports, when asked


@dataclass
class CheckpointRun:
    """Every query segmented by one checkpoint."""

    checkpoint: str
    label: str
    results: list[QueryResult]
    seconds: float
    load_seconds: float = 0.0  # > 0 only when this request loaded the model
    record: Optional[CheckpointRecord] = None
    adaptation: Optional[dict] = None  # params, values, steps, lr, where they came from, seconds

    @property
    def no_object(self) -> list[str]:
        """The queries in which this checkpoint predicted no foreground pixel."""
        return [r.name for r in self.results if r.foreground_fraction == 0]


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


def _overlay_png(rgb: np.ndarray, pred: np.ndarray, path: Path) -> Path:
    from svfseg.engine.vis import overlay

    rgb, pred = fit_within(rgb, pred.astype(np.uint8), OVERLAY_SIDE)
    Image.fromarray(overlay(rgb, pred, RED)).save(path)
    return path


@dataclass
class _Model:
    """One checkpoint of a request: its model, run record, output folder and support tensors at its size."""

    loaded: LoadedModel
    run: CheckpointRun
    folder: Path
    size: int
    supports: tuple
    adapted: Optional[torch.nn.Module] = None  # the model adapted to this request's supports


def _prepare_models(cache: ModelCache, checkpoints: Sequence[str], sup_rgb, sup_mask, out_dir: Path,
                    size: Optional[int]) -> list[_Model]:
    models, folders = [], set()
    for ck in checkpoints:
        loaded, fresh = cache.get(ck)
        label = checkpoint_label(ck)
        folder, n = label, 2
        while folder in folders:
            folder, n = f"{label}_{n}", n + 1
        folders.add(folder)
        own_size = size or loaded.cfg.data.test_size
        with cache.lock, torch.inference_mode():
            supports = support_tensors(sup_rgb, sup_mask, own_size, cache.device)
        run = CheckpointRun(str(ck), label, [], 0.0, loaded.load_seconds if fresh else 0.0, cache.record(ck))
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        models.append(_Model(loaded, run, out_dir / folder, own_size, supports))
    return models


def _adapt(cache: ModelCache, m: _Model, adapt: AdaptRequest) -> None:
    """Fine-tune a copy of ``m``'s model on the request's supports (once; every query uses it)."""
    from svfseg.engine.adapt.score import episode_generator

    recorded = (m.run.record.adapt_choices.get(adapt.params) if m.run.record else None) or {}
    if adapt.steps is not None or adapt.lr is not None:
        steps, lr, source = (adapt.steps if adapt.steps is not None else DEFAULT_ADAPT_STEPS,
                             adapt.lr if adapt.lr is not None else DEFAULT_ADAPT_LR, "given on the page")
    elif recorded:
        steps, lr, source = recorded["steps"], recorded["lr"], recorded.get("source", "the checkpoint's record")
    else:
        steps, lr, source = DEFAULT_ADAPT_STEPS, DEFAULT_ADAPT_LR, "the defaults (not chosen on validation)"
    adapter = cache.adapter(m.run.checkpoint, adapt.params)
    with cache.lock:
        s_img, s_mask = (t[0].clone() for t in m.supports)  # tensors made outside inference mode: autograd takes them
        t0 = time.perf_counter()
        adapter.reset()
        adapter.adapt(s_img, s_mask, None, steps=int(steps), lr=float(lr or 0.0), generator=episode_generator(0, 0))
        seconds = time.perf_counter() - t0
    m.adapted = adapter.model
    m.run.adaptation = {"params": adapt.params, "trainable": adapter.trainable_count, "steps": int(steps), "lr": lr,
                        "source": source, "seconds": seconds}


def _segment(cache: ModelCache, m: _Model, model: torch.nn.Module, query: QueryFile, rgb: np.ndarray,
             gt: Optional[np.ndarray], suffix: str) -> QueryResult:
    with cache.lock, torch.inference_mode():
        t0 = time.perf_counter()
        pred = segment_query(model, rgb, *m.supports, m.size, cache.device)
        m.run.seconds += time.perf_counter() - t0
    mask_path = save_mask_png(pred, m.folder / f"{query.name}{suffix}_mask.png")
    overlay_path = _overlay_png(rgb, pred, m.folder / f"{query.name}{suffix}_overlay.png")
    iou = foreground_iou(pred, gt) if gt is not None else None
    return QueryResult(query.name, mask_path, overlay_path, float(pred.mean()), iou, rgb.shape[:2])


def _segment_one(cache: ModelCache, m: _Model, query: QueryFile, rgb: np.ndarray, gt: Optional[np.ndarray]) -> None:
    """Segment one query with one checkpoint; writes ``<name>_mask.png`` (what ``svfseg predict`` writes)
    and ``<name>_overlay.png`` (at most :data:`OVERLAY_SIDE` px) into the checkpoint's folder, and with the
    adapted model too when the request adapts (``<name>_adapted_mask.png``, ``<name>_adapted_overlay.png``)."""
    result = _segment(cache, m, m.loaded.model, query, rgb, gt, "")
    if m.adapted is not None:
        result.adapted = _segment(cache, m, m.adapted, query, rgb, gt, "_adapted")
    m.run.results.append(result)


def run_request(cache: ModelCache, checkpoints: Sequence[str], slots: Sequence[SupportSlot], query_paths: Sequence[str],
                gt_paths: Sequence[str], out_dir: str | os.PathLike, *, size: Optional[int] = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, max_queries: int = DEFAULT_MAX_QUERIES,
                adapt: Optional[AdaptRequest] = None) -> Request:
    """Everything the page's Run button does, without the page.

    Every input is checked before the first model runs (queries from their headers); the queries
    are then decoded one at a time, so a request holds one query image whatever their number.

    Args:
        cache: the server's models.
        checkpoints: one checkpoint, or two to compare on the same inputs.
        slots: the support slots (unused ones are skipped).
        query_paths: query image files.
        gt_paths: optional ground-truth masks, paired with queries by name.
        out_dir: a fresh folder for this request's outputs.
        size: test size (default: each checkpoint's ``data.test_size``).
        max_pixels: largest image accepted (width x height), checked from the file's header.
        max_queries: most queries in one request.
        adapt: also segment every query after fine-tuning a copy of each model on these supports.

    Returns:
        The runs, in the order of ``checkpoints``, and the zip of every output file.

    Raises:
        ServeError: anything the user can fix; the message names the input.
    """
    if not checkpoints:
        raise ServeError("no checkpoint selected")
    if len(set(checkpoints)) < len(checkpoints):
        raise ServeError("the same checkpoint picked twice; pick another one to compare with (or none)")
    queries = check_queries(query_paths, max_pixels=max_pixels, max_queries=max_queries)
    sup_rgb, sup_mask = read_supports(slots, max_pixels=max_pixels)
    gts = read_ground_truth(gt_paths, queries, max_pixels=max_pixels, mask_class=ground_truth_class(slots))
    out_dir = Path(out_dir)
    models = _prepare_models(cache, checkpoints, sup_rgb, sup_mask, out_dir, size)
    for m in models if adapt is not None else ():
        _adapt(cache, m, adapt)
    for q in queries:
        rgb = read_rgb_upload(q.path, "query", max_pixels)
        gt = unpack_mask(gts[q.name], rgb.shape[:2]) if q.name in gts else None
        for m in models:
            _segment_one(cache, m, q, rgb, gt)
        del rgb, gt  # one decoded query at a time
    zip_path = out_dir / "svfseg_results.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in out_dir.rglob("*.png")):
            zf.write(f, f.relative_to(out_dir).as_posix())
    notes = [f"{len(gts)} of {len(queries)} queries have a ground truth"] if gts else []
    notes += [f"support {i} used its uploaded mask {Path(s.mask).name}, not the painted strokes"
              for i, s in enumerate(slots, 1) if s.mask and s.painted is not None]
    return Request([m.run for m in models], zip_path, len(sup_rgb), notes)


def no_object_notices(req: Request) -> list[str]:
    """One line per checkpoint that found no object in some query, with its recorded test score."""
    out = []
    for run in req.runs:
        if run.no_object:
            which = ("any query" if len(run.no_object) == len(run.results) and len(run.results) > 1
                     else ", ".join(run.no_object))
            reason = run.record.no_object_reason() if run.record else "this checkpoint has no recorded test score"
            out.append(f"**{run.label}: the model found no object** in {which}; {reason}.")
    return out


def _adapted_cells(r: QueryResult) -> list[str]:
    a = r.adapted
    return [pct(a.foreground_fraction, missing="n/a", digits=1, unit="%"), pct(a.iou, missing="n/a", digits=1, unit="%")]


def adaptation_sentence(run: CheckpointRun) -> str:
    """``svf-best adapted svf (11,880 values) to the supports: 10 steps at lr 0.01 (source) in 0.6 s``."""
    a = run.adaptation
    return (f"{run.label} adapted {a['params']} ({a['trainable']:,} values) to the supports: {a['steps']} steps at "
            f"lr {a['lr']:g} ({a['source']}) in {a['seconds']:.1f} s")


def summary_markdown(req: Request) -> str:
    """The result table the page shows: per query and checkpoint, its size (width x height), foreground fraction and
    IoU (and both again after adapting to the supports, when asked); then timings and notes."""
    adapted = any(run.adaptation for run in req.runs)
    head = ["query", "size", "checkpoint", "foreground", "IoU"] + (["adapted: foreground", "adapted: IoU"]
                                                                  if adapted else [])
    table = markdown_table(head, [[r.name, wxh(r.hw), run.label,
                                   pct(r.foreground_fraction, missing="n/a", digits=1, unit="%"),
                                   pct(r.iou, missing="n/a", digits=1, unit="%")]
                                  + (_adapted_cells(r) if r.adapted is not None else [""] * (len(head) - 5))
                                  for run in req.runs for r in run.results])
    timing = "; ".join(f"{run.label}: {run.seconds:.2f} s for {len(run.results)} "
                       f"quer{'y' if len(run.results) == 1 else 'ies'}"
                       + (f" (+ {run.load_seconds:.1f} s loading the model)" if run.load_seconds else "")
                       for run in req.runs)
    notices = "".join(f"{n}\n\n" for n in no_object_notices(req))
    adapting = "".join(f" {adaptation_sentence(run)}." for run in req.runs if run.adaptation)
    return (notices + table + f"\n\n{req.shots}-shot. Time: {timing}." + adapting
            + "".join(f" {n}." for n in req.notes))
