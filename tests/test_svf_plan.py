"""The forms plan of the SVF library: measured once (`plan_forms`), frozen, saved, loaded and followed."""

import json
import logging

import pytest
import torch
from torch import nn

import svfseg.svf.plan as plan_mod
from svfseg.svf import (FormsPlan, NothingToPlan, SVFConfig, apply_svf, forms_plan, plan_forms, svf_layers,
                        use_plan)


def _net(seed=0, mode="auto"):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return apply_svf(net, SVFConfig(target_modules=["3", "5", "7"], trainable_modules=["1"], mode=mode))


def _batch(seed=1):
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(seed))


def _no_timing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("timed although the plan was given")

    monkeypatch.setattr(plan_mod, "time_forms", refuse)


def _train(net, steps=4):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for i in range(steps):
        opt.zero_grad()
        net(_batch(10 + i)).square().mean().backward()
        opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def _forms_used(net, x):
    """The form each SVD layer takes in a training forward of ``x``."""
    used = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: used.append(m.choose_mode(args[0])))
             for _, layer in svf_layers(net)]
    net(x)
    for h in hooks:
        h.remove()
    return used


def test_plan_forms_measures_freezes_installs_and_leaves_rng_and_batchnorm_alone():
    net = _net().train()
    bn_before = net[1].running_mean.clone()
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    plan = plan_forms(net, _batch())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(net[1].running_mean, bn_before)  # the planning forward is not a step
    assert plan.frozen and forms_plan(net) is plan
    # layers "3" and "5" share one geometry and input shape: measured once; "7" is a 1x1
    assert len(plan) == 2 and set(plan.counts()) <= {"reparam", "factorized"}
    assert all(set(s) == {"reparam", "factorized"} for s in plan.seconds.values())
    assert plan.measured_on["device"] == "cpu" and plan.measured_on["torch"] == torch.__version__


def test_saved_plan_is_followed_without_timing_and_two_runs_given_it_are_bitwise_equal(tmp_path, monkeypatch):
    measured = _net()
    plan = plan_forms(measured, _batch())
    plan.save(tmp_path / "forms.json")
    loaded = FormsPlan.load(tmp_path / "forms.json")
    assert loaded == plan and loaded.frozen and loaded.seconds == plan.seconds
    # every key's form flipped: a plan that is not the measured one, so following it is visible
    flipped = FormsPlan({k: "reparam" if f == "factorized" else "factorized" for k, f in plan.forms.items()},
                        frozen=True)
    _no_timing(monkeypatch)
    runs = []
    for given in (loaded, FormsPlan.load(tmp_path / "forms.json"), flipped):
        net = _net()
        use_plan(net, given)
        (f3,), (f1,) = ([f for k, f in given.forms.items() if f"k=[{n}, {n}]" in k] for n in (3, 1))
        assert _forms_used(net, _batch()) == [f3, f3, f1]  # layers "3", "5" (one geometry), "7"
        runs.append(_train(net))
    first, second, other = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the forms round differently, so a run that did not follow its plan would show here
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_frozen_plan_lacking_a_shape_falls_back_to_the_cost_model_once_in_the_log(monkeypatch, caplog):
    net = _net()
    use_plan(net, FormsPlan(frozen=True))
    _no_timing(monkeypatch)
    with caplog.at_level(logging.INFO, logger="svfseg.svf.plan"):
        net(_batch()).sum().backward()
        net(torch.randn(1, 3, 5, 5)).sum().backward()
    lines = [r.getMessage() for r in caplog.records if "cost model" in r.getMessage()]
    assert len(lines) == 1 and "the plan is frozen" in lines[0]
    assert len(forms_plan(net).estimated) == 4 and not forms_plan(net).forms


def test_open_plan_measures_on_the_first_training_call():
    net = _net()
    assert not forms_plan(net).frozen and len(forms_plan(net)) == 0
    net(_batch()).sum().backward()
    assert len(forms_plan(net)) == 2
    with torch.no_grad():
        net(torch.randn(1, 3, 5, 5))  # no graph to S: nothing to choose, nothing measured
    assert len(forms_plan(net)) == 2


def test_plans_of_two_apply_svf_calls_are_merged_into_one():
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    b = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    apply_svf(a), apply_svf(b)
    a[0].forms_plan.forms["ka"] = "reparam"
    b[0].forms_plan.forms["kb"] = "factorized"
    b[0].forms_plan.freeze()
    net = nn.Sequential(a, b)
    plan = forms_plan(net)
    assert plan.forms == {"ka": "reparam", "kb": "factorized"} and plan.frozen
    assert all(layer.forms_plan is plan for _, layer in svf_layers(net))


def test_plan_forms_refuses_models_with_nothing_to_plan_and_keeps_the_old_plan():
    with pytest.raises(NothingToPlan, match="no SVD layer in mode 'auto' whose S trains"):
        plan_forms(_net(mode="factorized"), _batch())
    with pytest.raises(NothingToPlan, match="whose S trains"):  # U trains too: always the rebuilt weight
        plan_forms(apply_svf(nn.Sequential(nn.Conv2d(3, 4, 3)), SVFConfig(train_factors=("U", "S"))), _batch())
    net = _net()
    before = forms_plan(net)

    def no_graph():
        with torch.no_grad():
            net(_batch())

    with pytest.raises(NothingToPlan, match="graph to S"):
        plan_forms(net, run=no_graph)
    assert forms_plan(net) is before  # a failed measurement leaves the old plan in place


@pytest.mark.parametrize("text, message", [
    ("{not json", "expected JSON"),
    ('{"format": "other"}', "expected a forms plan"),
    ('{"format": "svfseg-svf-forms", "format_version": 99, "forms": {}}', "format_version 99"),
    ('{"format": "svfseg-svf-forms", "format_version": 1, "forms": {"k": {"form": "fast"}}}', "for 'k'"),
])
def test_load_names_the_file_and_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        FormsPlan.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        FormsPlan.load(tmp_path / "missing.json")


def test_plan_json_is_readable(tmp_path):
    net = _net()
    plan = plan_forms(net, _batch())
    data = json.loads(plan.to_json())
    assert data["format"] == "svfseg-svf-forms" and data["format_version"] == 1
    key = next(iter(data["forms"]))
    assert key.startswith("SVFConv2d(") and "grad=" in key and " cpu " in key  # device type, never an index
