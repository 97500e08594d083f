"""The Gradio page of `svfseg serve`: its layout and which event calls what; the work is done in handlers
(Segment), page_events (previews, pickers) and results_view (what a result looks like)."""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr

from svfseg.serve.examples import Example
from svfseg.serve.handlers import (DEFAULT_ADAPT_LR, DEFAULT_ADAPT_STEPS, MAX_SHOTS, ModelCache, Request, ServeError,
                                   SupportSlot, painted_mask, run_request, summary_markdown)
from svfseg.serve.inputs import adapt_choices, adapt_request
from svfseg.serve.limits import MAX_ADAPT_STEPS
from svfseg.serve.inputs import DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERIES
from svfseg.serve.page_events import (BRUSH_COLOUR, NO_COMPARE, brush, checkpoint_choices, class_picker_relabel,
                                      class_picker_update, clear_stale_error, editor_update, other_picker_update,
                                      support_preview_update, thumbnails_update)
from svfseg.serve.results_view import checkpoint_table, result_column, status_markdown

__all__ = ["build_app", "CSS", "BRUSH_COLOUR", "NO_COMPARE", "ServePage"]
logger = logging.getLogger(__name__)

KEEP_REQUESTS = 16  # result folders kept on disk; older ones are deleted (the page only shows the latest)
PER_SLOT = 4  # image, mask, class picker, editor: the inputs one support sends to Segment
INTRO = """## svfseg: segment your own images from annotated examples
Give 1 to {k} **supports** (an image and its mask: upload a 0/255 or 0/1 PNG, a class-index PNG and pick the class,
or paint the object on the image), then up to {q} **queries**; the model finds the supports' object in each query.
Optionally upload ground-truth masks for the queries (named like them, e.g. `cat.png` or `cat_mask.png`) to see the
IoU, and pick a second checkpoint to compare both predictions side by side. Images up to {mp:g} MP; sizes are
width x height. What you gave is drawn in green, the model's prediction in red.
"""
CSS = """
#gallery-a .caption-label, #gallery-b .caption-label, #query-previews .caption-label { white-space: normal; overflow: visible; text-overflow: clip;
  max-width: 100%; overflow-wrap: anywhere; }
#checkpoint-info td:nth-child(2), #checkpoint-info th:nth-child(2) { white-space: nowrap; }
.fit-content .grid-wrap { min-height: 0 !important; max-height: none !important; overflow-y: visible !important; }
"""
# After Segment (or an example) the status line goes to the top of the window: the result table, the timings
# and the first results below it are in view, whatever the inputs' height above.
SCROLL_TO_RESULTS = "() => { document.getElementById('status')?.scrollIntoView({block: 'start'}); }"
# Gradio gives a gallery a fixed height (min 450 px, at most 55% of the window, scrolling inside): the galleries of
# class "fit-content" take the height of their rows instead (launch(css=CSS)); captions wrap instead of being cut.


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


@dataclass
class SlotWidgets:
    """One support's components: what Segment reads (image, mask, picked class, painted strokes) and its preview."""

    image: gr.File
    mask: gr.File
    picker: gr.Dropdown
    editor: gr.ImageEditor
    preview: gr.Image
    note: gr.Markdown

    @property
    def inputs(self) -> list:
        return [self.image, self.mask, self.picker, self.editor]


def _support_tab(j: int) -> SlotWidgets:
    """The components of support ``j`` (1-based), laid out in the current tab."""
    with gr.Row():
        with gr.Column():
            img = gr.File(label=f"Support {j}: image", file_types=["image"], elem_id=f"support-image-{j}")
            mask = gr.File(label="its mask (PNG: 0/255, 0/1 or class indices), or paint it below",
                           file_types=["image"], elem_id=f"support-mask-{j}")
            picker = gr.Dropdown([], value=None, label="object class (the mask holds several; the largest is chosen)",
                                 visible=False, elem_id=f"support-class-{j}")
        with gr.Column():
            preview = gr.Image(label=f"Support {j} as the model gets it (the object in green)", type="numpy",
                               format="png", interactive=False, visible=False, height=300, buttons=["fullscreen"],
                               elem_id=f"support-preview-{j}")
            note = gr.Markdown(elem_id=f"support-note-{j}")
    editor = gr.ImageEditor(label="Paint the object (used when no mask file is given)", type="numpy",
                            image_mode="RGBA", format="png", sources=[], brush=brush(), eraser=gr.Eraser(),
                            layers=False, transforms=[], height=320, elem_id=f"support-editor-{j}")
    return SlotWidgets(img, mask, picker, editor, preview, note)


def _prune(root: Path, keep: int) -> None:
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in folders[:-keep] if len(folders) > keep else []:
        shutil.rmtree(p, ignore_errors=True)


def build_app(cache: ModelCache, checkpoints: Sequence[str], work_dir: Path, *, size: Optional[int] = None,
              max_shots: int = MAX_SHOTS, max_pixels: int = DEFAULT_MAX_PIXELS,
              max_queries: int = DEFAULT_MAX_QUERIES, examples: Sequence[Example] = ()) -> gr.Blocks:
    """The page: support slots with previews, queries with thumbnails, checkpoint pickers, results.

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
    names_of = {c: rec.class_names for c, rec in zip(choices, records)}

    def on_run(ck_a, ck_b, queries, gts, *rest):
        slot_values, (adapt_params, adapt_steps, adapt_lr) = rest[:PER_SLOT * max_shots], rest[PER_SLOT * max_shots:]
        slots = [SupportSlot(image=slot_values[PER_SLOT * j], mask=slot_values[PER_SLOT * j + 1],
                             mask_class=slot_values[PER_SLOT * j + 2],
                             painted=painted_mask(slot_values[PER_SLOT * j + 3])) for j in range(max_shots)]
        cks = [ck_a] + ([ck_b] if ck_b and ck_b != NO_COMPARE else [])
        req: Optional[Request] = None
        try:
            unknown = [c for c in cks if c not in choices]
            if unknown:  # only the checkpoints the server was started with are ever loaded
                raise ServeError(f"unknown checkpoint {unknown[0]!r}; choose one of {', '.join(choices)}")
            _prune(results_root, KEEP_REQUESTS - 1)
            out = Path(tempfile.mkdtemp(prefix="request-", dir=results_root))
            req = run_request(cache, cks, slots, list(queries or []), list(gts or []), out, size=size,
                              max_pixels=max_pixels, max_queries=max_queries,
                              adapt=adapt_request(adapt_params, adapt_steps, adapt_lr))
            status = status_markdown(summary_markdown(req), True)
        except ServeError as e:
            status = status_markdown(str(e), False)
        except Exception as e:  # noqa: BLE001 - the page shows one line, the log keeps the traceback
            logger.exception("request failed")
            status = status_markdown(f"unexpected {type(e).__name__}: {e} (the server log has the details)", False)
        a, b = result_column(req, 0), result_column(req, 1)
        return (status, a.title, gr.update(value=a.items, columns=a.columns), a.files or None,
                gr.update(visible=b.shown), b.title, gr.update(value=b.items, columns=b.columns), b.files or None,
                [str(req.zip_path)] if req else None)

    with ServePage(title="svfseg serve", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO.format(k=max_shots, q=max_queries, mp=max_pixels / 1e6))
        with gr.Row():
            # Built offering every checkpoint (an API call without a page checks against these); the page
            # removes the other picker's choice from each as it loads and on every change.
            ck_a = gr.Dropdown(choices, value=choices[0], label="Checkpoint", elem_id="checkpoint")
            ck_b = gr.Dropdown(checkpoint_choices(choices, None, with_none=True),
                               value=choices[1] if len(choices) > 1 else NO_COMPARE,
                               label="Compare with (optional)", elem_id="compare", visible=len(choices) > 1)
        gr.Markdown(checkpoint_table(choices, records), elem_id="checkpoint-info")
        slots: list[SlotWidgets] = []
        with gr.Tabs():
            for j in range(1, max_shots + 1):
                with gr.Tab(f"Support {j}", elem_id=f"support-tab-{j}"):
                    slots.append(_support_tab(j))
        with gr.Row():
            queries = gr.File(label=f"Queries: images to segment (up to {max_queries})", file_count="multiple",
                              file_types=["image"], elem_id="queries")
            gts = gr.File(label="Ground-truth masks (optional, named like the queries)", file_count="multiple",
                          file_types=["image"], elem_id="ground-truth")
        thumbs = gr.Gallery(label="Queries (ground truth in green)", columns=4, fit_columns=False, format="png",
                            interactive=False, object_fit="contain", visible=False, elem_id="query-previews",
                            elem_classes="fit-content")
        thumbs_note = gr.Markdown(elem_id="query-notes")
        ex = None
        if examples:  # shown here, beside the inputs they fill; they segment once the outputs exist (below)
            ex = gr.Examples([[str(e.support), str(e.support_mask), [str(e.query)], [str(e.ground_truth)]]
                              for e in examples], [slots[0].image, slots[0].mask, queries, gts],
                             example_labels=[e.label for e in examples],
                             label="Examples: a support and a query of one novel class of the checkpoint's fold, "
                                   "from its data's val split (one click fills the inputs and segments)",
                             elem_id="examples")
        with gr.Row():
            choices_adapt = adapt_choices()
            adapt_params = gr.Dropdown(choices_adapt, value=choices_adapt[0][1], elem_id="adapt",
                                       label="Adapt to these supports first (fine-tune a copy of the model on them; "
                                             "the result shows both)")
            adapt_steps = gr.Number(None, precision=0, minimum=0, maximum=MAX_ADAPT_STEPS, elem_id="adapt-steps",
                                    label=f"steps (empty: the checkpoint's recorded choice, else {DEFAULT_ADAPT_STEPS})")
            adapt_lr = gr.Number(None, minimum=0, elem_id="adapt-lr",
                                 label=f"learning rate (empty: recorded, else {DEFAULT_ADAPT_LR:g})")
        with gr.Row():
            run = gr.Button("Segment", variant="primary", elem_id="run")
            clear = gr.Button("Clear", elem_id="clear")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column():
                title_a = gr.Markdown(elem_id="title-a")
                gallery_a = gr.Gallery(label="Overlay and mask per query", columns=2, format="png",
                                       object_fit="contain", elem_id="gallery-a", elem_classes="fit-content")
                files_a = gr.File(label="Download: masks and overlays", file_count="multiple", elem_id="files-a")
            with gr.Column(visible=False) as col_b:
                title_b = gr.Markdown(elem_id="title-b")
                gallery_b = gr.Gallery(label="Overlay and mask per query", columns=2, format="png",
                                       object_fit="contain", elem_id="gallery-b", elem_classes="fit-content")
                files_b = gr.File(label="Download: masks and overlays", file_count="multiple", elem_id="files-b")
        zip_file = gr.File(label="Download everything (zip)", file_count="multiple", elem_id="zip")

        # -- the inputs' own events: previews, pickers, stale errors -------------------------------------------
        quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}  # the page's own, quick
        for j, slot in enumerate(slots, 1):
            slot.image.change(lambda p: editor_update(p, max_pixels), slot.image, slot.editor, **quick)

            def preview(image, mask, picked, editor, ck, j=j):
                return support_preview_update(j, image, mask, picked, editor, names_of.get(ck, ()), max_pixels)

            preview_io = ([*slot.inputs, ck_a], [slot.preview, slot.note])
            slot.mask.change(lambda p, ck: class_picker_update(p, names_of.get(ck, ()), max_pixels),
                             [slot.mask, ck_a], slot.picker, **quick).then(preview, *preview_io, **quick)
            gr.on([slot.image.change, slot.picker.input, slot.editor.change], preview, *preview_io, **quick)
            ck_a.change(lambda ck, p, v: class_picker_relabel(p, v, names_of.get(ck, ()), max_pixels),
                        [ck_a, slot.mask, slot.picker], slot.picker, **quick)

        def thumbnails(qs, gs, *mask_and_class):
            return thumbnails_update(qs, gs, mask_and_class[0::2], mask_and_class[1::2], max_pixels, max_queries)

        gr.on([queries.change, gts.change] + [s.picker.change for s in slots], thumbnails,
              [queries, gts] + [c for s in slots for c in (s.mask, s.picker)], [thumbs, thumbs_note], **quick)
        ck_a.change(lambda a: other_picker_update(a, choices, with_none=True), ck_a, ck_b, **quick)
        ck_b.change(lambda b: other_picker_update(b, choices, with_none=False), ck_b, ck_a, **quick)
        app.load(lambda a, b: (other_picker_update(b, choices, with_none=False),
                               other_picker_update(a, choices, with_none=True)), [ck_a, ck_b], [ck_a, ck_b], **quick)
        slot_inputs = [c for s in slots for c in s.inputs]
        gr.on([c.change for c in [ck_a, ck_b, queries, gts, *slot_inputs]], clear_stale_error, status, status, **quick)

        # -- Segment, examples, Clear ----------------------------------------------------------------------------
        run_inputs = [ck_a, ck_b, queries, gts, *slot_inputs, adapt_params, adapt_steps, adapt_lr]
        outputs = [status, title_a, gallery_a, files_a, col_b, title_b, gallery_b, files_b, zip_file]
        # One request at a time on the shared models: the queue serialises them.
        segment = {"concurrency_limit": 1, "concurrency_id": "segment"}
        run.click(on_run, run_inputs, outputs, **segment).then(None, js=SCROLL_TO_RESULTS)
        if ex is not None:
            ex.load_input_event.then(on_run, run_inputs, outputs, **segment).then(None, js=SCROLL_TO_RESULTS)
        previews = [c for s in slots for c in (s.preview, s.note)] + [thumbs, thumbs_note]
        cleared = [queries, gts, *slot_inputs, *outputs, *previews]

        def on_clear():
            values = {queries: None, gts: None, status: "", title_a: "", gallery_a: [], files_a: None,
                      col_b: gr.update(visible=False), title_b: "", gallery_b: [], files_b: None, zip_file: None,
                      thumbs: gr.update(value=None, visible=False), thumbs_note: ""}
            for s in slots:
                values.update({s.image: None, s.mask: None, s.picker: gr.update(choices=[], value=None, visible=False),
                               s.editor: None, s.preview: gr.update(value=None, visible=False), s.note: ""})
            return [values[c] for c in cleared]

        clear.click(on_clear, None, cleared, queue=False)
    return app
