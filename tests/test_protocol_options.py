"""PFENet/BAM options of the protocol: upstream test geometry, BAM's half-epoch validation and early stop."""
from __future__ import annotations

import numpy as np
import torch

from svfseg.data import transforms
from svfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from svfseg.engine.evaluator import predictions_at_original_size
from svfseg.engine.loop import fit
from svfseg.engine.state import TrainingState
from svfseg.engine.tasks import FewShotTask, ValResult, EvalSet
from test_engine_toys import ToyEval, ToyFewShot, ToyTrain, toy_config


def test_upstream_test_transform_floors_to_8_and_pads_black():
    image = np.full((50, 100, 3), 200, np.uint8)
    label = np.ones((50, 100), np.uint8)
    img, lbl, valid = transforms.TestTransform(size=60, upstream=True)(image, label)
    assert valid == (24, 56)          # 30 x 60 after the resize, both floored to a multiple of 8
    black = -IMAGENET_MEAN / IMAGENET_STD  # a raw 0 pixel after normalisation
    np.testing.assert_allclose(img[:, 40, 10], black, rtol=1e-6)
    np.testing.assert_allclose(img[:, 10, 58], black, rtol=1e-6)
    assert (lbl[:24, :56] == 1).all() and (lbl[24:] == 255).all() and (lbl[:, 56:] == 255).all()
    img0, _, valid0 = transforms.TestTransform(size=60)(image, label)
    assert valid0 == (30, 60) and np.allclose(img0[:, 40, 10], 0.0)  # default: mean colour, no flooring


def test_upstream_scoring_upsamples_the_whole_square_with_align_corners():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :, 2:] = 1.0             # foreground on the right half of the padded square
    pred = predictions_at_original_size(logits, torch.tensor([[2, 4]]), [(5, 7)], upstream=True)[0]
    # 4x4 -> 7x7 with align_corners, then the label's 5x7 top-left: the right 3 columns are
    # foreground (column 3 of 7 lies half way between input columns 1 and 2: a tie, background).
    assert pred.shape == (5, 7) and pred[:, 4:].all() and not pred[:, :3].any()
    default = predictions_at_original_size(logits, torch.tensor([[2, 4]]), [(5, 7)])[0]
    assert default.shape == (5, 7)        # crop 2x4 first, then resize: another geometry


class FixedScore(FewShotTask):
    """Validation always returns the same score, so only the first validation is a 'best'."""

    def validate(self, model, val, cfg, info):
        return ValResult(row={"on": "test_fold", "miou": 0.5, "fb_iou": 0.5, "episodes": 1},
                         best={"on": "test_fold", "miou": 0.5}, message=("step %d: val%s",))


def _run(tmp_path, name, *extra):
    cfg = toy_config(tmp_path, f"name={name}", *extra)
    torch.manual_seed(0)
    model = ToyFewShot()
    state = TrainingState(cfg, model, run_dir=tmp_path / name, describe=model.describe(), train_items=len(ToyTrain()))
    return fit(cfg, state, ToyTrain(), task=FixedScore(), val=EvalSet(ToyEval(2), (1, 2)))


def test_half_epoch_validation_on_short_schedules(tmp_path):
    res = _run(tmp_path, "half", "train.half_epoch_val_max_epochs=100")
    # 4 steps per epoch: ends of epochs at 4, 8, 12; half way (after round(4/2)+1 = 3 steps) in
    # every epoch but the first: 7 and 11.
    assert [h["step"] for h in res.history] == [4, 7, 8, 11, 12]
    long = _run(tmp_path, "long", "train.half_epoch_val_max_epochs=2")  # 3 epochs > 2: off
    assert [h["step"] for h in long.history] == [4, 8, 12]


def test_early_stop_once_the_best_score_is_old(tmp_path):
    res = _run(tmp_path, "stop", "train.early_stop_epochs=1", "train.epochs=5")
    # best at step 4 (end of epoch 0); epoch 1 brings nothing better; epoch 2 does not start.
    assert res.status == "finished" and res.step == 8 and res.best["step"] == 4
    import json

    summary = json.loads((tmp_path / "stop" / "train_summary.json").read_text())
    assert summary["early_stop"] is True
    assert _run(tmp_path, "nostop", "train.epochs=5").step == 20


def test_a_description_written_before_the_head_options_still_fits():
    from svfseg.engine.checkpoint import CheckpointMismatch, check_compatible

    now = {"name": "pfenet", "regime": "svf",
           "head": {"reduce_dim": 256, "train_down_query": True, "shot_reduce": "mean"}}
    old = {"name": "pfenet", "backbone_mode": "svf", "head": {"reduce_dim": 256}}  # svfseg 0.1
    check_compatible(now, old, "old.pt")
    other = {**now, "head": {**now["head"], "shot_reduce": "sum"}}
    import pytest

    with pytest.raises(CheckpointMismatch, match="shot_reduce"):
        check_compatible(other, old, "old.pt")
