"""Issue 20 items 6-7: `compare --vary` rows (the SVF ablations) and the paper's fold layout of a compare."""
from __future__ import annotations

import pytest

from svfseg.compare import compare_markdown
from svfseg.compare.folds import fold_layout
from svfseg.compare.variants import Arm, expand_arms, folder_name, parse_vary


def _trains(regime):
    return regime != "frozen"


def test_vary_makes_one_row_per_value_of_the_named_regime():
    assert parse_vary("svf:svf.train=[S]|[U,S]") == ("svf", "svf.train", ["[S]", "[U,S]"])
    assert parse_vary("svf.stages=[layer4]|[layer2,layer3,layer4]")[0] is None
    arms = expand_arms(["frozen", "svf", "full"], "frozen", ["svf:svf.train=[S]|[U,S]|[S,V]"], _trains)
    assert arms == [Arm("frozen", "frozen"), Arm("svf[svf.train=[S]]", "svf", ("svf.train=[S]",)),
                    Arm("svf[svf.train=[U,S]]", "svf", ("svf.train=[U,S]",)),
                    Arm("svf[svf.train=[S,V]]", "svf", ("svf.train=[S,V]",)), Arm("full", "full")]
    # without REGIME: every regime that trains the backbone but the reference; two keys multiply
    arms = expand_arms(["frozen", "svf", "bn"], "frozen",
                       ["svf.stages=[layer4]|[layer3,layer4]", "optim.lr=0.01|0.1"], _trains)
    assert [a.label for a in arms][:3] == ["frozen", "svf[svf.stages=[layer4]; optim.lr=0.01]",
                                           "svf[svf.stages=[layer4]; optim.lr=0.1]"]
    assert len(arms) == 1 + 2 * 4
    assert folder_name("svf[svf.train=[U,S]]") == "svf_svf.train=U-S" and folder_name("svf") == "svf"
    for bad in ("svf.train", "=[S]", "svf.train=[S]|[S]", "svf.train=[S]||[U,S]"):
        with pytest.raises(ValueError, match="--vary"):
            expand_arms(["frozen", "svf"], "frozen", [bad], _trains)
    with pytest.raises(ValueError, match="not among"):
        expand_arms(["frozen", "svf"], "frozen", ["bn:svf.train=[S]|[U,S]"], _trains)
    with pytest.raises(ValueError, match="no regime to vary"):
        expand_arms(["frozen"], "frozen", ["svf.train=[S]|[U,S]"], _trains)


def _result():
    cells = []
    for shot in (1, 5):
        for fold in range(4):
            for seed in (0, 1):
                base = 0.50 + 0.01 * fold + 0.10 * (shot == 5)
                cells.append({"regime": "frozen", "seed": seed, "fold": fold, "shot": shot, "status": "finished",
                              "miou": base + 0.02 * seed})
                if not (shot == 5 and fold == 3):  # svf 5-shot fold 3 missing: no mean
                    cells.append({"regime": "svf", "seed": seed, "fold": fold, "shot": shot, "status": "finished",
                                  "miou": base + 0.05 + 0.04 * seed})
    return {"folds": [0, 1, 2, 3], "shots": [1, 5], "rows": {"frozen": {}, "svf": {}}, "cells": cells}


def test_fold_layout_is_the_papers_table_per_shot():
    layout = fold_layout(_result())
    fr = layout[1]["frozen"]
    assert [round(s.mean, 6) for s in fr["folds"].values()] == [51.0, 52.0, 53.0, 54.0]
    # sample std (n-1), as every results table: two values 2 apart -> sqrt(2)
    assert fr["folds"][0].std == pytest.approx(2 ** 0.5) and fr["mean"].mean == pytest.approx(52.5)
    assert fr["mean"].std == pytest.approx(2 ** 0.5) and fr["mean"].n == 2  # the seeds' fold-averages 51.5, 53.5
    assert layout[1]["svf"]["mean"].mean == pytest.approx(58.5)
    assert layout[5]["svf"]["folds"][3] is None and layout[5]["svf"]["mean"] is None
    lines = "\n".join(fold_layout_markdown_lines()).splitlines()
    assert "| 1-shot | fold 0 | fold 1 | fold 2 | fold 3 | mean |" in lines
    assert "| frozen | 51.00 ± 1.41 | 52.00 ± 1.41 | 53.00 ± 1.41 | 54.00 ± 1.41 | 52.50 ± 1.41 |" in lines  # sample std (n-1)
    assert "| svf | 67.00 ± 2.83 | 68.00 ± 2.83 | 69.00 ± 2.83 | – | – |" in lines


def fold_layout_markdown_lines():
    from svfseg.compare.folds import fold_layout_markdown

    return fold_layout_markdown(_result())


def test_compare_markdown_prints_the_fold_layout_beside_the_interval_table():
    res = _result()
    row = {"miou_mean": 0.5, "miou_std": 0.0, "fb_iou_mean": 0.6, "diff_to_reference": None, "trainable": {},
           "adapter_bytes": None, "seconds_per_step": 0.1, "peak_memory_bytes": None,
           "movement_max_stage_mean": None, "lr_mult": None, "verdict": None, "per_seed_miou": {"0": 0.5}}
    res.update(rows={"frozen": row, "svf": row}, regimes=["frozen", "svf"], reference="frozen", config="c.yaml",
               seeds=[0, 1], interval="paired t over seeds, 95%", sweeps={}, incomplete=[], diverged=[])
    md = compare_markdown(res)
    assert md.index("Δ mIoU vs frozen") < md.index("| 1-shot | fold 0 |") < md.index("| 5-shot | fold 0 |")


def _hand_count(conv: "nn.Conv2d", factors) -> int:
    """Trainable values of one decomposed conv, by hand: per group r = min(m, n); S g*r, U g*m*r, V g*r*n."""
    g = conv.groups
    m, n = conv.out_channels // g, conv.in_channels // g * conv.kernel_size[0] * conv.kernel_size[1]
    r = min(m, n)
    return sum({"S": g * r, "U": g * m * r, "V": g * r * n}[f] for f in factors)


def test_compare_varies_svf_train_counts_match_a_hand_count_and_merged_equals_unmerged(data_root, tmp_path):
    import json

    import torch
    from torch import nn

    from conftest import TINY_SIZE
    from svfseg.cli import main
    from svfseg.engine.model import load_for_inference
    from svfseg.models.backbones import create_backbone
    from svfseg.models.export import export_merged
    from test_compare import RECIPE

    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(RECIPE), "--regimes", "frozen,svf", "--seeds", "0", "--out", str(out),
                 "--vary", "svf:svf.train=[S]|[U,S]|[S,V]", "--test-episodes", "4", "--val-episodes", "4",
                 f"data.root={data_root}", f"data.train_crop={TINY_SIZE}", f"data.test_size={TINY_SIZE}",
                 "train.steps_per_epoch=2", "train.batch_size=2", "train.progress=false",
                 "svf.stages=[layer2]"]) == 0
    res = json.loads((out / "compare.json").read_text())
    labels = ["frozen", "svf[svf.train=[S]]", "svf[svf.train=[U,S]]", "svf[svf.train=[S,V]]"]
    assert list(res["rows"]) == labels and not res["incomplete"]
    plain = create_backbone("efficientnet_lite0")
    convs = [m for m in plain.layer2.modules() if type(m) is nn.Conv2d]
    md = (out / "compare.md").read_text()
    sizes = {}
    for label, factors in zip(labels[1:], (("S",), ("U", "S"), ("S", "V"))):
        row = res["rows"][label]
        hand = sum(_hand_count(c, factors) for c in convs)
        assert row["trainable"]["backbone"] == hand and row["trainable"]["svf"] == hand, label
        sizes[label] = row["adapter_bytes"]
        assert f"| {label} |" in md and f"({hand:,})" in md
        cell = next(c for c in res["cells"] if c["regime"] == label)
        model, _, _ = load_for_inference(f"{cell['run_dir']}/best.pt")
        model = model.double()             # merge in float64: the comparison is then float64-exact
        merged = export_merged(model)
        torch.manual_seed(0)
        q, s = torch.randn(1, 3, TINY_SIZE, TINY_SIZE), torch.randn(1, 1, 3, TINY_SIZE, TINY_SIZE)
        mask = (torch.rand(1, 1, TINY_SIZE, TINY_SIZE) > 0.5).long()
        args = (q.double(), s.double(), mask)
        with torch.no_grad():
            a, b = model.eval()(*args), merged.eval()(*args)
        a, b = (getattr(a, "logits", a), getattr(b, "logits", b))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    s_only, with_u, with_v = (sizes[k] for k in labels[1:])
    assert s_only < with_u and s_only < with_v  # the trained factors are in the adapter file
