"""Few-shot models on the real backbones, the SVF regime, its trainable set and merged export."""

from __future__ import annotations

import pytest
import torch

from svfseg.models import SVFPolicy, create_model, export_merged
from svfseg.models.backbones import create_backbone, list_backbones
from svfseg.svf import singular_value_parameters, svf_layers
from conftest import assert_close_to_scale, to_dtype
from test_models import episode, tiny  # the tiny contract-B stand-in backbone

HEADS = ("baseline", "pfenet")
BACKBONES = ("resnet50_deep", "resnet50", "resnet101_deep", "vgg16_bn", "efficientnet_lite0")
SIZE = (57, 57)  # 8k + 1: the ResNets (output stride 8) give 8 x 8 maps


def head_numel(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", HEADS)
def test_real_backbone_pairs_train_1shot_and_eval_5shot(name, backbone):
    assert backbone in list_backbones()
    torch.manual_seed(0)
    model = create_model(name, backbone=backbone)
    chans = model.backbone.stage_channels
    assert model.down_query[0].in_channels == chans["layer2"] + chans["layer3"]
    out = model(*episode(b=1, k=1, size=SIZE))
    assert out.logits.shape == (1, 2, *SIZE)
    assert all(a.shape == (1, 2, *SIZE) for a in out.aux_logits)
    (out.logits.sum() + sum(a.sum() for a in out.aux_logits)).backward()
    assert model.cls[-1].weight.grad is not None
    model.eval()
    with torch.no_grad():
        logits = model(*episode(b=1, k=5, size=SIZE))
    assert logits.shape == (1, 2, *SIZE) and torch.isfinite(logits).all()


def test_pfenet_head_has_the_reference_parameter_count():
    model = create_model("pfenet", backbone="resnet50_deep")
    # PFENet reports ~10.8M head parameters with ResNet-50; the exact count of this layout:
    assert head_numel(model) == 10_817_034
    assert abs(head_numel(model) - 10.8e6) / 10.8e6 < 0.02
    # Baseline: reductions + merge + ASPP (biased convs) + res1 (1280 -> 256) + res2 + cls.
    assert head_numel(create_model("baseline", backbone="resnet50_deep")) == 4_917_250


def test_resnet50_svf_regime_counts_parity_and_gradients():
    # One test on purpose: decomposing ResNet-50 layer2-4 is the expensive part (seconds),
    # and a module fixture would be built once per xdist worker.
    torch.manual_seed(0)
    model = create_model("pfenet", backbone="resnet50_deep", regime="svf")

    # Trainable set: exactly the singular values of layer2-4 (the paper's 12,544) + the head.
    n_s = sum(p.numel() for _, p in singular_value_parameters(model.backbone))
    assert n_s == 12_544
    backbone_trainable = {n for n in trainable(model) if n.startswith("backbone.")}
    assert backbone_trainable == {f"backbone.{n}" for n, _ in singular_value_parameters(model.backbone)}
    assert all(n.split(".")[1] in ("layer2", "layer3", "layer4") for n in backbone_trainable)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"svf", "head"}
    assert sum(p.numel() for p in groups["svf"]["params"]) == 12_544
    assert sum(p.numel() for p in groups["head"]["params"]) == head_numel(model) == 10_817_034
    # The groups carry no lr of their own: the optimiser takes each group's from optim.lr_mult.
    assert all(set(g) == {"name", "params"} for g in groups.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 12_544 + 10_817_034
    desc = model.describe()
    assert desc["regime"] == "svf" and desc["svf_policy"]["stages"] == ["layer2", "layer3", "layer4"]

    # Untouched singular values: the logits of the frozen model with the same weights.
    torch.manual_seed(0)
    frozen = create_model("pfenet", backbone="resnet50_deep").eval()
    ep = episode(b=1, k=1, size=(33, 33))
    with torch.no_grad():
        # float32 through ResNet-50: rounding relative to the logits' scale; the exactness claim is
        # tested in float64 too on the tiny backbone (test_untouched_singular_values_give_the_frozen_logits)
        assert_close_to_scale(model.eval()(*ep), frozen(*ep), 1e-4)

    # Gradients reach layer2-4 through the support branch alone, and never layer0/layer1.
    model.train()
    feats = model.extract_features(*ep)
    feats.support["layer4"].square().mean().backward()
    grads = {n.split(".")[0]: p.grad for n, p in singular_value_parameters(model.backbone)}
    assert set(grads) == {"layer2", "layer3", "layer4"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)
    model(*ep).logits.sum().backward()
    assert all(p.grad is not None for _, p in singular_value_parameters(model.backbone))
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if n.startswith(("layer0", "layer1")))


def test_frozen_and_full_regimes_on_resnet50():
    frozen = create_model("pfenet", backbone="resnet50_deep")
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 10_817_034
    full = create_model("pfenet", backbone="resnet50_deep", regime="full")
    assert trainable(full) == {n for n, _ in full.named_parameters()}


@pytest.mark.parametrize("name", HEADS)
def test_untouched_singular_values_give_the_frozen_logits(name, precision):
    dtype, rel = precision
    torch.manual_seed(0)
    frozen = create_model(name, backbone=tiny()).eval().to(dtype)
    torch.manual_seed(0)
    # decomposed from the weights in the test's precision, so float64 checks the identity U S Vh = W
    svf = create_model(name, backbone=tiny().to(dtype), regime="svf").eval().to(dtype)
    assert sum(1 for _ in svf_layers(svf.backbone)) == 6  # 3x3 + 1x1 in each of layer2-4
    ep = to_dtype(episode(b=2, k=2), dtype)
    with torch.no_grad():
        assert_close_to_scale(svf(*ep), frozen(*ep), rel)


def test_merged_export_matches_logits_and_has_plain_keys(precision):
    dtype, rel = precision
    torch.manual_seed(0)
    model = create_model("pfenet", backbone=tiny(), regime="svf").eval().to(dtype)
    with torch.no_grad():
        for _, s in singular_value_parameters(model.backbone):
            s.mul_(1 + 0.2 * torch.rand(s.shape, dtype=dtype))
    ep = to_dtype(episode(b=1, k=2), dtype)
    with torch.no_grad():
        expected = model(*ep)
    merged = export_merged(model)
    assert merged is not model and any(True for _ in svf_layers(model.backbone))
    assert not any(True for _ in svf_layers(merged.backbone))
    plain = create_model("pfenet", backbone=tiny()).to(dtype)
    assert list(merged.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert_close_to_scale(merged(*ep), expected, rel)
        assert_close_to_scale(plain.eval()(*ep), expected, rel)
    assert merged.describe() == plain.describe()
    assert not any(p.requires_grad for p in merged.backbone.parameters())


def test_policy_options_change_the_trainable_set():
    skip = create_model("baseline", backbone=tiny(), regime="svf", svf_policy=SVFPolicy(skip_1x1=True))
    assert sum(1 for _ in svf_layers(skip.backbone)) == 3
    only4 = create_model("baseline", backbone=tiny(), regime="svf", svf_policy={"stages": ["layer4"]})
    assert {n.split(".")[0] for n, _ in svf_layers(only4.backbone)} == {"layer4"}
    bn = create_model("baseline", backbone=tiny(), regime="svf", svf_policy=SVFPolicy(train_bn=True))
    groups = {g["name"]: g for g in bn.parameter_groups()}
    s_names = {n for n, _ in singular_value_parameters(bn.backbone)}
    bn_names = {n for n, p in bn.backbone.named_parameters() if p.requires_grad and n not in s_names}
    # Tiny stages are (conv, BN, ReLU, conv, BN, ReLU): BN modules are children 1 and 4.
    expected = {(stage, i) for stage in ("layer2", "layer3", "layer4") for i in "14"}
    assert {tuple(n.split(".")[:2]) for n in bn_names} == expected
    assert sum(p.numel() for p in groups["backbone"]["params"]) == 2 * (16 + 16 + 24 + 24 + 32 + 32)
    bn.train()
    assert not any(m.training for m in bn.backbone.modules())


def test_policy_validation_names_the_problem():
    with pytest.raises(ValueError, match="layer9"):
        create_model("pfenet", backbone=tiny(), regime="svf", svf_policy=SVFPolicy(stages=("layer9",)))
    with pytest.raises(ValueError, match="mode"):
        SVFPolicy(mode="fast")
    with pytest.raises(ValueError, match="unknown keys"):
        SVFPolicy.from_dict({"stage": ["layer2"]})
    assert SVFPolicy.from_dict(SVFPolicy().to_dict()) == SVFPolicy()


def test_an_optimiser_step_on_singular_values_changes_the_eval_logits():
    torch.manual_seed(0)
    model = create_model("pfenet", backbone=tiny(), regime="svf")
    ep = episode(b=1, k=1)
    model.eval()
    with torch.no_grad():
        before = model(*ep)  # fills the SVD layers' weight caches
    model.train()
    svf_group = next(g for g in model.parameter_groups() if g["name"] == "svf")
    opt = torch.optim.SGD(svf_group["params"], lr=0.5)
    out = model(*ep)
    (out.logits[:, 1].mean() - out.logits[:, 0].mean()).backward()
    s_before = [p.detach().clone() for p in svf_group["params"]]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(s_before, svf_group["params"]))
    model.eval()
    with torch.no_grad():
        after = model(*ep)
        merged = export_merged(model)(*ep)
    assert not torch.allclose(before, after)  # no stale cached weight
    # merged weights are another operation order: float32 rounding relative to the logits' scale
    assert_close_to_scale(merged, after, 1e-4)


def test_create_model_loads_an_original_format_weight_file(tmp_path):
    # Key mapping per family is test_backbones' job; this checks create_model passes the file.
    backbone = "resnet50_deep"
    torch.manual_seed(1)
    source = create_backbone(backbone)
    # File keys as the PSPNet file names them (stem at top level, an fc head).
    state = {source.checkpoint_key(k): v for k, v in source.state_dict().items()}
    assert "conv1.weight" in state and not any(k.startswith("layer0.") for k in state)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = create_model("pfenet", backbone=backbone, weights=str(path)).backbone.state_dict()
    assert set(loaded) == set(source.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    with pytest.raises(Exception, match="conv1.weight"):
        del state["conv1.weight"]
        torch.save(state, path)
        create_model("pfenet", backbone=backbone, weights=str(path))
