"""BN folding in the few-shot models: declared conv->BN pairs, the policy default, exact export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svfseg.models import SVFPolicy, create_model, export_merged
from svfseg.models.policy import folds_bn
from svfseg.models.backbones import create_backbone
from svfseg.models.backbones.resnet import ResNet
from svfseg.svf import FoldedBatchNorm, singular_value_parameters, svf_layers
from conftest import assert_close_to_scale, to_dtype
from test_models import episode


@pytest.mark.parametrize("name", ["resnet50_deep", "resnet50", "vgg16_bn", "efficientnet_lite0"])
def test_declared_pairs_are_the_forward_dataflow(name):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    outputs, inputs, hooks = {}, {}, []
    for mod_name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, a, out, n=mod_name: outputs.__setitem__(n, out)))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=mod_name: inputs.__setitem__(n, a[0])))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 33, 33))
    for h in hooks:
        h.remove()
    pairs = backbone.conv_bn_pairs()
    assert pairs and len({bn for _, bn in pairs}) == len(pairs)
    for conv, bn in pairs:
        assert inputs[bn] is outputs[conv], f"{bn} does not read {conv}'s output"
    # every BN of the backbone sits after a declared conv
    assert {bn for _, bn in pairs} == set(inputs)


def small_resnet() -> ResNet:
    torch.manual_seed(0)
    backbone = ResNet((1, 1, 1, 1), deep_stem=True, output_stride=8)
    with torch.no_grad():  # non-trivial statistics, or folding would be a no-op
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
                m.bias.uniform_(-0.2, 0.2)
    return backbone


def _folded_and_plain():
    folded = create_model("baseline", backbone=small_resnet(), regime="svf")
    plain = create_model("baseline", backbone=small_resnet(), regime="svf",
                         svf_policy=SVFPolicy(fold_bn=False))
    plain.load_state_dict(folded.state_dict())  # same weights, same keys
    return folded, plain


def _outputs_and_s_grads(models, ep):
    """Eval logits and the training-mode singular-value gradients of each model on one episode."""
    outs, grads = [], []
    for model in models:
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks in the head
        model(*ep).logits.sum().backward()
        grads.append([p.grad for _, p in singular_value_parameters(model.backbone)])
        with torch.no_grad():
            outs.append(model.eval()(*ep))
    return outs, grads


def test_policy_folds_by_default_and_stays_exact():
    folded, plain = _folded_and_plain()
    assert folded.svf_policy.fold_bn is True and folded.describe()["svf_policy"]["fold_bn"] is True
    n_folded = sum(isinstance(m, FoldedBatchNorm) for m in folded.backbone.modules())
    assert n_folded == sum(1 for _ in svf_layers(folded.backbone))  # every layer2-4 conv has its BN
    assert not any(isinstance(m, FoldedBatchNorm) for m in plain.backbone.modules())
    assert list(folded.state_dict()) == list(plain.state_dict())

    # The exactness claim (folding changes the operation order, not the function) in float64, where
    # it holds to ~1e-12 on any CPU; in float32 the two orders round differently and a gradient
    # element that is a small sum of large terms can differ by 10% (an Intel Xeon: 74 of 128 elements
    # outside rtol 1e-3), while the code is right.
    ep64 = to_dtype(episode(b=1, k=1), torch.float64)
    (out_f, out_p), (grads_f, grads_p) = _outputs_and_s_grads((folded.double(), plain.double()), ep64)
    assert_close_to_scale(out_f, out_p, 1e-11, "float64 logits")
    for i, (a, b) in enumerate(zip(grads_f, grads_p)):
        assert_close_to_scale(a, b, 1e-11, f"float64 S gradient {i}")

    # float32, what training runs in: the same up to float32 rounding relative to each tensor's scale.
    # The S gradients sum over every pixel of every layer above: 0.18% of their largest value on both
    # an AMD EPYC and an Intel Xeon, so 1% is a float32 smoke check; the exactness is float64's above.
    folded, plain = _folded_and_plain()
    ep = episode(b=1, k=1)
    (out_f, out_p), (grads_f, grads_p) = _outputs_and_s_grads((folded, plain), ep)
    assert_close_to_scale(out_f, out_p, 1e-4, "float32 logits")
    for i, (a, b) in enumerate(zip(grads_f, grads_p)):
        assert_close_to_scale(a, b, 1e-2, f"float32 S gradient {i}")

    with torch.no_grad():
        for _, s in singular_value_parameters(folded.backbone):
            s.mul_(1 + 0.2 * torch.rand(s.shape))
        expected = folded(*ep)
        keep = export_merged(folded)
        fused = export_merged(folded, fold_bn=True)
        # merging and BN folding are other operation orders: float32 rounding, relative to the logits' scale
        assert_close_to_scale(keep(*ep), expected, 1e-4, "merged")
        assert_close_to_scale(fused(*ep), expected, 1e-4, "merged + BN folded")
        ep64 = to_dtype(ep, torch.float64)
        expected64 = folded.double()(*ep64)
        assert_close_to_scale(export_merged(folded)(*ep64), expected64, 1e-11, "float64 merged")
        assert_close_to_scale(export_merged(folded, fold_bn=True)(*ep64), expected64, 1e-11,
                              "float64 merged + BN folded")
    assert list(keep.state_dict()) == list(create_model("baseline", backbone=small_resnet()).state_dict())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.backbone.modules())


def test_train_bn_turns_folding_off_and_refuses_it_explicitly():
    assert folds_bn(SVFPolicy(train_bn=True)) is False
    with pytest.raises(ValueError, match="fold_bn=True .* train_bn=True"):
        SVFPolicy(train_bn=True, fold_bn=True)
    assert folds_bn(SVFPolicy.from_dict({"stages": ["layer4"]})) is True  # old policy dicts
