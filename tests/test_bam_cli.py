"""BAM end to end through the CLI on a tiny synthetic set: stage 1, stage 2 (SVF), test, bad stage-1 input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from svfseg.cli import main
from svfseg.data import generate_synthetic
from svfseg.engine import checkpoint as ckpt
from svfseg.models.backbones import list_backbones, register_backbone
from test_models import TinyBackbone


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
TINY = "tiny_bam_cli"  # a registered stand-in backbone keeps the CLI run fast (the recipes are unchanged)
if TINY not in list_backbones():
    register_backbone(TINY, lambda: TinyBackbone())


@pytest.mark.slow
def test_two_stage_run_writes_both_checkpoints_and_results(tmp_path, capsys):
    root = generate_synthetic(tmp_path / "syn", seed=4, n_train=80, n_val=60, size=64, workers=1)
    common = [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "data.train_crop=64", "data.test_size=64",
              "train.batch_size=2", "train.steps_per_epoch=2", "train.epochs=1", "train.progress=false",
              "train.tensorboard=false", "model.weights=null", "data.protocol=pfenet",
              f"model.backbone={TINY}"]
    assert main(["train", "--config", str(CONFIGS / "bam_base_efficientnet_lite0.yaml"), *common]) == 0
    stage1 = tmp_path / "runs" / f"synthetic_bam_base_{TINY}_train_fold0_1shot"
    s1 = ckpt.load(stage1 / "best.pt")
    assert s1["describe"]["name"] == "bam_base" and s1["describe"]["num_classes"] == 16
    assert "miou" in s1["metrics"]

    assert main(["test", "--checkpoint", str(stage1 / "best.pt")]) == 0
    base_result = json.loads((stage1 / "test_base" / "results.json").read_text())
    assert base_result["images"] == 60 and set(base_result["per_class"]) == {str(c) for c in range(6, 21)}

    stage2_args = ["--config", str(CONFIGS / "bam_efficientnet_lite0.yaml"), *common, "train.val_episodes=4",
                   "model.head={reduce_dim: 16}"]
    # wrong fold: its stage-1 checkpoint does not exist -> clear error before training
    assert main(["train", *stage2_args, "fold=1", "name=wrong_fold"]) == 1
    assert "fold1_1shot/best.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "wrong_fold" / "last.pt").exists()

    assert main(["train", *stage2_args]) == 0
    stage2 = tmp_path / "runs" / f"synthetic_bam_{TINY}_svf_fold0_1shot"
    s2 = ckpt.load(stage2 / "best.pt")
    assert s2["describe"]["name"] == "bam" and s2["describe"]["regime"] == "svf"
    assert any(k.startswith("base_learner.cls.") for k in s2["model"])

    assert main(["test", "--checkpoint", str(stage2 / "best.pt"), "eval.num_episodes=4", "eval.seeds=[0]"]) == 0
    out = capsys.readouterr().out
    results = list(stage2.glob("test_*/results.json"))
    assert results and json.loads(results[0].read_text())["model"] == "bam", out
    unmerged = json.loads(results[0].read_text())["summary"]

    merged = tmp_path / "merged.pt"  # SVF folded back into the meta backbone; the base learner is untouched
    assert main(["merge", "--checkpoint", str(stage2 / "best.pt"), "--out", str(merged)]) == 0
    assert main(["test", "--checkpoint", str(merged), "eval.num_episodes=4", "eval.seeds=[0]",
                 "--out", str(tmp_path / "merged_test")]) == 0
    merged_summary = json.loads((tmp_path / "merged_test" / "results.json").read_text())["summary"]
    for key in ("miou", "fb_iou"):
        assert merged_summary[key]["mean"] == pytest.approx(unmerged[key]["mean"], abs=1e-6)

    assert main(["test", "--checkpoint", str(stage2 / "best.pt"), "--generalized", "eval.num_episodes=6"]) == 0
    gen = json.loads((stage2 / "test_generalized_1shot" / "results.json").read_text())
    assert gen["setting"] == "generalized" and gen["episodes"] == 6 and "miou_novel" in gen
