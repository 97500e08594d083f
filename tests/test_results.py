"""One results layer: `svfseg compare` and `svfseg report` show the same mean ± std for the same runs."""

from __future__ import annotations

import math

import pytest

from svfseg.compare import ComparePlan, compare_markdown, summarize
from svfseg.report import report_table
from svfseg.results import STD_NOTE, mean_std, pct, seed_stats, summarize_runs

SCORES = {("frozen", 0): 0.40, ("frozen", 1): 0.43, ("svf", 0): 0.50, ("svf", 1): 0.54}


def _cell(regime: str, seed: int) -> dict:
    return {"regime": regime, "seed": seed, "fold": 0, "shot": 1, "lr_mult": None, "status": "finished",
            "run_dir": f"runs/{regime}_{seed}", "miou": SCORES[regime, seed], "fb_iou": SCORES[regime, seed] + 0.2,
            "train_seconds": 1.0, "seconds_per_step": 0.1, "peak_memory_bytes": None, "trainable": None,
            "adapter_bytes": None}


def _entry(regime: str, seed: int) -> dict:  # what report reads from each run's results.json (in %)
    return {"benchmark": "pascal", "backbone": "resnet50_deep", "model": "pfenet", "regime": regime, "shot": 1,
            "fold": 0, "miou": 100 * SCORES[regime, seed], "fb_iou": None, "file": f"{regime}{seed}.json",
            "train_seed": seed, "num_folds": 1}


def test_compare_and_report_print_the_same_std_for_the_same_runs():
    plan = ComparePlan(config="recipe.yaml", regimes=["frozen", "svf"], seeds=[0, 1])
    result = summarize(plan, [_cell(r, s) for r, s in SCORES], {})
    compare_md = compare_markdown(result)
    report_md = report_table([_entry(r, s) for r, s in SCORES], folds=1)
    for regime in ("frozen", "svf"):
        vals = [100 * SCORES[regime, s] for s in (0, 1)]
        sample_std = math.sqrt(sum((v - sum(vals) / 2) ** 2 for v in vals) / (2 - 1))
        shown = f"{sum(vals) / 2:.2f} ± {sample_std:.2f}"
        assert f"| {regime} | {shown} |" in compare_md
        method = "PFENet + SVF" if regime == "svf" else "PFENet"
        row = next(line for line in report_md.splitlines() if line.startswith(f"| pascal | resnet50 | {method} |"))
        assert shown in row, (shown, row)
    assert STD_NOTE in compare_md and STD_NOTE in report_md  # the headers say which std


def test_one_std_definition_and_one_percent_format():
    assert seed_stats([1.0, 2.0, 3.0]).std == pytest.approx(1.0)  # n-1
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert summarize_runs([1.0, 2.0, 3.0])["std"] == pytest.approx(1.0)
    assert seed_stats([5.0]).std == 0.0 and all(math.isnan(v) for v in mean_std([]))
    assert pct(0.61234) == "61.23" and pct(-0.01, signed=True) == "-1.00" and pct(float("nan")) == "–"
    assert pct(None) == "–" and pct(None, missing="n/a") == "n/a"
    # the web page's one-decimal figures with their unit, from the same function
    assert pct(0.41234, digits=1, unit="%") == "41.2%" and pct(0.05, digits=0, unit="%") == "5%"
    assert pct(0.5, True, digits=1, unit="%") == "+50.0%" and pct(None, missing="n/a", unit="%") == "n/a"
