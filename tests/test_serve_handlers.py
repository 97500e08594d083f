"""`svfseg serve` without a browser: the handlers the page calls, on tiny checkpoints; CLI glue."""
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_setup import cache, ckpts, inputs  # noqa: F401 (fixtures)
from svfseg.cli import main
from svfseg.serve import cli as serve_cli
from svfseg.serve.handlers import (ServeError, SupportSlot, foreground_iou, painted_mask, read_supports,
                                   run_request, summary_markdown)


def _png(path):
    return np.array(Image.open(path))


def _predict(ck, inputs, out, queries=("query", "query2")):
    assert main(["predict", "--checkpoint", str(ck), "--support", str(inputs["support"]), str(inputs["mask"]),
                 "--query", *[str(inputs[q]) for q in queries], "--out", str(out)]) == 0
    return out


def test_masks_equal_predict_and_model_is_loaded_once_merged(ckpts, inputs, cache, tmp_path):
    from svfseg.svf import svf_layers

    slots = [SupportSlot(str(inputs["support"]), str(inputs["mask"]))]
    queries = [str(inputs["query"]), str(inputs["query2"])]
    req = run_request(cache, [str(ckpts["svf"])], slots, queries, [], tmp_path / "r1")
    pred_dir = _predict(ckpts["svf"], inputs, tmp_path / "p")
    for r, stem in zip(req.runs[0].results, ("query", "other")):
        ours, theirs = _png(r.mask), _png(pred_dir / f"{stem}_mask.png")
        assert r.name == stem and ours.shape == (48, 64)
        np.testing.assert_array_equal(ours, theirs)
        assert 0.05 < r.foreground_fraction < 0.95  # a real mask, not all one class
        assert abs(r.foreground_fraction - (ours == 255).mean()) < 1e-9
        assert r.overlay.is_file() and _png(r.overlay).shape == (48, 64, 3)
    assert req.runs[0].load_seconds > 0 and req.shots == 1
    again = run_request(cache, [str(ckpts["svf"])], slots, queries, [], tmp_path / "r2")
    assert cache.loads == 1 and again.runs[0].load_seconds == 0
    loaded, fresh = cache.get(ckpts["svf"])
    assert not fresh and not list(svf_layers(loaded.model)) and not loaded.model.training  # merged, eval


def test_compare_two_checkpoints_and_zip(ckpts, inputs, cache, tmp_path):
    slots = [SupportSlot(str(inputs["support"]), str(inputs["mask"]))]
    req = run_request(cache, [str(ckpts["svf"]), str(ckpts["frozen"])], slots, [str(inputs["query"])], [],
                      tmp_path / "r")
    assert [run.label for run in req.runs] == ["svf-best", "frozen-best"]
    masks = [_png(run.results[0].mask) for run in req.runs]
    np.testing.assert_array_equal(masks[1], _png(_predict(ckpts["frozen"], inputs, tmp_path / "pf", ["query"])
                                                 / "query_mask.png"))
    assert (masks[0] != masks[1]).any()  # two different models: a swapped or duplicated column would show
    with zipfile.ZipFile(req.zip_path) as zf:
        assert sorted(zf.namelist()) == ["frozen-best/query_mask.png", "frozen-best/query_overlay.png",
                                         "svf-best/query_mask.png", "svf-best/query_overlay.png"]
        with zf.open("frozen-best/query_mask.png") as f:
            np.testing.assert_array_equal(np.array(Image.open(f)), masks[1])
    assert "svf-best" in summary_markdown(req) and "frozen-best" in summary_markdown(req)


def test_ground_truth_gives_iou(ckpts, inputs, cache, tmp_path):
    slots = [SupportSlot(str(inputs["support"]), str(inputs["mask"]))]
    req = run_request(cache, [str(ckpts["svf"])], slots, [str(inputs["query"]), str(inputs["query2"])],
                      [str(inputs["gt"])], tmp_path / "r")  # query_gt.png belongs to query.png
    r_q, r_other = req.runs[0].results
    pred, gt = _png(r_q.mask) == 255, _png(inputs["gt"]) == 255
    assert r_q.iou == pytest.approx((pred & gt).sum() / (pred | gt).sum()) and r_other.iou is None
    assert f"{100 * r_q.iou:.1f}%" in summary_markdown(req)
    assert foreground_iou(np.zeros((4, 4)), np.zeros((4, 4))) is None
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "query_mask.png")
    with pytest.raises(ServeError, match=r"query_mask.png\): mask is 10x10 but the query is 64x48 \(width x height\)"):
        run_request(cache, [str(ckpts["svf"])], slots, [str(inputs["query"])], [str(tmp_path / "query_mask.png")],
                    tmp_path / "r2")
    with pytest.raises(ServeError, match="ground truth support_mask.png: no query named 'support'"):
        run_request(cache, [str(ckpts["svf"])], slots, [str(inputs["query"]), str(inputs["query2"])],
                    [str(inputs["mask"])], tmp_path / "r3")


def test_painted_strokes_are_a_mask(ckpts, inputs, cache, tmp_path):
    fg = _png(inputs["mask"]) == 255
    layer = np.zeros((48, 64, 4), np.uint8)
    layer[fg] = (255, 48, 48, 255)
    assert painted_mask({"background": None, "layers": [np.zeros_like(layer)], "composite": None}) is None
    np.testing.assert_array_equal(painted_mask({"layers": [layer]}), fg)
    painted = SupportSlot(str(inputs["support"]), painted=painted_mask({"layers": [layer]}))
    uploaded = SupportSlot(str(inputs["support"]), str(inputs["mask"]))
    a = run_request(cache, [str(ckpts["svf"])], [painted], [str(inputs["query"])], [], tmp_path / "a")
    b = run_request(cache, [str(ckpts["svf"])], [uploaded], [str(inputs["query"])], [], tmp_path / "b")
    np.testing.assert_array_equal(_png(a.runs[0].results[0].mask), _png(b.runs[0].results[0].mask))
    # both given: the uploaded mask is used, and the summary says so
    tiny = np.zeros((48, 64), bool)
    tiny[:3, :3] = True  # strokes that would give another mask
    both = SupportSlot(str(inputs["support"]), str(inputs["mask"]), painted=tiny)
    c = run_request(cache, [str(ckpts["svf"])], [both], [str(inputs["query"])], [], tmp_path / "c")
    np.testing.assert_array_equal(_png(c.runs[0].results[0].mask), _png(b.runs[0].results[0].mask))
    assert "support 1 used its uploaded mask support_mask.png, not the painted strokes" in summary_markdown(c)
    assert "painted" not in summary_markdown(b)
    # strokes on a canvas of another scale are resized to the image
    big = np.kron(fg, np.ones((2, 2), bool))
    _, masks = read_supports([SupportSlot(str(inputs["support"]), painted=big)])
    np.testing.assert_array_equal(masks[0], fg.astype(np.uint8))


def test_bad_inputs_are_one_line_errors_naming_the_input(ckpts, inputs, cache, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    sup, msk, q = str(inputs["support"]), str(inputs["mask"]), [str(inputs["query"])]
    ck = [str(ckpts["svf"])]
    cases = [
        (ck, [SupportSlot(sup, str(inputs["empty"]))], q, r"support 1 mask \(empty.png\): the support mask has no "
                                                            r"foreground pixel"),
        (ck, [SupportSlot(sup, str(tmp_path / "small.png"))], q, r"support 1 mask \(small.png\): mask is 20x20 but "
                                                                 r"its support image is 64x48 \(width x height\)"),
        (ck, [SupportSlot(str(tmp_path / "broken.png"), msk)], q, r"support 1 image \(broken.png\): cannot read it"),
        (ck, [SupportSlot(sup, msk)], [str(tmp_path / "broken.png")], r"query \(broken.png\): cannot read it"),
        (ck, [SupportSlot(sup)], q, "support 1: no mask; upload its mask or paint"),
        (ck, [SupportSlot(), SupportSlot(mask=msk)], q, "support 2: a mask but no image"),
        (ck, [SupportSlot()], q, "no support"),
        (ck, [SupportSlot(sup, msk)] * 6, q, "6 supports given; at most 5"),
        (ck, [SupportSlot(sup, msk)], [], "no query"),
        ([str(tmp_path / "garbage.pt")], [SupportSlot(sup, msk)], q, r"checkpoint .*garbage.pt does not load"),
    ]
    cache.get(ckpts["svf"])
    loads = cache.loads
    for cks, slots, queries, message in cases:
        with pytest.raises(ServeError, match=message) as e:
            run_request(cache, cks, slots, queries, [], tmp_path / "r")
        assert "\n" not in str(e.value) and str(tmp_path / "broken.png") not in str(e.value)
    assert cache.loads == loads  # the broken checkpoint is not kept


def test_k_shot_uses_every_support(ckpts, inputs, cache, tmp_path):
    slots = [SupportSlot(str(inputs["support"]), str(inputs["mask"])), SupportSlot(),
             SupportSlot(str(inputs["query"]), str(inputs["gt"]))]
    req = run_request(cache, [str(ckpts["svf"])], slots, [str(inputs["query2"])], [], tmp_path / "r")
    assert req.shots == 2 and "2-shot" in summary_markdown(req)
    assert main(["predict", "--checkpoint", str(ckpts["svf"]), "--support", str(inputs["support"]),
                 str(inputs["mask"]), "--support", str(inputs["query"]), str(inputs["gt"]), "--query",
                 str(inputs["query2"]), "--out", str(tmp_path / "p")]) == 0
    np.testing.assert_array_equal(_png(req.runs[0].results[0].mask), _png(tmp_path / "p" / "other_mask.png"))


def test_cli_defaults_and_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/demo/svf/best.pt does not exist .*make demo.*svfseg train"):
        serve_cli.resolve_checkpoints(None)
    for p in serve_cli.DEFAULT_CHECKPOINTS[:1]:
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    assert serve_cli.resolve_checkpoints(None) == [serve_cli.DEFAULT_CHECKPOINTS[0]]
    with pytest.raises(FileNotFoundError, match="--checkpoint: no such file: nope.pt"):
        serve_cli.resolve_checkpoints([Path("nope.pt")])
    assert serve_cli.parse_auth("ann:s3:cret") == ("ann", "s3:cret") and serve_cli.parse_auth(None) is None
    with pytest.raises(ValueError, match="--auth: expected USER:PASS"):
        serve_cli.parse_auth("ann")
    assert serve_cli.host_warning("127.0.0.1", None) is None
    assert "no authentication" in serve_cli.host_warning("0.0.0.0", None)
    assert "plain HTTP" in serve_cli.host_warning("0.0.0.0", ("a", "b"))
    assert main(["serve", "--checkpoint", "nope.pt"]) == 1
    assert "no such file: nope.pt" in capsys.readouterr().err
    # without gradio: one line saying how to install it
    real = serve_cli.importlib.util.find_spec
    monkeypatch.setattr(serve_cli.importlib.util, "find_spec", lambda n, *a: None if n == "gradio" else real(n, *a))
    assert main(["serve"]) == 1
    assert capsys.readouterr().err.strip() == "svfseg serve: the web app needs gradio: pip install 'svfseg[serve]'"


def test_gradio_is_imported_only_by_serve():
    code = ("import sys, svfseg, svfseg.cli, svfseg.serve.cli, svfseg.serve.handlers; svfseg.cli.build_parser(); "
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
