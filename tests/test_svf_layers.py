"""Tests for the SVD layers: equivalence in all forms, gradients, weight cache, auto choice."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import svfseg.svf.plan as plan_mod
import svfseg.svf.weight_cache as cache_mod
from conftest import assert_close_to_scale
from svfseg.svf.layers import (
    SVFConv1d,
    SVFConv2d,
    SVFConv3d,
    SVFLinear,
    estimate_costs,
    svf_layer_from,
)

MODES = ("reparam", "factorized", "auto")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _randn(*shape, seed=0, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


@st.composite
def conv_cases(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    in_per = 1 if depthwise else draw(st.integers(1, 4))
    out_per = draw(st.integers(1, 5))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    stride = draw(st.integers(1, 2))
    pad_choice = draw(st.sampled_from(["int", "same", "valid"]))
    if pad_choice == "same" and stride != 1:
        pad_choice = "int"
    padding = draw(st.integers(0, 2)) if pad_choice == "int" else pad_choice
    reach = dilation * (kernel - 1) + 1  # the input must cover the dilated kernel
    size = max(3, reach) + draw(st.integers(0, 2 if dim < 3 else 1))
    conv = CONV[dim](
        in_per * groups, out_per * groups, kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=draw(st.booleans()), padding_mode=padding_mode,
    )  # fmt: skip
    batch = draw(st.integers(1, 2))
    return conv, (batch, in_per * groups) + (size,) * dim


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_conv_equivalence_grid(case, seed):
    conv, shape = case
    torch.manual_seed(seed)
    nn.init.normal_(conv.weight)
    x = _randn(*shape, seed=seed)
    ref = conv(x)
    for mode in MODES:
        layer = svf_layer_from(conv, mode)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                out = layer(x)
            assert out.shape == ref.shape
            assert _rel_err(out, ref) <= 1e-5, (mode, grad, conv)
        assert _rel_err(layer.to_plain()(x), ref) <= 1e-5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_same_padding_all_modes_even_kernel(mode, padding_mode):
    # 'same' with an even dilated kernel pads asymmetrically, like nn.Conv2d does
    conv = nn.Conv2d(4, 6, (2, 3), padding="same", dilation=(3, 1), padding_mode=padding_mode)
    x = _randn(2, 4, 9, 8)
    layer = svf_layer_from(conv, mode)
    assert _rel_err(layer(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_linear_and_unbatched_inputs(mode):
    lin = nn.Linear(12, 5)
    layer = svf_layer_from(lin, mode)
    assert isinstance(layer, SVFLinear) and layer.rank == 5
    x = _randn(3, 4, 12)
    assert _rel_err(layer(x), lin(x)) <= 1e-5
    conv = nn.Conv2d(3, 4, 3, padding=1)
    c = svf_layer_from(conv, mode)
    xu = _randn(3, 6, 6)  # unbatched (C, H, W)
    assert _rel_err(c(xu), conv(xu)) <= 1e-5


def test_layer_classes_and_state_dict_keys():
    assert isinstance(svf_layer_from(nn.Conv1d(2, 3, 3)), SVFConv1d)
    assert isinstance(svf_layer_from(nn.Conv3d(2, 3, 1)), SVFConv3d)
    layer = svf_layer_from(nn.Conv2d(4, 8, 3, groups=2))
    assert isinstance(layer, SVFConv2d)
    assert set(layer.state_dict()) == {"U", "S", "Vh", "bias"}
    assert [n for n, _ in layer.named_parameters()] == ["S", "bias"]
    assert layer.U.shape == (2, 4, 4) and layer.S.shape == (2, 4) and layer.Vh.shape == (2, 4, 18)
    assert layer.weight.shape == (8, 2, 3, 3)
    with pytest.raises(TypeError, match="exact type"):
        svf_layer_from(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        svf_layer_from(nn.Linear(2, 2), mode="fast")


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_plain_conv_and_reach_only_s(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
    layer = svf_layer_from(conv, mode)
    x = _randn(2, 6, 9, 9, requires_grad=True)
    gy = _randn(2, 8, 5, 5, seed=1)
    layer(x).backward(gy)
    x_ref = x.detach().clone().requires_grad_(True)
    conv(x_ref).backward(gy)
    # another operation order: float32 rounding relative to the tensor's scale (conftest)
    assert_close_to_scale(x.grad, x_ref.grad, 1e-5)
    # dL/dS_i = u_i^T dL/dW v_i, per group
    g, m, r = layer.U.shape
    dW = conv.weight.grad.reshape(g, m, -1)
    expected = torch.einsum("gmr,gmn,grn->gr", layer.U, dW, layer.Vh)
    assert_close_to_scale(layer.S.grad, expected, 1e-5)
    assert layer.bias.grad is not None  # bias is a Parameter; freezing is apply_svf's job
    assert not layer.U.requires_grad and not layer.Vh.requires_grad


def test_reparam_and_factorized_give_same_s_gradient_linear():
    lin = nn.Linear(7, 9, bias=False)
    grads = []
    for mode in ("reparam", "factorized"):
        layer = svf_layer_from(lin, mode)
        layer(_randn(5, 7)).square().sum().backward()
        grads.append(layer.S.grad)
    # another operation order: float32 rounding relative to the tensor's scale (conftest)
    assert_close_to_scale(grads[0], grads[1], 1e-5)


class _Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = cache_mod.rebuild_weight

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cache_mod, "rebuild_weight", counted)


def test_cache_reused_in_no_grad_and_invalidated_by_s_changes(monkeypatch):
    count = _Counter(monkeypatch)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = svf_layer_from(conv, "reparam").eval()
    x = _randn(1, 4, 5, 5)
    with torch.no_grad():
        first = layer(x)
        for _ in range(3):
            torch.testing.assert_close(layer(x), first)
    assert count.calls == 1
    with torch.inference_mode():
        layer(x)
        layer(x)
    assert count.calls == 2  # inference tensors are cached apart from no_grad ones

    opt = torch.optim.SGD([layer.S], lr=0.1)
    layer(x).sum().backward()  # graph mode: never cached
    assert count.calls == 3
    opt.step()
    with torch.no_grad():
        changed = layer(x)
    assert count.calls == 4 and not torch.allclose(changed, first)
    with torch.no_grad():
        layer.S.mul_(0.5)  # in-place edit bumps the version counter
        layer(x)
    assert count.calls == 5
    layer.load_state_dict(svf_layer_from(conv, "reparam").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first)
    assert count.calls == 6


def test_cache_used_when_s_frozen_even_with_grad(monkeypatch):
    count = _Counter(monkeypatch)
    layer = svf_layer_from(nn.Conv2d(3, 4, 3), "auto")
    layer.S.requires_grad_(False)
    x = _randn(1, 3, 6, 6, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())  # an inference-mode cache must not leak into autograd
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert x.grad is not None
    assert count.calls == 2


@pytest.mark.parametrize("mode", ["factorized", "reparam", "auto", "tune"])
def test_without_a_graph_every_mode_runs_one_conv_with_the_cached_weight(mode, monkeypatch):
    """Evaluation pays the plain layer's cost whatever the training form (the factorized form is two convs)."""
    count = _Counter(monkeypatch)
    conv = nn.Conv2d(3, 4, 3)
    layer = svf_layer_from(conv, mode)
    x = _randn(2, 3, 6, 6)
    with torch.no_grad():
        assert layer.choose_mode(x) == "reparam"
        first, second = layer(x), layer(x)
        assert _rel_err(first, conv(x)) <= 1e-5 and torch.equal(first, second)
    assert count.calls == 1  # rebuilt once, then the cache
    if mode in ("factorized", "reparam"):
        assert layer.choose_mode(x) == mode  # with a graph to S: the training form asked for


def test_eval_mode_with_grad_keeps_graph_to_s():
    conv = nn.Conv2d(3, 4, 3)
    for mode in MODES:
        layer = svf_layer_from(conv, mode).eval()
        x = _randn(2, 3, 6, 6)
        with torch.no_grad():
            layer(x)  # fills the cache
        layer(x).sum().backward()
        assert layer.S.grad is not None and layer.S.grad.abs().sum() > 0, mode


def test_to_dtype_invalidates_cache_and_stays_exact():
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")
    layer = svf_layer_from(conv, "reparam").eval()
    x = _randn(1, 3, 7, 7)
    with torch.no_grad():
        layer(x)
        layer64 = layer.to(torch.float64)
        assert layer64.U.dtype == torch.float64 and layer64.S.dtype == torch.float64
        out = layer64(x.double())
    assert out.dtype == torch.float64
    assert _rel_err(out.float(), conv(x)) <= 1e-5


def test_deepcopy_gives_independent_cache():
    layer = svf_layer_from(nn.Linear(4, 3), "reparam")
    x = _randn(2, 4)
    with torch.no_grad():
        ref = layer(x)
        twin = copy.deepcopy(layer)
        twin.S.mul_(2)
        assert not torch.allclose(twin(x), ref)
        torch.testing.assert_close(layer(x), ref)


def test_estimate_costs_regimes():
    # big weight, few positions: the rebuild dominates, factorized wins
    small = estimate_costs(groups=1, out_per_group=512, in_per_group=4608, rank=512,
                           positions=98, training=True, input_grad=True)  # fmt: skip
    assert small["factorized"] < small["reparam"]
    # expanding 1x1 conv on a large map without input grad: the U-conv dominates
    big = estimate_costs(groups=1, out_per_group=256, in_per_group=64, rank=64,
                         positions=2 * 160 * 160, training=True, input_grad=False)  # fmt: skip
    assert big["reparam"] < big["factorized"]
    infer = estimate_costs(groups=1, out_per_group=8, in_per_group=9, rank=8,
                           positions=100, training=False, input_grad=False)  # fmt: skip
    assert infer["reparam"] <= infer["factorized"]


def test_auto_measures_once_per_shape(monkeypatch):
    calls = []
    real = plan_mod.time_forms
    monkeypatch.setattr(plan_mod, "time_forms", lambda layer, x, reps: calls.append(tuple(x.shape)) or real(layer, x, reps))
    layer = svf_layer_from(nn.Conv2d(64, 64, 3, padding=1), "auto")
    x = _randn(1, 64, 4, 4)
    for _ in range(3):
        layer(x).sum().backward()
    assert calls == [(1, 64, 4, 4)] and layer.choose_mode(x) in ("reparam", "factorized")
    layer(_randn(1, 64, 5, 5)).sum().backward()
    assert len(calls) == 2
    with torch.no_grad():
        assert layer.choose_mode(x) == "reparam"  # cached weight = the plain conv's cost
    assert len(calls) == 2


def test_autocast_runs_and_stays_close():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = _randn(1, 8, 6, 6)
    for mode in MODES:
        layer = svf_layer_from(conv, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert _rel_err(out.float(), conv(x)) < 3e-2, mode


@pytest.mark.parametrize("mode", ["reparam", "factorized"])
@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 5, 5)),
        (nn.Conv2d(4, 6, 3, padding=1), (4, 5, 5)),  # unbatched
        (nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 6)),
        (nn.Linear(5, 4), (2, 3, 5)),
    ],
)
def test_gradcheck_input_s_and_bias(mode, module, shape):
    layer = svf_layer_from(module.double(), mode)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    S = layer.S.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, S, bias):
        return torch.func.functional_call(layer, {"S": S, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, S, bias))


@pytest.mark.parametrize("module, shape", [(nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
                                           (nn.Conv1d(4, 6, 1), (2, 4, 7)), (nn.Linear(4, 6), (3, 4))])
def test_factorized_output_takes_an_inplace_op(module, shape):
    """A ResNet's ReLU(inplace=True) follows the conv: the Function's output must not be a view."""
    layer = svf_layer_from(module, "factorized")
    x = _randn(*shape, requires_grad=True)
    torch.relu_(layer(x)).sum().backward()
    y = torch.relu(module(x))
    assert layer.S.grad is not None and torch.allclose(torch.relu(layer(x)), y, atol=1e-5)


def test_factorized_training_without_input_grad_or_bias_grad():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fac, rep = svf_layer_from(conv, "factorized"), svf_layer_from(conv, "reparam")
    for layer in (fac, rep):
        layer.bias.requires_grad_(False)
        layer(_randn(2, 4, 5, 5)).square().sum().backward()
    # another operation order: float32 rounding relative to the tensor's scale (conftest)
    assert_close_to_scale(fac.S.grad, rep.S.grad, 1e-5)
    assert fac.bias.grad is None


def test_auto_measures_both_forms_once_per_geometry_in_the_shared_plan(monkeypatch):
    from svfseg.svf import FormsPlan

    calls = []
    fake = {"plan": "reparam", "seconds": {"reparam": 1.0, "factorized": 2.0}}
    monkeypatch.setattr(plan_mod, "time_forms", lambda layer, x, reps: calls.append(tuple(x.shape)) or fake)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    shared = FormsPlan()
    a, b = (SVFConv2d.from_conv(conv, mode="tune") for _ in range(2))  # "tune": auto's older name
    a.forms_plan = b.forms_plan = shared
    x = torch.randn(2, 4, 8, 8)
    assert a.choose_mode(x) == "reparam" and b.choose_mode(x) == "reparam"
    assert calls == [(2, 4, 8, 8)]  # equal layers share one measurement
    assert shared.seconds == {next(iter(shared.forms)): fake["seconds"]}
    with torch.no_grad():
        assert a.choose_mode(torch.randn(1, 4, 5, 5)) == "reparam"  # no graph: cached weight, no timing
    assert len(calls) == 1


def test_auto_measures_real_forms_and_stays_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    layer = SVFConv2d.from_conv(conv, mode="auto")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (key, form), = layer.forms_plan.forms.items()
    seconds = layer.forms_plan.seconds[key]
    assert set(seconds) == {"reparam", "factorized"} and form == min(seconds, key=seconds.get)
    assert "SVFConv2d(4, 6, k=[3, 3]" in key and "x=[2, 4, 8, 8] contiguous float64 cpu grad=1" in key
    assert layer.S.grad is None  # timing left no gradient behind
    torch.testing.assert_close(y, conv(x), rtol=1e-10, atol=1e-10)
