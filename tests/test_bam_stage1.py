"""BAM stage 1: base-class semantic data, the confusion-matrix metric, the training loop, stage-1 checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from svfseg.config import load_config
from svfseg.data import generate_synthetic
from svfseg.data.io import read_label
from svfseg.data.semantic import base_label_lut, build_semantic_dataset
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.loop import fit
from svfseg.engine.state import TrainingState
from svfseg.engine.model import describe, load_dependencies, preflight
from svfseg.engine.tasks import EvalSet, SemanticTask
from svfseg.engine.tasks.semantic import evaluate_semantic as evaluate_base
from svfseg.metrics import ConfusionMatrix
from svfseg.models import create_model, model_recipe
from svfseg.engine.resolved import resolve_run
from svfseg.models.heads.bam_recipe import stage1_differences
from test_models import TinyBackbone


def model_kwargs(cfg):
    """The constructor keywords the model's recipe derives from the config (through the engine's run facts)."""
    return model_recipe(cfg.model.name).model_kwargs(resolve_run(cfg).facts)


def load_base_learner_state(cfg):
    """The stage-1 state dict a BAM run is built from (read and checked by the engine)."""
    return load_dependencies(resolve_run(cfg))["base_state"]


def fit_base(cfg, model, train, *, run_dir, describe, val_set=None, resume_state=None):
    state = TrainingState(cfg, model, run_dir=run_dir, describe=describe, train_items=len(train),
                          resume_from=resume_state)
    return fit(cfg, state, train, task=SemanticTask(), val=EvalSet(val_set, on="base_val") if val_set is not None else None)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "s", seed=1, n_train=24, n_val=6, size=64, workers=1)


def base_cfg(root, tmp, *extra):
    return load_config(CONFIGS / "synthetic" / "bam_base_efficientnet_lite0.yaml", [
        f"data.root={root}", "data.train_crop=64", "data.test_size=64", "train.batch_size=4",
        "train.steps_per_epoch=2", "train.epochs=1", "train.progress=false", "train.tensorboard=false",
        f"output_dir={tmp}", "model.weights=null", *extra])


def test_labels_are_base_channels_and_novel_pixels_background(root):
    lut = base_label_lut(range(6, 21), 20)
    assert lut[0] == 0 and lut[255] == 255 and lut[1:6].tolist() == [0] * 5 and lut[6:21].tolist() == list(range(1, 16))
    val = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="val", test_size=64)
    assert val.num_classes == 16 and len(val) == 6
    novel_seen = False
    for i in range(len(val)):
        item = val[i]
        r = val.index.records[val.positions[i]]
        raw = read_label(root / r.label)
        novel_seen |= bool(np.isin(raw, range(1, 6)).any())
        assert torch.equal(item["label_orig"], torch.from_numpy(lut[raw].astype(np.int64)))
        assert item["image"].shape == (3, 64, 64) and tuple(item["valid_hw"]) == raw.shape
    assert novel_seen  # the check above did see novel pixels turned into background
    train = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="train", train_crop=48)
    train.set_epoch(3)
    a, b = train[2], train[2]
    assert torch.equal(a["label"], b["label"]) and a["image"].shape == (3, 48, 48)  # seeded by (seed, epoch, index)
    assert set(a["label"].unique().tolist()) <= set(range(16)) | {255}
    dagger = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="train", protocol="dagger")
    kept = [dagger.index.records[p] for p in dagger.positions]
    assert 0 < len(kept) < len(train) and not any(set(r.counts) & set(range(1, 6)) for r in kept)


def test_confusion_matrix_scores_by_hand():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm.update(pred, target)
    r = cm.compute(class_ids=[7, 9])
    # class 1: inter 2, union 3; class 2: inter 1, union 2; background: inter 2, union 4
    assert r["per_class"] == {7: pytest.approx(2 / 3), 9: pytest.approx(1 / 2)}
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["bg_iou"] == pytest.approx(2 / 4)
    # foreground (any class) vs background: fg inter 4 (rows/cols 1..2), fg union 7 - 2 = 5
    assert r["fb_iou"] == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="label values outside"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 0]]))


def test_fit_base_writes_checkpoints_and_base_miou(root, tmp_path):
    cfg = base_cfg(root, tmp_path)
    assert model_kwargs(cfg) == {"num_classes": 16}
    torch.manual_seed(0)
    model = create_model("bam_base", backbone=TinyBackbone(), regime="full", hidden=32, **model_kwargs(cfg))
    train = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="train", train_crop=64)
    val = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="val", test_size=64)
    run = tmp_path / "stage1"
    res = fit_base(cfg, model, train, run_dir=run, describe=describe(model, resolve_run(cfg)), val_set=val)
    assert res.status == "finished" and res.step == 2
    best = ckpt.load(run / "best.pt")
    assert best["describe"]["name"] == "bam_base" and best["describe"]["num_classes"] == 16
    assert math.isfinite(best["metrics"]["miou"])
    assert set(best["metrics"]["per_class"]) == {str(c) for c in range(6, 21)}
    last = ckpt.load(run / "last.pt")
    assert last["status"] == "finished" and "optimizer" in last
    assert (run / "val_log.csv").read_text().count("base_val") == 1
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["model"] == "bam_base" and summary["task"] == "semantic" and summary["step"] == 2
    r = evaluate_base(model, val, device=torch.device("cpu"))
    assert r["images"] == 6 and r["miou"] == pytest.approx(best["metrics"]["miou"])


def _stage1_checkpoint(tmp_path, cfg, num_classes=16, fold=0):
    model = create_model("bam_base", backbone=TinyBackbone(), regime="full", num_classes=num_classes)
    d = describe(model, resolve_run(cfg))
    d["fold"] = fold
    path = tmp_path / f"fold{fold}" / "best.pt"
    ckpt.save_atomic({"model": model.state_dict(), "describe": d, "config": {"data": {"convention": "interleaved"}},
                      "step": 2}, path)
    return model, path


def test_stage2_refuses_missing_or_incompatible_stage1_checkpoint(root, tmp_path):
    cfg = base_cfg(root, tmp_path)
    cfg.model.backbone = "tiny"  # the stand-in backbone's name
    model, _ = _stage1_checkpoint(tmp_path, cfg)
    _stage1_checkpoint(tmp_path, cfg, num_classes=11, fold=1)
    cfg.model.name = "bam"
    with pytest.raises(ValueError, match="model.base_checkpoint is not set"):
        load_base_learner_state(cfg)
    cfg.model.base_checkpoint = str(tmp_path / "fold{fold}" / "best.pt")
    state = load_base_learner_state(cfg)  # fold 0: fits
    bam = create_model("bam", backbone=TinyBackbone(seed=3), base_state=state, reduce_dim=8,
                       **model_kwargs(cfg))
    x = torch.randn(1, 3, 33, 33)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bam.base_learner(x), model(x))
    cfg.fold = 1  # fold 1's file was made for another class count and declares fold 1: only the count differs
    msg = r"num_classes \(background \+ base\): checkpoint has 11, this run needs 16"
    with pytest.raises(ckpt.CheckpointMismatch, match=msg):
        load_base_learner_state(cfg)
    with pytest.raises(ckpt.CheckpointMismatch, match="checkpoint has 11"):
        preflight(resolve_run(cfg))  # the fail-fast check (lazy read) finds the same
    cfg.fold = 2
    with pytest.raises(FileNotFoundError, match=r"fold2/best.pt does not exist.*bam_base_<backbone>.yaml fold=2"):
        load_base_learner_state(cfg)
    stage1 = ckpt.load(tmp_path / "fold0" / "best.pt")
    cfg.fold, cfg.model.backbone = 3, "resnet50_deep"
    diffs = stage1_differences(stage1, resolve_run(cfg).facts)
    assert any(d.startswith("fold: checkpoint has 0, this run needs 3") for d in diffs)
    assert any(d.startswith("backbone: checkpoint has 'tiny'") for d in diffs)


def test_fit_base_killed_and_resumed_ends_with_the_same_weights(root, tmp_path):
    def run(name, stop=None, resume=None):
        cfg = base_cfg(root, tmp_path, "train.val_every=0", "train.steps_per_epoch=3", "train.batch_size=2",
                       *([f"train.stop_after_steps={stop}"] if stop else []))
        torch.manual_seed(0)
        model = create_model("bam_base", backbone=TinyBackbone(), regime="full", hidden=16, **model_kwargs(cfg))
        train = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="train", train_crop=48)
        state = ckpt.load(tmp_path / resume / "last.pt") if resume else None
        res = fit_base(cfg, model, train, run_dir=tmp_path / (resume or name), describe=describe(model, resolve_run(cfg)),
                       resume_state=state)
        return res, model

    full, full_model = run("full")
    part, _ = run("killed", stop=1)
    assert part.status == "interrupted" and part.step == 1
    assert ckpt.load(tmp_path / "killed" / "last.pt")["status"] == "interrupted"
    resumed, resumed_model = run(None, resume="killed")
    assert resumed.status == "finished" and resumed.step == full.step == 3
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_fit_base_refuses_one_image_per_batch_when_bn_trains(root, tmp_path):
    cfg = base_cfg(root, tmp_path, "train.batch_size=1")
    model = create_model("bam_base", backbone=TinyBackbone(), regime="full", hidden=16, **model_kwargs(cfg))
    train = build_semantic_dataset(root=root, benchmark="synthetic", fold=0, split="train", train_crop=48)
    with pytest.raises(ValueError, match="needs >= 2 images per process"):
        fit_base(cfg, model, train, run_dir=tmp_path / "one", describe=describe(model, resolve_run(cfg)))
