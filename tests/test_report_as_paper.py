"""Issue 20 item 2: each report row names its statistic; `report --as-paper` recomputes the paper's from the logs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from svfseg.cli import main
from svfseg.report import report


def _run(root, name, *, fold, miou_runs, history=None, protocol="bam", model="pfenet"):
    """A run folder as `svfseg train` + `svfseg test` leave it: train_summary.json and test_*/results.json."""
    run = root / name
    (run / f"test_{protocol}_1shot").mkdir(parents=True)
    if history is not None:
        (run / "train_summary.json").write_text(json.dumps({"status": "finished", "history": history}))
    runs = [{"seed": s, "miou": m, "fb_iou": m + 0.1} for s, m in enumerate(miou_runs)]
    mean = sum(miou_runs) / len(miou_runs)
    (run / f"test_{protocol}_1shot" / "results.json").write_text(json.dumps({
        "checkpoint": str(run / "best.pt"), "benchmark": "pascal", "backbone": "resnet50_deep", "model": model,
        "regime": "svf", "shot": 1, "fold": fold, "protocol": protocol, "train_seed": 0, "runs": runs,
        "summary": {"miou": {"mean": mean}, "fb_iou": {"mean": mean + 0.1}}}))
    return run


def _row(text, method):
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[2] == method:
            return cells
    raise AssertionError(f"no row {method!r} in\n{text}")


def test_rows_name_their_statistic_and_as_paper_takes_the_max_validation_or_the_best_seed(tmp_path):
    val = [{"step": s, "on": "test_fold", "miou": m, "fb_iou": m + 0.2}
           for s, m in ((10, 0.50), (20, 0.62), (30, 0.58))]
    val.append({"step": 40, "on": "base_heldout", "miou": 0.99, "fb_iou": 0.99})  # not the test fold: ignored
    runs = [_run(tmp_path, f"pf{f}", fold=f, miou_runs=[0.60, 0.61, 0.62, 0.63, 0.64], history=val)
            for f in range(4)]
    bam = [_run(tmp_path, f"bam{f}", fold=f, miou_runs=[0.60, 0.61, 0.62, 0.63, 0.64], model="bam")
           for f in range(4)]
    none = _run(tmp_path, "one_seed", fold=0, miou_runs=[0.3], protocol="hsnet", model="baseline")

    ours = report([*runs, *bam, none])
    row = _row(ours, "PFENet + SVF")
    assert row[3] == "62.00 / 69.27" and row[-1] == "mean over 5 test seed(s) (bam)"
    assert _row(ours, "baseline + SVF")[-1] == "mean over 1 test seed(s) (hsnet)"

    paper = report([*runs, *bam, none], as_paper=True)
    row = _row(paper, "PFENet + SVF")
    # the max of the 3 test-fold validations (62), its FB-IoU (82), whatever the test seeds gave
    assert row[3:9] == ["62.00 / 69.27", "62.00 / 73.55", "62.00 / 67.49", "62.00 / 62.30", "62.00", "82.00"]
    assert row[-1] == "max over 3 validations on the test fold (optimistic)"
    row = _row(paper, "BAM + SVF")  # no training log: BAM's best of its 5 test seeds
    assert row[3] == "64.00 / 69.38" and row[8] == "74.00" and row[-1] == "best of 5 test seeds (optimistic)"
    assert "baseline + SVF" not in paper and "optimistic" in paper.splitlines()[-1]


def test_as_paper_without_logs_is_a_one_line_error(tmp_path, capsys):
    run = _run(tmp_path, "one_seed", fold=0, miou_runs=[0.3], protocol="hsnet")
    with pytest.raises(ValueError, match="as-paper"):
        report([run], as_paper=True)
    assert main(["report", str(run), "--as-paper"]) == 1
    assert "as-paper" in capsys.readouterr().err


def test_as_paper_names_the_validation_settings_of_the_recipe(tmp_path):
    # a PFENet Pascal run validates as PFENet's train.py: every 2 epochs on 5,000 episodes at seed 321
    from svfseg.config import dump_yaml, load_config
    from svfseg.report.statistic import paper_statistic

    val = [{"step": s, "on": "test_fold", "miou": m, "fb_iou": m} for s, m in ((10, 0.5), (20, 0.6))]
    runs = [_run(tmp_path, f"pf{f}", fold=f, miou_runs=[0.6], history=val) for f in range(4)]
    recipe = Path(__file__).resolve().parents[1] / "src/svfseg/configs/pascal/pfenet_resnet50.yaml"
    for run in runs:
        (run / "config.yaml").write_text(dump_yaml(load_config(recipe)))
    res = runs[0] / "test_bam_1shot" / "results.json"
    stat = paper_statistic(json.loads(res.read_text()), res)["statistic"]
    assert stat == "max over 2 validations on the test fold (5,000 episodes at seed 321, every 2 epoch(s); optimistic)"
    bam = Path(__file__).resolve().parents[1] / "src/svfseg/configs/coco/svf_authors/bam_resnet50.yaml"
    (runs[1] / "config.yaml").write_text(dump_yaml(load_config(bam)))
    res = runs[1] / "test_bam_1shot" / "results.json"
    assert paper_statistic(json.loads(res.read_text()), res)["statistic"] == (
        "max over 2 validations on the test fold (1,000 episodes at seed 321, every 1 epoch(s) and half-way through "
        "each; optimistic)")
    assert "5,000 episodes at seed 321" in report(runs, as_paper=True)
