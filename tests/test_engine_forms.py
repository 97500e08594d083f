"""A run's SVF forms plan (engine.forms): measured on the first step and recorded, followed by its resume
without timing, given to other runs by svf.plan (bitwise equal weights), and shared by DDP ranks."""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import svfseg.svf.plan as plan_mod
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.distributed import DistInfo
from svfseg.engine.loop import fit
from svfseg.engine.state import TrainingState
from svfseg.engine.tasks import EvalSet, FewShotTask
from svfseg.svf import FormsPlan, SVFConfig, apply_svf, forms_plan, svf_layers
from svfseg.svf.inject import set_trained_factors
from test_engine_toys import ToyEval, ToyFewShot, ToyTrain, toy_config


def svf_toy(dropout=0.2):
    """The engine's toy with its backbone conv and first head conv decomposed ("auto": planned forms)."""
    torch.manual_seed(0)
    model = ToyFewShot(dropout=dropout)  # dropout draws from the RNG: planning must leave it alone
    return apply_svf(model, SVFConfig(target_modules=["backbone", "head.0"], trainable_modules=["head.3", "aux"]))


def _count_timing(monkeypatch, refuse=False):
    calls = []
    real = plan_mod.time_forms

    def timed(layer, x, reps=3):
        if refuse:
            raise AssertionError("a run with a plan timed the forms again")
        calls.append(tuple(x.shape))
        return real(layer, x, reps=reps)

    monkeypatch.setattr(plan_mod, "time_forms", timed)
    return calls


def _fit(tmp_path, name, *extra, resume=False):
    cfg = toy_config(tmp_path, f"name={name}", *extra)
    model = svf_toy()
    saved = ckpt.load(tmp_path / name / "last.pt") if resume else None
    (tmp_path / name).mkdir(exist_ok=True)
    state = TrainingState(cfg, model, run_dir=tmp_path / name, describe=model.describe(),
                          train_items=len(ToyTrain()), resume_from=saved)
    res = fit(cfg, state, ToyTrain(), task=FewShotTask(), val=EvalSet(ToyEval(4), (1, 2)))
    return res, {k: v.clone() for k, v in model.state_dict().items()}, model


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_plan_recorded_resumed_without_timing_and_runs_given_it_are_bitwise_equal(tmp_path, monkeypatch):
    calls = _count_timing(monkeypatch)
    part, _, _ = _fit(tmp_path, "measured", "train.stop_after_steps=5")
    assert part.status == "interrupted" and calls  # measured on the first step
    written = FormsPlan.load(tmp_path / "measured" / "svf_forms.json")
    assert len(written) == 2 and len(calls) == 2  # two geometries, each timed once
    saved = ckpt.load(tmp_path / "measured" / "last.pt")
    assert FormsPlan.from_dict(saved["svf_forms"]) == written

    calls.clear()
    monkeypatch.undo()
    _count_timing(monkeypatch, refuse=True)  # from here on nothing may time
    resumed, w_resumed, model = _fit(tmp_path, "measured", resume=True)
    assert resumed.status == "finished" and forms_plan(model) == written
    assert FormsPlan.from_dict(ckpt.load(tmp_path / "measured" / "best.pt")["svf_forms"]) == written

    plan_file = tmp_path / "measured" / "svf_forms.json"
    _, w_given, _ = _fit(tmp_path, "given", f"svf.plan={plan_file}")
    _, w_again, _ = _fit(tmp_path, "again", f"svf.plan={plan_file}")
    assert FormsPlan.load(tmp_path / "given" / "svf_forms.json") == written  # the run folder names its forms
    assert _equal(w_given, w_again), "two runs given one plan differ"
    # measuring left the RNG and data alone: the measured run, resumed, equals the runs given its plan
    assert _equal(w_resumed, w_given), "the measured-and-resumed run differs from the runs given its plan"
    # a run given other forms ends elsewhere (float rounding): what a run that ignored its plan would show
    flipped = FormsPlan({k: "reparam" if f == "factorized" else "factorized" for k, f in written.forms.items()})
    flipped.save(tmp_path / "flipped.json")
    _, w_flipped, _ = _fit(tmp_path, "flipped", f"svf.plan={tmp_path / 'flipped.json'}")
    assert not _equal(w_flipped, w_given)


def test_a_missing_or_foreign_plan_file_is_refused_before_training(tmp_path):
    cfg = toy_config(tmp_path, f"svf.plan={tmp_path / 'nope.json'}")
    with pytest.raises(FileNotFoundError, match="svf.plan: forms plan .*nope.json.*: no such file"):
        TrainingState(cfg, svf_toy(), run_dir=tmp_path / "toy", describe={}, train_items=16)
    (tmp_path / "other.json").write_text(json.dumps({"format": "svfseg-merged-v1"}))
    cfg = toy_config(tmp_path, f"svf.plan={tmp_path / 'other.json'}")
    with pytest.raises(ValueError, match="svf.plan: .*expected a forms plan"):
        TrainingState(cfg, svf_toy(), run_dir=tmp_path / "toy", describe={}, train_items=16)


def test_runs_without_a_form_to_choose_have_no_plan(tmp_path):
    """Regimes without SVD layers, and SVF training U too (always the rebuilt weight), train without a plan."""
    trains_u = svf_toy()
    for _, layer in svf_layers(trains_u):
        set_trained_factors(layer, ("U", "S"))
    for name, model in (("plain", ToyFewShot()), ("trains_u", trains_u)):
        state = TrainingState(toy_config(tmp_path, f"name={name}", "train.epochs=1"), model, run_dir=tmp_path / name,
                              describe=model.describe(), train_items=16)
        assert state.forms is None and not state.forms_pending, name
        (tmp_path / name).mkdir()
        fit(state.cfg, state, ToyTrain(), task=FewShotTask())
        assert ckpt.load(tmp_path / name / "last.pt")["svf_forms"] is None
        assert not (tmp_path / name / "svf_forms.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp_path, out):
    torch.set_num_threads(1)
    if rank:
        def refuse(*args, **kwargs):
            raise AssertionError("rank 1 timed the forms: only rank 0 measures")

        plan_mod.time_forms = refuse  # this spawned process only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = svf_toy(dropout=0.0)
        cfg = toy_config(tmp_path, "name=ddp", "train.epochs=1")
        (tmp_path / "ddp").mkdir(exist_ok=True)
        state = TrainingState(cfg, model, run_dir=tmp_path / "ddp", describe=model.describe(), train_items=16,
                              info=DistInfo(rank, world, rank, torch.device("cpu")))
        fit(cfg, state, ToyTrain(), task=FewShotTask())
        used = {name: layer.forms_plan.forms for name, layer in svf_layers(model)}
        torch.save({"plan": state.forms.to_dict(), "used": used}, out / f"rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_rank_0_measures_and_every_rank_follows_its_plan(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), tmp_path, tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["plan"]["forms"] and r0["plan"]["forms"] == r1["plan"]["forms"]
    assert r0["used"] == r1["used"]
    assert FormsPlan.load(tmp_path / "ddp" / "svf_forms.json").forms == FormsPlan.from_dict(r0["plan"]).forms
