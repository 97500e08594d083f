"""Frozen BatchNorm folded into SVD layers: same function, same S gradients, merge, refusal."""

import copy

import pytest
import torch
from torch import nn

from svfseg.svf import FoldedBatchNorm, SVFConfig, apply_svf, fold_conv_bn, merge_svf, svf_layers

MODES = ("reparam", "factorized", "auto", "tune")


class Net(nn.Module):
    """conv->BN->ReLU twice (one grouped with a bias) and a linear->BN1d, float64."""

    pairs = (("c1", "b1"), ("c2", "b2"), ("fc", "bf"))

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=True)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.bf = nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x))).mean(dim=(2, 3))
        return self.bf(self.fc(x))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        for bn in (net.b1, net.b2, net.bf):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return net.eval()


def s_grads(model, x):
    model.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    out = model(xs)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), [layer.S.grad.clone() for _, layer in svf_layers(model)], xs.grad


@pytest.mark.parametrize("mode", MODES)
def test_folded_matches_unfolded_outputs_and_s_gradients(mode):
    net = make_net()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    plain = apply_svf(copy.deepcopy(net), SVFConfig(mode=mode))
    folded = apply_svf(copy.deepcopy(net), SVFConfig(mode=mode, fold_bn=Net.pairs))
    assert all(isinstance(getattr(folded, n), FoldedBatchNorm) for n in ("b1", "b2", "bf"))
    assert folded.state_dict().keys() == plain.state_dict().keys()  # BN keys stay where they were
    y0, g0, gx0 = s_grads(plain, x)
    y1, g1, gx1 = s_grads(folded, x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the cached (no-graph) path too
        torch.testing.assert_close(folded(x), y0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fold", [False, True])
def test_merge_equals_unmerged(fold):
    net = make_net()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    model = apply_svf(copy.deepcopy(net), SVFConfig(fold_bn=Net.pairs))
    with torch.no_grad():
        for _, layer in svf_layers(model):
            layer.S.mul_(torch.rand_like(layer.S) + 0.5)  # a trained S, not the pretrained one
        ref = model(x)
    merged = merge_svf(model, fold_bn=fold)
    assert not list(svf_layers(merged))
    torch.testing.assert_close(merged(x), ref, rtol=1e-12, atol=1e-12)
    if fold:
        assert isinstance(merged.b1, nn.Identity) and merged.c1.bias is not None
    else:
        assert type(merged.b1) is nn.BatchNorm2d and merged.c1.bias is None
        assert merged.state_dict().keys() == net.state_dict().keys()
        net.load_state_dict(merged.state_dict(), strict=True)


def test_statistics_loaded_after_folding_are_used():
    net = make_net()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    model = apply_svf(copy.deepcopy(net), SVFConfig(fold_bn=Net.pairs))
    with torch.no_grad():
        model(x)  # fill the cache
        net.b2.running_var.mul_(3.0)
        net.b2.bias.add_(0.5)
    model.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith("b2.")}, strict=False)
    ref = apply_svf(copy.deepcopy(net), SVFConfig())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)


def test_trainable_bn_is_refused():
    net = make_net()
    with pytest.raises(ValueError, match=r"BatchNorm 'b1' has trainable affine parameters.*train_bn=false"):
        apply_svf(net, SVFConfig(fold_bn=Net.pairs, trainable_modules=["b1"]))
    assert not list(svf_layers(net))  # refused before anything was replaced
    model = apply_svf(make_net(), SVFConfig(fold_bn=Net.pairs))
    model.b1.weight.requires_grad_(True)  # unfrozen after the fact
    with pytest.raises(RuntimeError, match="folded BatchNorm has trainable affine parameters"):
        model(torch.randn(1, 3, 5, 5, dtype=torch.float64))


def test_bad_pairs_name_the_problem():
    with pytest.raises(ValueError, match="'c1' has 8 output channels but 'bf' has 6 features"):
        apply_svf(make_net(), SVFConfig(fold_bn=[("c1", "bf")]))
    with pytest.raises(ValueError, match="'nope' is not a module"):
        apply_svf(make_net(), SVFConfig(fold_bn=[("c1", "nope")]))
    with pytest.raises(ValueError, match="should be a BatchNorm, found Conv2d"):
        apply_svf(make_net(), SVFConfig(fold_bn=[("c1", "c2")]))
    with pytest.raises(ValueError, match="expected \\(conv name, batchnorm name\\) pairs"):
        SVFConfig(fold_bn=["c1"])


def test_pairs_with_undecomposed_conv_are_left_alone():
    model = apply_svf(make_net(), SVFConfig(target_modules=["c2"], fold_bn=Net.pairs))
    assert type(model.b1) is nn.BatchNorm2d and isinstance(model.b2, FoldedBatchNorm)


def test_fold_conv_bn_plain_export():
    net = make_net()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        fold_conv_bn(net, Net.pairs)
        torch.testing.assert_close(net(x), ref, rtol=1e-12, atol=1e-12)
    assert isinstance(net.b1, nn.Identity) and isinstance(net.b2, nn.Identity)
    assert type(net.bf) is nn.BatchNorm1d  # after a Linear: only convs are folded here


def test_copies_keep_the_layer_bn_link(tmp_path):
    model = apply_svf(make_net(), SVFConfig(fold_bn=Net.pairs))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for other in (copy.deepcopy(model), torch.load(path, weights_only=False)):
        assert other.c2.folded_bn is other.b2 and other.b2 is not model.b2
        with torch.no_grad():
            before = other(x)
            other.b2.running_mean.add_(1.0)  # the copy's own BN drives the copy's layer
            assert not torch.allclose(other(x), before)
            torch.testing.assert_close(model(x), model(x))
