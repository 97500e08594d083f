"""`svfseg serve` with "adapt to these supports": both masks side by side, the time it took, where its settings came from."""
import json

import numpy as np
import pytest
from PIL import Image

from serve_setup import cache, ckpts, inputs  # noqa: F401 (fixtures)
from svfseg.cli import main
from svfseg.serve.handlers import (DEFAULT_ADAPT_LR, DEFAULT_ADAPT_STEPS, ServeError, SupportSlot, run_request,
                                   summary_markdown)
from svfseg.serve.inputs import AdaptRequest, adapt_choices, adapt_request
from svfseg.serve.results_view import result_column


def test_adapting_shows_both_masks_and_the_time_and_matches_predict(ckpts, inputs, cache, tmp_path):
    slots = [SupportSlot(str(inputs["support"]), str(inputs["mask"]))]
    req = run_request(cache, [str(ckpts["svf"])], slots, [str(inputs["query"])], [str(inputs["gt"])], tmp_path / "r",
                      adapt=AdaptRequest("svf", steps=3, lr=0.05))
    run = req.runs[0]
    r = run.results[0]
    assert r.adapted is not None and r.adapted.mask.is_file() and r.adapted.iou is not None
    a = run.adaptation
    assert a["params"] == "svf" and a["steps"] == 3 and a["seconds"] > 0 and a["source"] == "given on the page"
    md = summary_markdown(req)
    assert "adapted: IoU" in md and "adapted svf (" in md and "3 steps at lr 0.05 (given on the page)" in md
    col = result_column(req, 0)
    assert col.columns == 4 and [c for _, c in col.items][2].startswith("adapted · query")
    # the same adaptation through `svfseg predict` gives the same adapted mask
    assert main(["predict", "--checkpoint", str(ckpts["svf"]), "--support", str(inputs["support"]),
                 str(inputs["mask"]), "--query", str(inputs["query"]), "--out", str(tmp_path / "p"),
                 "--adapt", "svf", "--adapt-steps", "3", "--adapt-lr", "0.05"]) == 0
    ours = np.array(Image.open(r.adapted.mask))
    theirs = np.array(Image.open(tmp_path / "p" / "query_mask.png"))
    assert (ours != theirs).mean() < 0.01  # the served model is merged (then decomposed again): float rounding only
    # the model the page serves without adaptation is untouched by it
    plain = run_request(cache, [str(ckpts["svf"])], slots, [str(inputs["query"])], [], tmp_path / "r2")
    np.testing.assert_array_equal(np.array(Image.open(plain.runs[0].results[0].mask)), np.array(Image.open(r.mask)))
    assert plain.runs[0].adaptation is None and plain.runs[0].results[0].adapted is None


def test_settings_come_from_the_page_then_the_record_then_the_defaults(ckpts, inputs, cache, tmp_path):
    slots = [SupportSlot(str(inputs["support"]), str(inputs["mask"]))]
    one = run_request(cache, [str(ckpts["frozen"])], slots, [str(inputs["query"])], [], tmp_path / "a",
                      adapt=AdaptRequest("head"))
    a = one.runs[0].adaptation
    assert (a["steps"], a["lr"]) == (DEFAULT_ADAPT_STEPS, DEFAULT_ADAPT_LR) and "not chosen on validation" in a["source"]
    # a SOURCE.json beside the checkpoint records the demo's choices (what `svfseg demo` writes after its stage 3)
    folder = tmp_path / "recorded"
    folder.mkdir()
    (folder / "best.pt").write_bytes(ckpts["frozen"].read_bytes())
    (folder / "SOURCE.json").write_text(json.dumps({"adapt": {"head": {"steps": 2, "lr": 0.002,
                                                                          "source": "chosen by svfseg demo"}}}))
    two = run_request(cache, [str(folder / "best.pt")], slots, [str(inputs["query"])], [], tmp_path / "b",
                      adapt=AdaptRequest("head"))
    b = two.runs[0].adaptation
    assert (b["steps"], b["lr"], b["source"]) == (2, 0.002, "chosen by svfseg demo")


def test_the_page_inputs_are_checked_in_one_line():
    assert adapt_request("none", None, None) is None and adapt_request(None, 5, 0.1) is None
    assert adapt_request("head+svf", 5, 0.01) == AdaptRequest("svf+head", 5, 0.01)
    assert [v for _, v in adapt_choices()][:2] == ["none", "svf"]
    for bad, says in ((("svd", None, None), "'svd' is not one of"), (("svf", 5.5, None), "expected steps"),
                      (("svf", 10_000, None), "expected steps"), (("svf", None, -1.0), "learning rate > 0")):
        with pytest.raises(ServeError, match=says):
            adapt_request(*bad)
