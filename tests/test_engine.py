"""Engine: poly schedule, param groups, checkpoints, kill-and-resume equivalence, Ctrl-C, NaN stop."""
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from svfseg.engine import checkpoint as ckpt
from svfseg.data.samplers import EpochBatchSampler
from svfseg.engine.evaluator import predictions_at_original_size
from svfseg.engine.optim import ReferenceDecay, build_optimizer, poly_lr, set_lr
from svfseg.engine.loop import NonFiniteLoss, fit
from svfseg.engine.state import TrainingState
from svfseg.engine.tasks import FewShotTask, EvalSet
from svfseg.engine.tasks.fewshot import evaluate
from test_engine_toys import ToyEval, ToyFewShot, ToyTrain, toy_config


def test_poly_lr_is_pure_and_correct_every_step():
    total = 10
    lrs = [poly_lr(s, total, 0.1, 0.9) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5 ** 0.9)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    assert poly_lr(3, 10, 0.1, 0.9, warmup_steps=4) == pytest.approx(0.1 * 0.7 ** 0.9)
    assert poly_lr(0, 10, 0.1, 0.9, warmup_steps=4) == pytest.approx(0.1 * 0.25)
    with pytest.raises(ValueError):
        poly_lr(10, 10, 0.1)


def test_param_groups_multipliers_and_decay_towards_pretrained():
    model = nn.Linear(3, 2)
    model.parameter_groups = lambda: [{"name": "svf", "params": [model.weight]},
                                      {"name": "head", "params": [model.bias]}]
    opt, ref = build_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.5,
                               lr_mult={"svf": 1.0, "head": 10.0}, decay_to_pretrained=("svf",))
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.5]
    w0 = model.weight.detach().clone()
    # zero loss gradient: only decay acts; towards the pretrained values it does nothing at start
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    ref.apply()
    opt.step()
    assert torch.equal(model.weight.detach(), w0)
    with torch.no_grad():
        model.weight.add_(1.0)
    model.weight.grad = torch.zeros_like(model.weight)
    ref.apply()
    assert torch.allclose(model.weight.grad, torch.full_like(w0, 0.5))  # wd * (w - w0)
    with pytest.raises(KeyError, match="lr_mult has no entry for parameter group 'svf'"):
        build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0, lr_mult={"head": 1.0})


def test_reference_decay_state_roundtrip():
    p = nn.Parameter(torch.ones(3))
    r = ReferenceDecay([("s", p)], 0.1)
    with torch.no_grad():
        p.mul_(2)
    r2 = ReferenceDecay([("s", p)], 0.1)
    r2.load_state_dict(r.state_dict())
    assert torch.equal(r2.reference["s"], torch.ones(3))


def test_checkpoint_atomic_and_rng_roundtrip(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"a": torch.arange(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    gen = np.random.default_rng(5)
    torch.manual_seed(1)
    random.seed(2)
    state = ckpt.capture_rng({"g": gen})
    ckpt.save_atomic({"rng": state}, path)
    want = (torch.rand(3), random.random(), gen.random())
    torch.manual_seed(7)
    random.seed(7)
    gen.random()
    ckpt.restore_rng(ckpt.load(path)["rng"], {"g": gen})
    got = (torch.rand(3), random.random(), gen.random())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_incompatible_checkpoint_lists_differences():
    with pytest.raises(ckpt.CheckpointMismatch) as e:
        ckpt.check_compatible({"name": "pfenet", "fold": 0, "backbone": "resnet50"},
                              {"name": "baseline", "fold": 1, "backbone": "resnet50"}, "x.pt")
    msg = str(e.value)
    assert "x.pt" in msg and "name: checkpoint has 'baseline'" in msg and "fold" in msg and "backbone" not in msg


def test_batch_sampler_shards_global_batches_and_resumes():
    one = EpochBatchSampler(10, 4, 5, seed=3)
    one.set_epoch(2)
    batches = list(one)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    r0, r1 = EpochBatchSampler(10, 4, 5, 3, 0, 2), EpochBatchSampler(10, 4, 5, 3, 1, 2)
    for s in (r0, r1):
        s.set_epoch(2)
    assert [a + b for a, b in zip(r0, r1)] == batches
    one.set_epoch(2, start_step=3)
    assert list(one) == batches[3:]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fit(tmp_path, name, *extra, model=None, resume=False, val=True):
    cfg = toy_config(tmp_path, f"name={name}", *extra)
    torch.manual_seed(0)  # same initial weights in every run
    model = model or ToyFewShot()
    state = ckpt.load(tmp_path / name / "last.pt") if resume else None
    valset = EvalSet(ToyEval(6), (1, 2)) if val else None
    (tmp_path / name).mkdir(exist_ok=True)
    state = TrainingState(cfg, model, run_dir=tmp_path / name, describe=model.describe(), train_items=len(ToyTrain()),
                          resume_from=state)
    res = fit(cfg, state, ToyTrain(), task=FewShotTask(), val=valset)
    return res, model


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    full, m_full = _fit(tmp_path, "full")
    assert full.status == "finished" and full.step == 12
    # stop mid-epoch (epoch 1, after 2 of its 4 steps), as if killed, then resume in a fresh model
    part, _ = _fit(tmp_path, "cut", "train.stop_after_steps=6")
    assert part.status == "interrupted" and part.step == 6
    saved = ckpt.load(tmp_path / "cut" / "last.pt")
    assert saved["status"] == "interrupted" and saved["data_position"] == {
        "epoch": 1, "step_in_epoch": 2, "steps_per_epoch": 4}
    torch.manual_seed(123)  # other initial weights: the checkpoint must overwrite them all
    fresh = ToyFewShot()
    resumed, m_res = _fit(tmp_path, "cut", model=fresh, resume=True)
    assert resumed.status == "finished" and resumed.step == 12
    a, b = _weights(m_full), _weights(m_res)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert resumed.best["miou"] == full.best["miou"]
    rows = (tmp_path / "cut" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # header + one row per 2 steps, no duplicates after the resume
    assert (tmp_path / "full" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "full" / "best.pt").exists()


def test_ctrl_c_saves_resumable_checkpoint(tmp_path):
    class Interrupting(ToyFewShot):
        def forward(self, *a):
            if self.training and self.calls == 4:
                os.kill(os.getpid(), signal.SIGINT)
            return super().forward(*a)

    res, _ = _fit(tmp_path, "int", model=Interrupting(), val=False)
    # the signal arrived during step 5's forward; that step completes, the next is not taken
    assert res.status == "interrupted" and res.step == 5
    state = ckpt.load(tmp_path / "int" / "last.pt")
    assert state["status"] == "interrupted" and state["step"] == 5


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match="at step 7"):
        _fit(tmp_path, "nan", "train.checkpoint_every=1", model=ToyFewShot(nan_at_call=7), val=False)
    state = ckpt.load(tmp_path / "nan" / "last.pt")
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_evaluate_crops_and_resizes_to_original_label():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :2, :2] = 1.0  # foreground top-left of the valid 2x3 region ...
    logits[0, 1, :, 3] = 5.0    # ... and in the padding column, which must be cropped away
    pred = predictions_at_original_size(logits, torch.tensor([[2, 3]]), [(4, 6)])[0]
    assert pred.shape == (4, 6)
    # bilinear: output col 4 samples input col 1.75 (fg), col 5 clamps to input col 2 (bg); without the
    # crop, the padding column's 5.0 would make the right edge foreground
    assert pred[:, :5].all() and pred[:, 5].sum() == 0


def test_evaluate_independent_of_batch_size():
    model = ToyFewShot(dropout=0.0)
    ds = ToyEval(7)
    r1 = evaluate(model, ds, class_ids=(1, 2), device=torch.device("cpu"), batch_size=1)
    r3 = evaluate(model, ds, class_ids=(1, 2), device=torch.device("cpu"), batch_size=3)
    assert r1["episodes"] == 7 and r1["miou"] == r3["miou"] and r1["fb_iou"] == r3["fb_iou"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_modes_train(tmp_path, amp):
    # CPU autocast here; on a GPU the same code path runs with CUDA autocast (+ GradScaler for fp16)
    res, model = _fit(tmp_path, f"amp_{amp}", f"train.amp={amp}", "train.epochs=1")
    assert res.status == "finished"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    state = ckpt.load(tmp_path / f"amp_{amp}" / "last.pt")
    assert state["scaler"]["scale"] if amp == "fp16" else True  # fp16 keeps a loss-scaler state to resume


def test_grad_clip_limits_the_update(tmp_path):
    def change(name, *extra):
        torch.manual_seed(0)
        model = ToyFewShot(dropout=0.0)
        m0 = {k: v.clone() for k, v in model.state_dict().items()}
        _, m = _fit(tmp_path, name, "train.epochs=1", "train.steps_per_epoch=1", *extra, model=model, val=False)
        return sum((m.state_dict()[k] - m0[k]).abs().sum() for k in m0)

    free, clipped = change("free"), change("clip", "optim.grad_clip=1e-4")
    assert 0 < clipped < free / 10
