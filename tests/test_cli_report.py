"""`svfseg report`: the paper's table layout, with the paper's numbers beside ours."""
import json

import pytest

from svfseg.cli import main
from svfseg.report.paper import paper_backbone, paper_result
from svfseg.report import report_table


def entry(fold, shot, miou, regime="svf", backbone="resnet50_deep", model="pfenet"):
    return {"benchmark": "pascal", "backbone": backbone, "model": model, "regime": regime, "shot": shot,
            "fold": fold, "miou": miou, "file": f"f{fold}{shot}"}


def test_paper_table_layout_and_numbers():
    entries = [entry(f, 1, 60.0 + f) for f in range(4)] + [entry(0, 5, 70.0), entry(1, 5, 72.0)]
    entries += [entry(f, 1, 50.0, regime="frozen", backbone="vgg16_bn", model="baseline") for f in range(4)]
    lines = report_table(entries).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["benchmark", "backbone", "method"]
    assert header[3:10] == ["1-shot f0", "1-shot f1", "1-shot f2", "1-shot f3", "1-shot mean", "1-shot FB-IoU",
                            "paper"]
    assert header[10:17] == ["5-shot f0", "5-shot f1", "5-shot f2", "5-shot f3", "5-shot mean", "5-shot FB-IoU",
                             "paper"]
    assert header[17] == "seeds"
    rows = {tuple(c.strip() for c in l.strip("|").split("|"))[2]: [c.strip() for c in l.strip("|").split("|")]
            for l in lines[2:] if l.startswith("| pascal")}
    pf = rows["PFENet + SVF"]
    assert pf[1] == "resnet50"
    assert pf[3:10] == ["60.00 / 69.27", "61.00 / 73.55", "62.00 / 67.49", "63.00 / 62.30", "61.50", "–",
                        "68.15"]
    assert pf[10:18] == ["70.00", "72.00", "–", "–", "(2/4 folds)", "(2/4 folds)", "71.82", "1"]
    base = rows["baseline"]
    assert base[1] == "vgg16" and (base[7], base[9]) == ("50.00", "60.15")


def test_paper_lookup():
    assert paper_backbone("resnet101_deep") == "resnet101" and paper_backbone("vgg16_bn") == "vgg16"
    assert paper_result("coco", "resnet50", "bam", True, 5) == pytest.approx(53.87)
    assert paper_result("pascal", "resnet50", "bam", True, 1, fold=1) == pytest.approx(74.51)
    assert paper_result("pascal", "resnet101", "pfenet", True, 1) is None


def test_report_cli_reads_results_files(tmp_path, capsys):
    for fold in range(4):
        d = tmp_path / f"run{fold}" / "test_bam_1shot"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "benchmark": "coco", "backbone": "resnet50_deep", "model": "baseline", "regime": "svf", "shot": 1,
            "fold": fold, "protocol": "bam", "summary": {"miou": {"mean": 0.4 + 0.01 * fold}}}))
    out = tmp_path / "table.md"
    assert main(["report", *[str(tmp_path / f"run{f}") for f in range(4)], "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| coco | resnet50 | baseline + SVF | 40.00 | 41.00 | 42.00 | 43.00 | 41.50 | – | 43.72 |" in text
    assert out.read_text().strip() == text.strip()
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_training_seeds_are_averaged_with_std_and_fb_iou():
    def e(fold, seed, miou, fb):
        return {**entry(fold, 1, miou), "train_seed": seed, "fb_iou": fb, "file": f"s{seed}f{fold}"}

    entries = [e(f, s, 60.0 + 2 * s, 70.0 + s) for f in range(4) for s in (1, 2)]
    cells = [c.strip() for c in report_table(entries).splitlines()[2].strip("|").split("|")]
    assert cells[3] == "63.00 ± 1.41 / 69.27"  # 62 and 64 over the two seeds; sample std (n-1): sqrt(2)
    assert cells[7:10] == ["63.00 ± 1.41", "71.50 ± 0.71", "68.15"] and cells[-2] == "2"  # then "statistic"
    # The same training seed tested twice is one result (the later file), not a second seed.
    cells = [c.strip() for c in report_table(entries + [e(0, 1, 10.0, 20.0)]).splitlines()[2].strip("|").split("|")]
    assert cells[3].startswith("37.00 ± 38.18") and cells[-2] == "2"  # 10 and 64: 27 * sqrt(2)
