"""SVD layers under torch.compile (no graph breaks), bf16 autocast (S stays float32), channels_last."""

import copy

import pytest
import torch
from torch import nn

from conftest import assert_close_to_scale
from svfseg.svf import SVFConfig, SVFConv2d, apply_svf, svf_layers


def conv_bn(mode: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 5, 1)).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2)
        net[1].running_mean.uniform_(-1, 1)
    return apply_svf(net, SVFConfig(mode=mode, fold_bn=[("0", "1")]))


@pytest.mark.parametrize("mode", ["reparam", "factorized", "auto"])
def test_compile_fullgraph_forward_and_backward(mode):
    eager = conv_bn(mode)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    y0 = eager(x)
    y0.square().sum().backward()
    x1 = x.detach().clone().requires_grad_(True)
    y1 = compiled(x1)  # fullgraph=True raises on any graph break
    y1.square().sum().backward()
    # the traced graph may decompose ops (another operation order): float32 rounding relative to
    # each tensor's scale (conftest.assert_close_to_scale)
    assert_close_to_scale(y1, y0, 1e-5)
    assert_close_to_scale(x1.grad, x.grad, 1e-5)
    for (_, a), (_, b) in zip(svf_layers(compiled_model), svf_layers(eager)):
        assert_close_to_scale(a.S.grad, b.S.grad, 1e-5)
    with torch.no_grad():
        assert_close_to_scale(compiled(x), eager(x), 1e-5)


@pytest.mark.parametrize("mode", ["reparam", "factorized"])
def test_bf16_autocast_keeps_s_float32(mode):
    model = conv_bn(mode)
    x = torch.randn(2, 4, 7, 7)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
    for _, layer in svf_layers(model):
        assert layer.S.dtype == torch.float32 and layer.S.grad.dtype == torch.float32
        assert torch.isfinite(layer.S.grad).all() and layer.S.grad.abs().sum() > 0
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("mode", ["reparam", "factorized"])
def test_channels_last_input(mode):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    layer = SVFConv2d.from_conv(conv, mode=mode)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    xc = x.to(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(xc)
    torch.testing.assert_close(y, conv(x), rtol=1e-10, atol=1e-10)
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    conv(xr).sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-10, atol=1e-10)
