"""Issue 20 item 6: svf.train = any subset of [U, S, V]; trained U / V merge back exactly and are saved."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svfseg.config import SVFPolicy
from svfseg.svf import SVFConfig, apply_svf, load_svf, merge_svf, save_svf, svf_layers


def _net():
    torch.manual_seed(0)
    # conv 4->6 3x3: m=6, n=36, r=6; grouped conv 6->8 3x3, 2 groups: m=4, n=27, r=4 per group;
    # linear 8->3: m=3, n=8, r=3
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, groups=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()


#: Hand counts: S = sum g*r; U = sum g*m*r; V = sum g*r*n.
HAND = {"S": 6 + 2 * 4 + 3, "U": 6 * 6 + 2 * 4 * 4 + 3 * 3, "V": 6 * 36 + 2 * 4 * 27 + 3 * 8}


@pytest.mark.parametrize("factors", [("S",), ("U", "S"), ("S", "V"), ("U", "S", "V"), ("U",)])
def test_trained_factors_count_train_merge_exactly_and_are_saved(factors, tmp_path):
    net = apply_svf(_net(), SVFConfig(train_factors=factors))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == sum(HAND[f] for f in factors)
    from svfseg.svf import trainable_parameter_report

    plain_total = sum(p.numel() for p in _net().parameters())  # "all params" is the plain model's count
    assert trainable_parameter_report(net).startswith(f"trainable params: {trainable:,} || all params: {plain_total:,}")
    keys = set(net.state_dict())
    assert {"0.U", "0.S", "0.Vh", "2.U", "5.Vh"} <= keys  # the same keys whether U / Vh train or not
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    before = {n: t.detach().clone() for n, t in net.state_dict().items()}
    net(x).square().sum().backward()
    opt.step()
    moved = {n.split(".")[-1] for n, t in net.state_dict().items() if not torch.equal(t, before[n])}
    assert moved == {{"V": "Vh"}.get(f, f) for f in factors}  # gradients reach exactly the trained factors
    with torch.enable_grad():
        trained_out = net(x)              # the training-time form (a graph to the trained factors)
    with torch.no_grad():
        cached_out = net(x)               # the cached rebuilt weight
    path = tmp_path / "svf.safetensors"
    save_svf(path, net)
    other = apply_svf(_net(), SVFConfig(train_factors=factors))
    load_svf(path, other)                 # the adapter alone restores the trained model
    merged = merge_svf(net)
    assert not list(svf_layers(merged))
    with torch.no_grad():
        plain = merged(x)
        restored = other(x)
    for y in (trained_out, cached_out, restored):
        torch.testing.assert_close(y.detach(), plain, rtol=0, atol=1e-12)


def test_trained_factor_matrices_force_the_rebuilt_weight_form():
    net = apply_svf(_net(), SVFConfig(train_factors=("U", "S"), mode="factorized"))
    layer = dict(svf_layers(net))["0"]
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert layer.choose_mode(x) == "reparam"  # the factorized Function has no gradient for U
    only_s = apply_svf(_net(), SVFConfig(mode="factorized"))
    assert dict(svf_layers(only_s))["0"].choose_mode(x) == "factorized"


def test_policy_train_is_a_subset_of_u_s_v_in_canonical_order():
    assert SVFPolicy(train=["V", "S"]).train == ("S", "V")
    assert SVFPolicy().train == ("S",) and SVFPolicy().to_dict()["train"] == ["S"]
    for bad in ([], ["W"], ["S", "S"]):
        with pytest.raises(ValueError, match="svf.train|SVFPolicy.train"):
            SVFPolicy(train=bad)
    with pytest.raises(ValueError, match="train_factors"):
        SVFConfig(train_factors=("S", "X"))


def test_policy_trains_the_named_factors_of_the_named_stages_and_old_descriptions_still_fit():
    from svfseg.config import load_config
    from svfseg.engine.model import build_model, describe
    from svfseg.engine.resolved import resolve_run

    def model(*over):
        cfg = load_config(None, ["model.backbone=resnet50", "model.name=pfenet", "data.benchmark=pascal", *over])
        return build_model(resolve_run(cfg), pretrained=False), cfg

    m, cfg = model("svf.stages=[layer4]", "svf.train=[S,V]")
    groups = {g["name"]: sum(p.numel() for p in g["params"]) for g in m.parameter_groups()}
    # ResNet-50 layer4 by hand, r = min(out, in*k*k) per conv. Block 0: conv1 1024->512 (r 512),
    # conv2 512->512 3x3 (r 512, n 4608), conv3 512->2048 (r 512, n 512), downsample 1024->2048
    # (r 1024, n 1024); blocks 1-2: conv1 2048->512 (r 512, n 2048), conv2, conv3 as above.
    s_count = (512 + 512 + 512 + 1024) + 2 * (512 + 512 + 512)
    v_count = (512 * 1024 + 512 * 4608 + 512 * 512 + 1024 * 1024) + 2 * (512 * 2048 + 512 * 4608 + 512 * 512)
    assert s_count == 5632 and groups["svf"] == s_count + v_count and "backbone" not in groups
    assert describe(m, resolve_run(cfg))["svf_policy"]["train"] == ["S", "V"]
    plain, cfg0 = model("svf.stages=[layer4]")
    assert "train" not in describe(plain, resolve_run(cfg0))["svf_policy"]  # descriptions before svf.train meant [S]
