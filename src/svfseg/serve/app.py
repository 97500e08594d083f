"""The Gradio page of `svfseg serve`: inputs, the Run button, results; all work is done in handlers."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr

from svfseg.results import markdown_table, pct
from svfseg.serve.examples import Example
from svfseg.serve.handlers import (MAX_SHOTS, ModelCache, Request, ServeError, SupportSlot, checkpoint_label,
                                   painted_mask, run_request, summary_markdown)
from svfseg.serve.inputs import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERIES, brush_radius, editor_background,
                                 mask_class_choices)
from svfseg.serve.sources import CheckpointRecord

logger = logging.getLogger(__name__)

NO_COMPARE = "(none)"
KEEP_REQUESTS = 16  # result folders kept on disk; older ones are deleted (the page only shows the latest)
CANVAS_SIDE = 1024  # the painting canvas shows the support at most this large; strokes are scaled back
BRUSH_COLOUR = ("#ff3030", 0.5)  # translucent: the object stays visible under the strokes
PER_SLOT = 4  # image, mask, class picker, editor
INTRO = """## svfseg: segment your own images from annotated examples
Give 1 to {k} **supports** (an image and its mask: upload a 0/255 or 0/1 PNG, a class-index PNG and pick the class,
or paint the object on the image), then up to {q} **queries**; the model finds the supports' object in each query.
Optionally upload ground-truth masks for the queries (named like them, e.g. `cat.png` or `cat_mask.png`) to see the
IoU, and pick a second checkpoint to compare both predictions side by side. Images up to {mp:g} MP.
"""
# Gallery captions are cut to one line by default: let the query name and IoU wrap instead (launch(css=CSS)).
CSS = """
#gallery-a .caption-label, #gallery-b .caption-label { white-space: normal; overflow: visible; text-overflow: clip;
  max-width: 100%; overflow-wrap: anywhere; }
"""


class ServePage(gr.Blocks):
    """``gr.Blocks`` whose refused API calls (a file not uploaded, too few inputs, a value not offered) answer
    with the reason and log one line, instead of ``{"error": null}`` and a traceback per call."""

    async def process_api(self, *args, **kwargs):
        try:
            return await super().process_api(*args, **kwargs)
        except gr.Error as e:
            if not e.print_exception:
                raise
            logger.warning("refused an API call: %s", e.message)
            raise gr.Error(e.message, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - Gradio's own checks on a call; our handlers catch theirs
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            logger.warning("refused an API call: %s", reason)
            raise gr.Error(f"refused: {reason}", print_exception=False) from None


def _brush(radius="auto") -> gr.Brush:
    return gr.Brush(colors=[BRUSH_COLOUR], default_color=BRUSH_COLOUR, color_mode="fixed", default_size=radius)


def _editor_update(path: Optional[str], max_pixels: int):
    # Show the support image in the painting canvas, with a brush sized to it; an unusable file is
    # reported at Run time instead.
    bg = editor_background(path, CANVAS_SIDE, max_pixels)
    if bg is None:
        return gr.update(value=None)
    return gr.update(value={"background": bg, "layers": [], "composite": None}, brush=_brush(brush_radius(bg.shape)))


def _picker_update(path: Optional[str], max_pixels: int):
    choices = mask_class_choices(path, max_pixels)
    return gr.update(choices=choices, value=choices[0][1] if len(choices) == 1 else None, visible=bool(choices))


def _prune(root: Path, keep: int) -> None:
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in folders[:-keep] if len(folders) > keep else []:
        shutil.rmtree(p, ignore_errors=True)


def _status(text: str, ok: bool) -> str:
    return f"**Done.**\n\n{text}" if ok else f"**Error:** {text}"


def checkpoint_table(checkpoints: Sequence[str], records: Sequence[CheckpointRecord]) -> str:
    """The served checkpoints with what they were trained on and their recorded test score."""
    rows = []
    for ck, rec in zip(checkpoints, records):
        score = rec.score_text + (f" (from `{Path(rec.score_from).name}`)" if rec.score_from else "")
        if rec.problem:
            score += f"; {rec.problem}"
        rows.append([f"**{checkpoint_label(ck)}** `{ck}`", rec.regime or "?", rec.data_text, score])
    return markdown_table(["checkpoint", "regime", "trained on", "recorded test score"], rows)


def _column(req: Optional[Request], i: int):
    """Title, gallery items and download files of run ``i``; empty when there is no such run."""
    if req is None or i >= len(req.runs):
        return "", [], []
    run = req.runs[i]
    items, files = [], []
    for r in run.results:
        iou = "" if r.iou is None else f" · IoU {pct(r.iou, digits=1, unit='%')}"
        empty = " · no object found" if r.foreground_fraction == 0 else ""
        items += [(str(r.overlay), f"{r.name}{iou}{empty}"), (str(r.mask), f"{r.name}: mask")]
        files += [str(r.mask), str(r.overlay)]
    score = f" · {run.record.score_text}" if run.record else ""
    return f"### {run.label}\n`{run.checkpoint}`{score}", items, files


def build_app(cache: ModelCache, checkpoints: Sequence[str], work_dir: Path, *, size: Optional[int] = None,
              max_shots: int = MAX_SHOTS, max_pixels: int = DEFAULT_MAX_PIXELS,
              max_queries: int = DEFAULT_MAX_QUERIES, examples: Sequence[Example] = ()) -> gr.Blocks:
    """The page: support slots, queries, optional ground truth, checkpoint pickers, results.

    Args:
        cache: loads each checkpoint once.
        checkpoints: the checkpoints the page may use (the first is the default; the second, if
            any, the default to compare with).
        work_dir: where request outputs go (inside the server's temp folder).
        size: test size override (default: each checkpoint's own).
        max_shots: number of support slots.
        max_pixels: largest image accepted.
        max_queries: most queries per request.
        examples: one-click example inputs (from the checkpoints' data).
    """
    results_root = work_dir / "results"
    results_root.mkdir(parents=True, exist_ok=True)
    choices = [str(c) for c in checkpoints]
    records = [cache.record(c) for c in choices]

    def on_run(ck_a, ck_b, queries, gts, *slot_values):
        slots = [SupportSlot(image=slot_values[PER_SLOT * j], mask=slot_values[PER_SLOT * j + 1],
                             mask_class=slot_values[PER_SLOT * j + 2],
                             painted=painted_mask(slot_values[PER_SLOT * j + 3])) for j in range(max_shots)]
        cks = [ck_a] + ([ck_b] if ck_b and ck_b != NO_COMPARE else [])
        req, status = None, ""
        try:
            unknown = [c for c in cks if c not in choices]
            if unknown:  # only the checkpoints the server was started with are ever loaded
                raise ServeError(f"unknown checkpoint {unknown[0]!r}; choose one of {', '.join(choices)}")
            _prune(results_root, KEEP_REQUESTS - 1)
            out = Path(tempfile.mkdtemp(prefix="request-", dir=results_root))
            req = run_request(cache, cks, slots, list(queries or []), list(gts or []), out, size=size,
                              max_pixels=max_pixels, max_queries=max_queries)
            status = _status(summary_markdown(req), True)
        except ServeError as e:
            status = _status(str(e), False)
        except Exception as e:  # noqa: BLE001 - the page shows one line, the log keeps the traceback
            logger.exception("request failed")
            status = _status(f"unexpected {type(e).__name__}: {e} (the server log has the details)", False)
        title_a, items_a, files_a = _column(req, 0)
        title_b, items_b, files_b = _column(req, 1)
        zip_file = [str(req.zip_path)] if req else None
        return (status, title_a, items_a, files_a or None, gr.update(visible=bool(title_b)), title_b, items_b,
                files_b or None, zip_file)

    with ServePage(title="svfseg serve", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO.format(k=max_shots, q=max_queries, mp=max_pixels / 1e6))
        with gr.Row():
            ck_a = gr.Dropdown(choices, value=choices[0], label="Checkpoint", elem_id="checkpoint")
            ck_b = gr.Dropdown([NO_COMPARE] + choices, value=choices[1] if len(choices) > 1 else NO_COMPARE,
                               label="Compare with (optional)", elem_id="compare", visible=len(choices) > 1)
        gr.Markdown(checkpoint_table(choices, records), elem_id="checkpoint-info")
        slot_inputs, slot_images, slot_masks = [], [], []
        with gr.Tabs():
            for j in range(max_shots):
                with gr.Tab(f"Support {j + 1}", elem_id=f"support-tab-{j + 1}"):
                    with gr.Row():
                        img = gr.File(label=f"Support {j + 1}: image", file_types=["image"],
                                      elem_id=f"support-image-{j + 1}")
                        with gr.Column():
                            mask = gr.File(label="its mask (PNG: 0/255, 0/1 or class indices), or paint it below",
                                           file_types=["image"], elem_id=f"support-mask-{j + 1}")
                            cls = gr.Dropdown([], value=None, label="object class (the mask holds several)",
                                              visible=False, elem_id=f"support-class-{j + 1}")
                    editor = gr.ImageEditor(label="Paint the object (used when no mask file is given)",
                                            type="numpy", image_mode="RGBA", format="png", sources=[],
                                            brush=_brush(), eraser=gr.Eraser(), layers=False, transforms=[],
                                            height=320, elem_id=f"support-editor-{j + 1}")
                    img.change(lambda p: _editor_update(p, max_pixels), img, editor, queue=False)
                    mask.change(lambda p: _picker_update(p, max_pixels), mask, cls, queue=False)
                    slot_inputs += [img, mask, cls, editor]
                    slot_images.append(img)
                    slot_masks.append(mask)
        with gr.Row():
            queries = gr.File(label=f"Queries: images to segment (up to {max_queries})", file_count="multiple",
                              file_types=["image"], elem_id="queries")
            gts = gr.File(label="Ground-truth masks (optional, named like the queries)", file_count="multiple",
                          file_types=["image"], elem_id="ground-truth")
        ex = None
        if examples:  # shown here, beside the inputs they fill; they segment once the outputs exist (below)
            ex = gr.Examples([[str(e.support), str(e.support_mask), [str(e.query)], [str(e.ground_truth)]]
                              for e in examples], [slot_images[0], slot_masks[0], queries, gts],
                             example_labels=[e.label for e in examples], label="Examples from the training data "
                             "(one click fills the inputs and segments)", elem_id="examples")
        with gr.Row():
            run = gr.Button("Segment", variant="primary", elem_id="run")
            clear = gr.Button("Clear", elem_id="clear")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column():
                title_a = gr.Markdown(elem_id="title-a")
                gallery_a = gr.Gallery(label="Overlay and mask per query", columns=2, format="png",
                                       elem_id="gallery-a")
                files_a = gr.File(label="Download: masks and overlays", file_count="multiple", elem_id="files-a")
            with gr.Column(visible=False) as col_b:
                title_b = gr.Markdown(elem_id="title-b")
                gallery_b = gr.Gallery(label="Overlay and mask per query", columns=2, format="png",
                                       elem_id="gallery-b")
                files_b = gr.File(label="Download: masks and overlays", file_count="multiple", elem_id="files-b")
        zip_file = gr.File(label="Download everything (zip)", file_count="multiple", elem_id="zip")
        run_inputs = [ck_a, ck_b, queries, gts, *slot_inputs]
        outputs = [status, title_a, gallery_a, files_a, col_b, title_b, gallery_b, files_b, zip_file]
        # One request at a time on the shared models: the queue serialises them.
        run.click(on_run, run_inputs, outputs, concurrency_limit=1, concurrency_id="segment")
        cleared = [queries, gts, *slot_inputs, *outputs]

        def on_clear():
            values = {queries: None, gts: None, status: "", title_a: "", gallery_a: [], files_a: None,
                      col_b: gr.update(visible=False), title_b: "", gallery_b: [], files_b: None, zip_file: None}
            for k in range(max_shots):
                img_k, mask_k, cls_k, editor_k = slot_inputs[PER_SLOT * k: PER_SLOT * (k + 1)]
                values.update({img_k: None, mask_k: None, cls_k: gr.update(choices=[], value=None, visible=False),
                               editor_k: None})
            return [values[c] for c in cleared]

        clear.click(on_clear, None, cleared, queue=False)
        if ex is not None:
            ex.load_input_event.then(on_run, run_inputs, outputs, concurrency_limit=1, concurrency_id="segment")
    return app
