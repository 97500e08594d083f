"""Backbone regimes bitfit / bn / last_stage / lora (and svf, full): what trains, counts, merging."""
import pytest
import torch
from torch import nn

from svfseg.models import create_model, export_merged
from conftest import assert_close_to_scale, to_dtype
from test_models import TinyBackbone, episode, tiny

# TinyBackbone: stages layer0..layer4 of channels (8, 8, 16, 24, 32), each conv3x3 -> BN -> conv1x1 -> BN,
# convs without bias. The regimes train layer2-4 (svf.stages' default).
C = {"layer1": 8, "layer2": 16, "layer3": 24, "layer4": 32}


def _lora_count(r):
    total = 0
    for prev, stage in (("layer1", "layer2"), ("layer2", "layer3"), ("layer3", "layer4")):
        cin, cout = C[prev], C[stage]
        total += r * cin * 9 + cout * r     # 3x3: A (r, cin, 3, 3), B (cout, r, 1, 1)
        total += r * cout + cout * r        # 1x1: A (r, cout, 1, 1), B (cout, r, 1, 1)
    return total


EXPECTED = {
    "bitfit": 2 * (16 + 24 + 32),            # convs have no bias: the BN shifts
    "bn": 4 * (16 + 24 + 32),                # BN scale + shift
    "last_stage": 24 * 32 * 9 + 32 * 32 + 4 * 32,
    "lora": _lora_count(4),
    "full": None,                            # every backbone parameter
    "svf": None,                             # checked by the svf library's own tests
}


def _build(regime, **kw):
    torch.manual_seed(0)
    return create_model("pfenet", backbone=tiny(), regime=regime, **kw)


def _intended(model, regime):
    bb = model.backbone
    names = []
    for n, _ in bb.named_parameters():
        stage = n.split(".")[0]
        in_stages = stage in ("layer2", "layer3", "layer4")
        is_bn = isinstance(bb.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d)
        if regime == "bitfit" and in_stages and is_bn and n.endswith(".bias"):
            names.append(n)
        elif regime == "bn" and in_stages and is_bn:
            names.append(n)
        elif regime == "last_stage" and stage == "layer4":
            names.append(n)
        elif regime == "lora" and in_stages and (".lora_A." in n or ".lora_B." in n):
            names.append(n)
        elif regime == "full":
            names.append(n)
    return sorted(names)


def _step(model, lr=0.5):
    q, s, m = episode()
    model.train()
    out = model(q, s, m)
    loss = out.logits.square().mean() + sum(a.square().mean() for a in out.aux_logits)
    opt = torch.optim.SGD([p for g in model.parameter_groups() for p in g["params"]], lr=lr)
    opt.zero_grad()
    loss.backward()
    grads = {n for n, p in model.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    return grads


@pytest.mark.parametrize("regime", ["bitfit", "bn", "last_stage", "lora", "full"])
def test_exactly_the_regime_parameters_train_and_nothing_else_moves(regime):
    model = _build(regime)
    trainable = sorted(n for n, p in model.backbone.named_parameters() if p.requires_grad)
    assert trainable == _intended(model, regime)
    if EXPECTED[regime] is not None:
        assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == EXPECTED[regime]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    grads = _step(model)
    # LoRA's A gets no gradient at the first step (B starts at 0): B must, and nothing outside the adapters
    assert grads <= set(trainable) and grads
    if regime == "lora":
        assert all(".lora_B." in n for n in grads)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= set(trainable), changed - set(trainable)  # BN statistics and frozen weights unchanged
    assert changed, "the step changed nothing"


@pytest.mark.parametrize("regime", ["bitfit", "bn", "last_stage", "lora", "svf"])
def test_merged_model_equals_the_trained_one_and_has_the_plain_keys(regime, precision):
    dtype, rel = precision
    model = _build(regime)
    _step(model)
    _step(model)  # LoRA: A moves only once B is non-zero
    q, s, m = to_dtype(episode(seed=1), dtype)
    model.eval().to(dtype)  # trained in float32; merged and compared in the test's precision
    with torch.no_grad():
        want = model(q, s, m)
        merged = export_merged(model)
        got = merged(q, s, m)
    assert_close_to_scale(got, want, rel)
    plain = create_model("pfenet", backbone=tiny(), regime="frozen")
    assert set(merged.state_dict()) == set(plain.state_dict())
    assert merged.describe() == plain.describe()


def test_lora_settings_change_the_count_and_adapters_start_at_zero():
    from svfseg.config import LoRAConfig

    model = _build("lora", lora=LoRAConfig(r=2, alpha=4, dropout=0.1))
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == _lora_count(2)
    plain = tiny().eval()  # the same weights (seeded), no adapters
    x = episode()[0]
    model.eval()
    with torch.no_grad():
        want = plain.forward_stages(x, ["layer4"])["layer4"]
        torch.testing.assert_close(model.backbone.forward_stages(x, ["layer4"])["layer4"], want)
    assert model.describe()["lora"] == {"r": 2, "alpha": 4, "dropout": 0.1}
    model.train()
    drops = [m for n, m in model.backbone.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(d.training for d in drops) and not model.backbone.training


def test_a_regime_with_nothing_to_train_is_refused_with_the_reason():
    bb = TinyBackbone()
    for name in ("layer2", "layer3", "layer4"):
        stage = getattr(bb, name)
        for i, mod in enumerate(stage):
            if isinstance(mod, nn.BatchNorm2d):
                stage[i] = nn.Identity()
    with pytest.raises(ValueError, match="bitfit.*neither conv/linear biases nor affine BatchNorm"):
        create_model("pfenet", backbone=bb, regime="bitfit")
    with pytest.raises(ValueError, match="'bn'.*no affine BatchNorm"):
        create_model("pfenet", backbone=bb, regime="bn")


def test_config_regimes_build_through_the_engine():
    from svfseg.config import load_config
    from svfseg.engine.model import build_model
    from svfseg.engine.resolved import resolve_run

    for regime in ("bitfit", "lora"):
        cfg = load_config(None, ["model.name=pfenet", "model.backbone=efficientnet_lite0", f"model.regime={regime}",
                                 "lora.r=2", "svf.stages=[layer4]"])
        model = build_model(resolve_run(cfg), pretrained=False)
        assert model.regime == regime and model.svf_policy.stages == ("layer4",)
        trained = {n.split(".")[0] for n, p in model.backbone.named_parameters() if p.requires_grad}
        assert trained == {"layer4"}


def test_footprint_movement_is_relative_per_stage_and_the_adapter_holds_only_what_trained(tmp_path):
    from safetensors.torch import load_file

    from svfseg.engine.footprint import Footprint
    from svfseg.engine.runfolder import RunFolder
    from svfseg.svf import singular_value_parameters

    model = _build("svf")
    fp = Footprint(model, torch.device("cpu"))
    (name, s), *_ = [(n, p) for n, p in singular_value_parameters(model.backbone) if n.startswith("layer3")]
    with torch.no_grad():
        s.view(-1)[0] *= 1.10  # one value of layer3 moves 10%, nothing else
    move = fp.movement()
    assert move["layer3"]["max"] == pytest.approx(0.10, rel=1e-4)
    assert move["layer3"]["mean"] == pytest.approx(0.10 / sum(p.numel() for n, p in
                                                   singular_value_parameters(model.backbone)
                                                   if n.startswith("layer3")), rel=1e-4)
    assert move["layer2"]["max"] == 0 and move["layer4"]["max"] == 0
    out = fp.summary(tmp_path)
    saved = load_file(str(RunFolder(tmp_path).trained_backbone))
    assert set(saved) == {n for n, _ in singular_value_parameters(model.backbone)}
    assert out["trainable"]["backbone"] == sum(t.numel() for t in saved.values())
    # a full fine-tune writes no second copy of the backbone, but reports its size
    full = _build("full")
    out = Footprint(full, torch.device("cpu")).summary(tmp_path / "full")
    assert out["adapter"]["file"] is None and out["adapter"]["bytes"] == 4 * sum(
        p.numel() for p in full.backbone.parameters())
