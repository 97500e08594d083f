"""What the page's small events return (Gradio updates): previews, class pickers, checkpoint pickers, stale errors.

Each function reads only what its event passes in; none raises (a problem becomes a note, Segment reports it too).
"""
from __future__ import annotations

from typing import Optional, Sequence

import gradio as gr

from svfseg.serve.classes import class_choices, default_class, mask_classes
from svfseg.serve.handlers import SupportSlot, painted_mask
from svfseg.serve.inputs import brush_radius, editor_background, ground_truth_class
from svfseg.serve.previews import query_thumbnails, support_preview
from svfseg.serve.results_view import is_error

NO_COMPARE = "(none)"
CANVAS_SIDE = 1024  # the painting canvas shows the support at most this large; strokes are scaled back
BRUSH_COLOUR = ("#ff3030", 0.5)  # translucent: the object stays visible under the strokes

__all__ = ["NO_COMPARE", "CANVAS_SIDE", "BRUSH_COLOUR", "brush", "editor_update", "class_picker_update",
           "class_picker_relabel", "support_preview_update", "thumbnails_update", "checkpoint_choices",
           "other_picker_update", "clear_stale_error"]


def brush(radius="auto") -> gr.Brush:
    """The painting brush: one translucent red, ``radius`` px."""
    return gr.Brush(colors=[BRUSH_COLOUR], default_color=BRUSH_COLOUR, color_mode="fixed", default_size=radius)


def editor_update(path: Optional[str], max_pixels: int):
    """The painting canvas for a new support image, with a brush sized to it (empty for an unusable file:
    Segment names the problem)."""
    bg = editor_background(path, CANVAS_SIDE, max_pixels)
    if bg is None:
        return gr.update(value=None)
    return gr.update(value={"background": bg, "layers": [], "composite": None}, brush=brush(brush_radius(bg.shape)))


def class_picker_update(mask_path: Optional[str], names: Sequence[str], max_pixels: int):
    """The class picker for a newly uploaded mask: the classes present, named, the largest chosen; hidden for a
    binary mask."""
    classes = mask_classes(mask_path, max_pixels)
    return gr.update(choices=class_choices(classes, names), value=default_class(classes), visible=bool(classes))


def class_picker_relabel(mask_path: Optional[str], value: Optional[int], names: Sequence[str], max_pixels: int):
    """The same picker named by another checkpoint's classes; the chosen class stays."""
    classes = mask_classes(mask_path, max_pixels)
    return gr.update(choices=class_choices(classes, names),
                     value=value if value in {c.value for c in classes} else default_class(classes))


def support_preview_update(i: int, image: Optional[str], mask: Optional[str], mask_class: Optional[int],
                           editor_value: Optional[dict], names: Sequence[str], max_pixels: int):
    """Support ``i``'s preview image (hidden when there is nothing to show) and its note."""
    slot = SupportSlot(image=image, mask=mask, mask_class=mask_class, painted=painted_mask(editor_value))
    preview = support_preview(i, slot, names, max_pixels=max_pixels)
    return gr.update(value=preview.image, visible=preview.image is not None), preview.note


def thumbnails_update(queries: Optional[list], gts: Optional[list], masks: Sequence[Optional[str]],
                      picked: Sequence[Optional[int]], max_pixels: int, max_queries: int):
    """The query thumbnails (ground truths in green; a class-index one read as the supports' picked class) and
    a note on what could not be shown."""
    slots = [SupportSlot(mask=m, mask_class=c) for m, c in zip(masks, picked)]
    items, note = query_thumbnails(list(queries or []), list(gts or []), mask_class=ground_truth_class(slots),
                                   max_pixels=max_pixels, max_queries=max_queries)
    return gr.update(value=items or None, visible=bool(items)), note


def checkpoint_choices(checkpoints: Sequence[str], taken: Optional[str], *, with_none: bool) -> list[str]:
    """A checkpoint picker's entries: every served checkpoint but the one the other picker holds."""
    return ([NO_COMPARE] if with_none else []) + [c for c in checkpoints if c != taken]


def other_picker_update(chosen: Optional[str], checkpoints: Sequence[str], *, with_none: bool):
    """The other checkpoint picker once this one holds ``chosen``: it no longer offers ``chosen``."""
    return gr.update(choices=checkpoint_choices(checkpoints, chosen, with_none=with_none))


def clear_stale_error(status: Optional[str]):
    """An error on the page belongs to the inputs that caused it: any input change removes it (results stay)."""
    return "" if is_error(status) else gr.update()

