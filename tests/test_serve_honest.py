"""`svfseg serve` tells the truth about its models and inputs (issue 22, items 15-20), without a browser."""
import asyncio
import inspect
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_setup import blank_checkpoint, cache, ckpts, demo_record, inputs  # noqa: F401 (fixtures)
from svfseg.serve import cli as serve_cli
from svfseg.serve.auth import PASSWORD_ENV, LoginGuard, resolve_auth
from svfseg.serve.handlers import ServeError, SupportSlot, run_request, summary_markdown
from svfseg.serve.classes import class_choices, default_class, mask_classes
from svfseg.serve.inputs import brush_radius, check_pixels, editor_background
from svfseg.serve.sources import checkpoint_record


def _slots(inputs, **kw):
    return [SupportSlot(str(inputs["support"]), str(inputs["mask"]), **kw)]


def _png(path):
    return np.array(Image.open(path))


# 15: each checkpoint's recorded score and training data; a notice when nothing is found

def test_record_from_source_json_results_json_or_nothing(ckpts, tmp_path):
    demo = blank_checkpoint(ckpts["svf"], tmp_path / "demo" / "svf", demo_record("svf", 0.412))
    rec = checkpoint_record(demo)
    assert rec.score_text == "test mIoU 41.2% (FB-IoU 50.0%, 1000 episodes)"
    assert rec.data_text == "synthetic fold 0, 1-shot (data/synthetic-5i)" and rec.regime == "svf"
    assert rec.cell == "runs/demo/cells/svf_seed0" and rec.problem is None
    # a run folder scored by `svfseg compare` (test/results.json, runs[0]): the config gives the data
    cell = tmp_path / "cell"
    cell.mkdir()
    shutil.copy(ckpts["frozen"], cell / "best.pt")
    (cell / "test").mkdir()
    (cell / "test" / "results.json").write_text(json.dumps(
        {"checkpoint": str(cell / "best.pt"), "runs": [{"miou": 0.25, "fb_iou": 0.6, "episodes": 300}],
         "summary": {"miou": {"mean": 0.25}, "fb_iou": {"mean": 0.6}}}))
    rec = checkpoint_record(cell / "best.pt")
    assert rec.score_text == "test mIoU 25.0% (FB-IoU 60.0%, 300 episodes)" and rec.regime == "frozen"
    assert rec.benchmark == "synthetic" and rec.fold == 0 and rec.shot == 1 and "synthetic-5i" in rec.data_text
    # ... but not the score of another checkpoint of that folder
    shutil.copy(ckpts["frozen"], cell / "last.pt")
    assert checkpoint_record(cell / "last.pt").score_text == "no recorded test score"
    # nothing beside it: the training data still shows
    rec = checkpoint_record(ckpts["svf"])
    assert rec.score_text == "no recorded test score" and rec.regime == "svf" and rec.data_text.startswith(
        "synthetic fold 0, 1-shot")
    assert len(rec.class_names) == 20 and rec.class_names[6] == "hexagon-waves"  # the class picker's names
    # a SOURCE.json with a percentage where a fraction belongs is named, not shown as 4100%
    (tmp_path / "demo" / "svf" / "SOURCE.json").write_text(json.dumps(demo_record("svf", 41)))
    rec = checkpoint_record(demo)
    assert rec.test_miou is None
    assert "SOURCE.json: expected test_miou a fraction between 0 and 1, found 41" in rec.problem


def test_no_foreground_notice_names_the_recorded_score(ckpts, inputs, cache, tmp_path):
    blank = blank_checkpoint(ckpts["svf"], tmp_path / "demo" / "blank", demo_record("svf", 0.123))
    req = run_request(cache, [str(blank), str(ckpts["svf"])], _slots(inputs), [str(inputs["query"])], [],
                      tmp_path / "r")
    assert req.runs[0].results[0].foreground_fraction == 0 and req.runs[0].no_object == ["query"]
    assert req.runs[1].no_object == []  # the calibrated model does find it: no notice for it
    text = summary_markdown(req)
    assert ("**blank-best: the model found no object** in query; this checkpoint scored 12.3% mIoU on its test "
            "(synthetic fold 0, 1-shot (data/synthetic-5i), 1000 episodes).") in text
    assert text.count("found no object") == 1


# 16: both demo checkpoints served by default, and compared by default

def _demo_folder(ckpts, root: Path, regimes=("svf", "frozen")):
    for regime in regimes:
        blank_checkpoint(ckpts[regime], root / "runs" / "demo" / regime, demo_record(regime, 0.3))


def test_default_serves_both_demo_checkpoints_and_compares_them(ckpts, cache, tmp_path, monkeypatch):
    from svfseg.serve.app import build_app

    monkeypatch.chdir(tmp_path)
    _demo_folder(ckpts, tmp_path, regimes=("frozen",))
    assert serve_cli.resolve_checkpoints(None) == [Path("runs/demo/frozen/best.pt")]  # only the frozen one
    _demo_folder(ckpts, tmp_path)
    served = [str(p) for p in serve_cli.resolve_checkpoints(None)]
    assert served == ["runs/demo/svf/best.pt", "runs/demo/frozen/best.pt"]
    app = build_app(cache, served, tmp_path / "work")
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["checkpoint"].value == served[0] and by_id["compare"].value == served[1]
    info = by_id["checkpoint-info"].value
    assert info.count("test mIoU 30.0%") == 2 and "frozen-best" in info and "synthetic fold 0, 1-shot" in info
    with pytest.raises(ServeError, match="the same checkpoint picked twice"):
        run_request(cache, [served[0], served[0]], [], [], [], tmp_path / "r")


# 17: caps on pixels per image and queries per request

def test_a_100_mp_query_is_refused_from_its_header(ckpts, inputs, cache, tmp_path):
    big = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(big)  # 100 MP, a small file and 12 MB to make here
    t0 = time.perf_counter()
    with pytest.raises(ServeError, match=r"^query \(huge.png\): 10000x10000 pixels \(100.0 MP\); at most 25 MP per "
                                         r"image \(--max-pixels\)"):
        run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(inputs["query"]), str(big)], [], tmp_path / "r")
    assert time.perf_counter() - t0 < 2  # refused before decoding, not after 30 s
    assert check_pixels(str(big), "query", 100_000_000) == (10_000, 10_000)
    with pytest.raises(ServeError, match=r"support 1 image \(huge.png\): .*--max-pixels"):
        run_request(cache, [str(ckpts["svf"])], [SupportSlot(str(big), str(inputs["mask"]))], [str(inputs["query"])],
                    [], tmp_path / "r2")
    with pytest.raises(ServeError, match=r"^3 queries given; at most 2 per request \(--max-queries\)"):
        run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(inputs["query"])] * 3, [], tmp_path / "r3",
                    max_queries=2)
    req = run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(inputs["query"])] * 2, [], tmp_path / "r4",
                      max_queries=2)
    assert [r.name for r in req.runs[0].results] == ["query", "query_2"]


def test_large_query_keeps_a_full_size_mask_and_a_small_overlay(ckpts, inputs, cache, tmp_path):
    q = tmp_path / "wide.png"
    Image.open(inputs["query"]).resize((2048, 1536)).save(q)
    r = run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(q)], [], tmp_path / "r").runs[0].results[0]
    assert _png(r.mask).shape == (1536, 2048) and _png(r.overlay).shape == (768, 1024, 3)


# 18: class-index masks get a class picker; a JPEG mask is told to be a PNG

def test_class_index_mask_with_a_picked_class_equals_its_binary_mask(ckpts, inputs, cache, tmp_path):
    fg = _png(inputs["mask"]) == 255
    labels = np.zeros(fg.shape, np.uint8)
    labels[fg] = 7
    labels[:6, :6] = 3  # another object in the same mask
    Image.fromarray(labels).save(tmp_path / "classes.png")
    classes = mask_classes(str(tmp_path / "classes.png"))
    assert class_choices(classes) == [("3 (1% of the image)", 3), ("7 (14% of the image)", 7)]
    names = [f"name{i}" for i in range(1, 6)]  # the checkpoint's data names classes 1..5 only
    assert class_choices(classes, names) == [("3 name3 (1% of the image)", 3), ("7 (14% of the image)", 7)]
    assert default_class(classes) == 7  # the largest, not the first
    assert mask_classes(str(inputs["mask"])) == []  # binary: no picker
    sup, q = str(inputs["support"]), [str(inputs["query"])]
    with pytest.raises(ServeError, match=r"support 1 mask \(classes.png\): a class-index mask \(classes 3, 7\); pick "
                                         r"the object's class in the 'object class' box"):
        run_request(cache, [str(ckpts["svf"])], [SupportSlot(sup, str(tmp_path / "classes.png"))], q, [],
                    tmp_path / "a")
    picked = run_request(cache, [str(ckpts["svf"])], [SupportSlot(sup, str(tmp_path / "classes.png"), mask_class=7)],
                         q, [], tmp_path / "b")
    binary = run_request(cache, [str(ckpts["svf"])], _slots(inputs), q, [], tmp_path / "c")
    np.testing.assert_array_equal(_png(picked.runs[0].results[0].mask), _png(binary.runs[0].results[0].mask))
    # a class-index ground truth is read as the picked class
    gt = np.zeros((48, 64), np.uint8)
    gt[_png(inputs["gt"]) == 255] = 7
    Image.fromarray(gt).save(tmp_path / "query_mask.png")
    with_gt = run_request(cache, [str(ckpts["svf"])], [SupportSlot(sup, str(tmp_path / "classes.png"), mask_class=7)],
                          q, [str(tmp_path / "query_mask.png")], tmp_path / "d")
    reference = run_request(cache, [str(ckpts["svf"])], _slots(inputs), q, [str(inputs["gt"])], tmp_path / "e")
    assert with_gt.runs[0].results[0].iou == pytest.approx(reference.runs[0].results[0].iou)
    # JPEG blurs a mask's edges into many values
    Image.fromarray((fg * 255).astype(np.uint8)).save(tmp_path / "mask.jpg", quality=75)
    with pytest.raises(ServeError, match=r"support 1 mask \(mask.jpg\): a JPEG mask \(\d+ grey levels.*save the "
                                         r"mask as PNG"):
        run_request(cache, [str(ckpts["svf"])], [SupportSlot(sup, str(tmp_path / "mask.jpg"))], q, [], tmp_path / "f")
    assert mask_classes(str(tmp_path / "mask.jpg")) == []


# 19: ground truth pairs by name only

def test_ground_truth_pairs_by_name_only_and_names_the_unmatched(ckpts, inputs, cache, tmp_path):
    wrong = tmp_path / "elsewhere.png"
    shutil.copy(inputs["gt"], wrong)
    # one query and one mask of another name used to be paired by position (a wrong mask gave IoU 5.1%)
    with pytest.raises(ServeError, match=r"ground truth elsewhere.png: no query named 'elsewhere' \(name each like "
                                         r"its query: one of query"):
        run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(inputs["query"])], [str(wrong)], tmp_path / "a")
    with pytest.raises(ServeError, match=r"elsewhere.png: no query named 'elsewhere'; ground truth support.png: "
                                         r"no query"):
        run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(inputs["query"])],
                    [str(wrong), str(inputs["support"])], tmp_path / "b")
    shutil.copy(inputs["gt"], tmp_path / "query.png")
    with pytest.raises(ServeError, match="ground truths query_gt.png and query.png both belong to query 'query'"):
        run_request(cache, [str(ckpts["svf"])], _slots(inputs), [str(inputs["query"])],
                    [str(inputs["gt"]), str(tmp_path / "query.png")], tmp_path / "c")


# 20: auth from the environment or a file, slowed failures; the brush

def test_auth_password_from_environment_or_file(tmp_path):
    assert resolve_auth("ann", environ={PASSWORD_ENV: "s3cret"}) == (("ann", "s3cret"), None)
    (tmp_path / "pw").write_text("from file\nignored\n")
    assert resolve_auth("ann", tmp_path / "pw", environ={}) == (("ann", "from file"), None)
    auth, warning = resolve_auth("ann:s3:cret", environ={})
    assert auth == ("ann", "s3:cret") and "other users can read it (ps)" in warning
    with pytest.raises(ValueError, match=f"--auth ann: no password; set \\${PASSWORD_ENV} or give --password-file"):
        resolve_auth("ann", environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="--password-file .*empty: expected the password on its first line"):
        resolve_auth("ann", tmp_path / "empty", environ={})
    with pytest.raises(ValueError, match="--password-file: expected --auth USER with it"):
        resolve_auth(None, tmp_path / "pw", environ={})
    assert resolve_auth(None, environ={PASSWORD_ENV: "x"}) == (None, None)


def test_failed_logins_wait_longer_each_time():
    guard = LoginGuard("ann", "s3cret", base=0.05, cap=0.2)
    assert inspect.iscoroutinefunction(guard.check)  # Gradio awaits it: a wait does not block the server

    async def attempts():
        waits = []
        for user, password in [("ann", "x"), ("ann", "y"), ("bob", "s3cret"), ("ann", "z"), ("ann", "s3cret")]:
            t0 = time.perf_counter()
            ok = await guard.check(user, password)
            waits.append((ok, time.perf_counter() - t0))
        return waits

    waits = asyncio.run(attempts())
    assert [ok for ok, _ in waits] == [False, False, False, False, True]
    for (_, took), expected in zip(waits, (0.05, 0.1, 0.2, 0.2)):
        assert expected <= took < expected + 0.5
    assert waits[-1][1] < 0.05 and guard.failures == 0  # a success answers at once and resets the count


def test_brush_and_canvas_follow_the_image(tmp_path):
    Image.new("RGB", (3000, 2000)).save(tmp_path / "big.png")
    bg = editor_background(str(tmp_path / "big.png"), 1024)
    assert bg.shape == (683, 1024, 3) and brush_radius(bg.shape) == 27
    assert brush_radius((48, 64)) == 2
    from svfseg.serve.page_events import BRUSH_COLOUR, editor_update

    update = editor_update(str(tmp_path / "big.png"), 25_000_000)
    assert update["value"]["background"].shape == (683, 1024, 3)
    assert update["brush"].default_size == 27 and update["brush"].default_color == BRUSH_COLOUR
    assert 0 < BRUSH_COLOUR[1] < 1  # translucent
    assert editor_background(str(tmp_path / "missing.png"), 1024) is None


def test_reads_the_source_json_the_demo_writes(ckpts, tmp_path):
    """The contract with `svfseg demo`: its own writer's SOURCE.json is what the page shows."""
    from svfseg.demo import _stable_checkpoint

    result = {"seeds": [0], "cells": [{"regime": r, "seed": 0, "status": "finished", "run_dir": str(ckpts[r].parent),
                                       "miou": m, "fb_iou": 0.55, "episodes": 1000, "fold": 0, "shot": 1}
                                      for r, m in (("svf", 0.412), ("frozen", 0.398))]}
    for regime, score in (("svf", "41.2%"), ("frozen", "39.8%")):
        rec = checkpoint_record(_stable_checkpoint(result, tmp_path / "demo", regime, Path("data/synthetic-5i")))
        assert rec.score_text == f"test mIoU {score} (FB-IoU 55.0%, 1000 episodes)" and rec.problem is None
        assert rec.regime == regime and rec.cell == str(ckpts[regime].parent)
        assert rec.data_text == "synthetic fold 0, 1-shot (data/synthetic-5i)"


def test_a_client_that_disconnects_mid_upload_is_one_line_not_a_traceback():
    """uvicorn logs starlette's ClientDisconnect (a browser gone mid-upload) with a traceback: serve drops it."""
    import logging
    import sys

    from svfseg.serve.cli import _drop_client_disconnects

    class ClientDisconnect(Exception):  # the name starlette.requests uses
        pass

    try:
        raise ClientDisconnect()
    except ClientDisconnect:
        info = sys.exc_info()
    gone = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", None, info)
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "boom", None, None)
    assert _drop_client_disconnects(gone) is False
    assert _drop_client_disconnects(other) is True
