"""What `svfseg serve` shows of its inputs before Segment, without a browser: support previews, query thumbnails,
the checkpoint pickers' choices, stale errors, the result rows (issue 31)."""
import numpy as np
import pytest
from PIL import Image

from serve_setup import write_inputs
from svfseg.serve.inputs import SupportSlot
from svfseg.serve.previews import GIVEN_COLOUR, PREVIEW_SIDE, THUMB_SIDE, query_thumbnails, support_preview

@pytest.fixture
def files(tmp_path):
    paths = write_inputs(tmp_path)
    return {k: str(v) for k, v in paths.items()}


def _png(path):
    return np.array(Image.open(path))


def _shown_at_image_size(preview, hw):
    factor = preview.shape[0] // hw[0]
    assert preview.shape[:2] == (hw[0] * factor, hw[1] * factor)
    return preview[::factor, ::factor]


def test_support_preview_is_the_image_with_the_mask_segment_uses(files):
    rgb, fg = _png(files["support"]), _png(files["mask"]) == 255
    p = support_preview(1, SupportSlot(files["support"], files["mask"]))
    assert max(p.image.shape[:2]) == PREVIEW_SIDE  # 64x48 enlarged 6 times, pixel blocks
    shown = _shown_at_image_size(p.image, rgb.shape[:2])
    np.testing.assert_array_equal(shown[~fg], rgb[~fg])
    edge = fg & ~np.pad(fg, 1)[2:, 1:-1]  # a pixel of the outline: drawn solid
    assert tuple(shown[edge][0]) == GIVEN_COLOUR
    assert p.note == ("Support 1 (64x48): the object in green is the uploaded mask **support_mask.png**, "
                      "14.2% of the image")
    # painted strokes as well: the uploaded mask is what is shown and used, and the note says so
    both = support_preview(1, SupportSlot(files["support"], files["mask"], painted=np.ones((48, 64), bool)))
    np.testing.assert_array_equal(both.image, p.image)
    assert "the painted strokes are not used while a mask file is given" in both.note
    strokes = np.zeros((48, 64), bool)
    strokes[5:10, 5:20] = True
    painted = support_preview(2, SupportSlot(files["support"], painted=strokes))
    np.testing.assert_array_equal(_shown_at_image_size(painted.image, (48, 64))[~strokes], rgb[~strokes])
    assert "is the painted strokes" in painted.note and painted.note.startswith("Support 2 (64x48)")


def test_support_preview_of_half_a_support_or_a_bad_one_says_what_is_missing(files, tmp_path):
    assert support_preview(1, SupportSlot()).image is None
    only_image = support_preview(1, SupportSlot(files["support"]))
    assert only_image.image is None and "no mask yet" in only_image.note
    labels = np.zeros((48, 64), np.uint8)
    labels[:6, :6], labels[20:30, 20:40] = 3, 7
    Image.fromarray(labels).save(tmp_path / "classes.png")
    only_mask = support_preview(1, SupportSlot(mask=str(tmp_path / "classes.png"), mask_class=3),
                                names=["a", "b", "cat"])
    shown = _shown_at_image_size(only_mask.image, (48, 64))
    assert (shown[labels == 3][:, 1] > 100).all() and (shown[labels != 3] == 60).all()  # class 3 only, on grey
    assert "class 3 (cat)" in only_mask.note and "upload its image" in only_mask.note
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(tmp_path / "small.png")
    wrong = support_preview(1, SupportSlot(files["support"], str(tmp_path / "small.png")))
    assert wrong.image is None
    assert wrong.note == ("**Support 1:** support 1 mask (small.png): mask is 60x40 but its support image is 64x48 "
                          "(width x height)")


def test_query_thumbnails_pair_ground_truths_by_name_and_say_sizes_as_width_x_height(files, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items, note = query_thumbnails([files["query"], files["query2"], str(tmp_path / "broken.png")],
                                   [files["gt"], files["mask"]])
    assert [c for _, c in items] == ["query.png · 64x48 · ground truth query_gt.png",
                                     "other.png · 64x48 · no ground truth"]
    assert max(items[0][0].shape[:2]) == THUMB_SIDE
    gt = _png(files["gt"]) == 255
    shown = _shown_at_image_size(items[0][0], (48, 64))
    np.testing.assert_array_equal(shown[~gt], _png(files["query"])[~gt])
    assert (shown[gt] != _png(files["query"])[gt]).any(axis=1).all()
    np.testing.assert_array_equal(_shown_at_image_size(items[1][0], (48, 64)), _png(files["query2"]))
    assert "ground truth support_mask.png: no query named 'support'" in note
    assert "query (broken.png): cannot read it" in note
    assert query_thumbnails([], []) == ([], "")
    too_many = query_thumbnails([files["query"]] * 3, [], max_queries=2)
    assert too_many[0] == [] and "3 queries given; at most 2" in too_many[1]


def test_checkpoint_pickers_offer_everything_but_the_other_ones_choice():
    pytest.importorskip("gradio")  # page_events builds Gradio updates
    from svfseg.serve.page_events import NO_COMPARE, checkpoint_choices, other_picker_update

    cks = ["a.pt", "b.pt", "c.pt"]
    assert other_picker_update("a.pt", cks, with_none=True)["choices"] == [NO_COMPARE, "b.pt", "c.pt"]
    assert other_picker_update("b.pt", cks, with_none=False)["choices"] == ["a.pt", "c.pt"]
    assert checkpoint_choices(cks, NO_COMPARE, with_none=False) == cks  # nothing to compare with: all


def test_only_an_error_is_cleared_when_an_input_changes():
    pytest.importorskip("gradio")
    from svfseg.serve.page_events import clear_stale_error
    from svfseg.serve.results_view import status_markdown

    assert clear_stale_error(status_markdown("support 1: no mask", False)) == ""
    kept = clear_stale_error(status_markdown("| query | ... |", True))
    assert isinstance(kept, dict) and "value" not in kept  # an update that changes nothing
    assert isinstance(clear_stale_error(None), dict)


def test_a_result_row_is_overlay_then_mask_and_the_gallery_has_as_many_columns(tmp_path):
    from svfseg.serve.handlers import CheckpointRun, QueryResult, Request
    from svfseg.serve.results_view import result_column, result_row

    r = QueryResult("cat", tmp_path / "cat_mask.png", tmp_path / "cat_overlay.png", 0.0, 0.5, (48, 64))
    assert result_row(r) == [(str(r.overlay), "cat · IoU 50.0% · no object found"), (str(r.mask), "cat: mask")]
    req = Request([CheckpointRun("x/best.pt", "x-best", [r, r], 0.1)], tmp_path / "z.zip", 1)
    column = result_column(req, 0)
    assert column.columns == len(result_row(r)) and len(column.items) == 2 * len(result_row(r))
    assert not result_column(req, 1).shown
