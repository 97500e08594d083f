"""The Gradio page of `svfseg serve`: inputs, the Run button, results; all work is done in handlers."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr

from svfseg.predict import read_rgb
from svfseg.serve.handlers import (MAX_SHOTS, ModelCache, Request, ServeError, SupportSlot, painted_mask, run_request,
                                   summary_markdown)

logger = logging.getLogger(__name__)

NO_COMPARE = "(none)"
KEEP_REQUESTS = 16  # result folders kept on disk; older ones are deleted (the page only shows the latest)
INTRO = """## svfseg: segment your own images from annotated examples
Give 1 to {k} **supports** (an image and its mask: upload a 0/255 or 0/1 PNG, or paint the object on the image),
then one or more **queries**; the model finds the supports' object in each query. Optionally upload ground-truth
masks for the queries (named like them, e.g. `cat.png` or `cat_mask.png`) to see the IoU, and pick a second
checkpoint to compare both predictions side by side.
"""


def _editor_background(path: Optional[str]):
    # Show the support image in the painting canvas; an unreadable file is reported at Run time instead.
    if not path:
        return None
    try:
        return {"background": read_rgb(path), "layers": [], "composite": None}
    except Exception:  # noqa: BLE001 - any unreadable upload: leave the canvas empty
        return None


def _prune(root: Path, keep: int) -> None:
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in folders[:-keep] if len(folders) > keep else []:
        shutil.rmtree(p, ignore_errors=True)


def _status(text: str, ok: bool) -> str:
    return f"**Done.**\n\n{text}" if ok else f"**Error:** {text}"


def _column(req: Optional[Request], i: int):
    """Title, gallery items and download files of run ``i``; empty when there is no such run."""
    if req is None or i >= len(req.runs):
        return "", [], []
    run = req.runs[i]
    items, files = [], []
    for r in run.results:
        iou = "" if r.iou is None else f", IoU {100 * r.iou:.1f}%"
        items += [(str(r.overlay), f"{r.name}: {100 * r.foreground_fraction:.1f}% foreground{iou}"),
                  (str(r.mask), f"{r.name}: mask")]
        files += [str(r.mask), str(r.overlay)]
    return f"### {run.label}\n`{run.checkpoint}`", items, files


def build_app(cache: ModelCache, checkpoints: Sequence[str], work_dir: Path, *, size: Optional[int] = None,
              max_shots: int = MAX_SHOTS) -> gr.Blocks:
    """The page: support slots, queries, optional ground truth, checkpoint pickers, results.

    Args:
        cache: loads each checkpoint once.
        checkpoints: the checkpoints the page may use (the first is the default).
        work_dir: where request outputs go (inside the server's temp folder).
        size: test size override (default: each checkpoint's own).
        max_shots: number of support slots.
    """
    results_root = work_dir / "results"
    results_root.mkdir(parents=True, exist_ok=True)
    choices = [str(c) for c in checkpoints]

    def on_run(ck_a, ck_b, queries, gts, *slot_values):
        slots = [SupportSlot(image=slot_values[3 * j], mask=slot_values[3 * j + 1],
                             painted=painted_mask(slot_values[3 * j + 2])) for j in range(max_shots)]
        cks = [ck_a] + ([ck_b] if ck_b and ck_b != NO_COMPARE else [])
        req, status = None, ""
        try:
            unknown = [c for c in cks if c not in choices]
            if unknown:  # only the checkpoints the server was started with are ever loaded
                raise ServeError(f"unknown checkpoint {unknown[0]!r}; choose one of {', '.join(choices)}")
            _prune(results_root, KEEP_REQUESTS - 1)
            out = Path(tempfile.mkdtemp(prefix="request-", dir=results_root))
            req = run_request(cache, cks, slots, list(queries or []), list(gts or []), out, size=size)
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

    with gr.Blocks(title="svfseg serve", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO.format(k=max_shots))
        with gr.Row():
            ck_a = gr.Dropdown(choices, value=choices[0], label="Checkpoint", elem_id="checkpoint")
            ck_b = gr.Dropdown([NO_COMPARE] + choices, value=NO_COMPARE, label="Compare with (optional)",
                               elem_id="compare")
        slot_inputs = []
        with gr.Tabs():
            for j in range(max_shots):
                with gr.Tab(f"Support {j + 1}", elem_id=f"support-tab-{j + 1}"):
                    with gr.Row():
                        img = gr.File(label=f"Support {j + 1}: image", file_types=["image"],
                                      elem_id=f"support-image-{j + 1}")
                        mask = gr.File(label="its mask (PNG, 0/255 or 0/1), or paint it below",
                                       file_types=["image"], elem_id=f"support-mask-{j + 1}")
                    editor = gr.ImageEditor(label="Paint the object (used when no mask file is given)",
                                            type="numpy", image_mode="RGBA", format="png", sources=[],
                                            brush=gr.Brush(colors=["#ff3030"], color_mode="fixed"),
                                            eraser=gr.Eraser(), layers=False, transforms=[], height=320,
                                            elem_id=f"support-editor-{j + 1}")
                    img.change(_editor_background, img, editor, queue=False)
                    slot_inputs += [img, mask, editor]
        with gr.Row():
            queries = gr.File(label="Queries: images to segment", file_count="multiple", file_types=["image"],
                              elem_id="queries")
            gts = gr.File(label="Ground-truth masks (optional, named like the queries)", file_count="multiple",
                          file_types=["image"], elem_id="ground-truth")
        run = gr.Button("Segment", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column():
                title_a = gr.Markdown(elem_id="title-a")
                gallery_a = gr.Gallery(label="Overlay and mask per query", columns=4, format="png",
                                       elem_id="gallery-a")
                files_a = gr.File(label="Download: masks and overlays", file_count="multiple", elem_id="files-a")
            with gr.Column(visible=False) as col_b:
                title_b = gr.Markdown(elem_id="title-b")
                gallery_b = gr.Gallery(label="Overlay and mask per query", columns=4, format="png",
                                       elem_id="gallery-b")
                files_b = gr.File(label="Download: masks and overlays", file_count="multiple", elem_id="files-b")
        zip_file = gr.File(label="Download everything (zip)", file_count="multiple", elem_id="zip")
        # One request at a time on the shared models: the queue serialises them.
        run.click(on_run, [ck_a, ck_b, queries, gts, *slot_inputs],
                  [status, title_a, gallery_a, files_a, col_b, title_b, gallery_b, files_b, zip_file],
                  concurrency_limit=1, concurrency_id="segment")
    return app
