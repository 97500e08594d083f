"""The factorized forward form: y = U(S * V x) as one autograd Function that keeps only V x."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def project(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spatial: int | None) -> torch.Tensor:
    """Per-group channel projection: 1x1 grouped conv (``spatial`` dims) or linear (None)."""
    g, out, inp = weight.shape
    if spatial is None:
        return F.linear(t, weight[0], bias)
    plain = g == 1 and t.is_contiguous() and weight.dtype == t.dtype and not torch.is_autocast_enabled(t.device.type)
    if bias is None and plain:
        # The backward's U^T projection as one batched matrix product on the (N, C, positions) view: a 1x1
        # conv would first copy the transposed weight (59 -> 52 ms on ResNet-50 layer4's 2048x512 U at
        # 2x41x41 on one CPU thread). With a bias the conv, which starts its GEMM from the bias, is as fast.
        n = t.shape[0]
        # written into a tensor of the output's shape: a view returned by an autograd Function could not be
        # modified in place afterwards (the ReLU(inplace=True) that follows a ResNet conv)
        y = t.new_empty((n, out, *t.shape[2:]))
        torch.matmul(weight[0], t.reshape(n, inp, -1), out=y.view(n, out, -1))
        return y
    w = weight.reshape(g * out, inp, *(1,) * spatial)
    return CONV_FN[spatial](t, w, bias, 1, 0, 1, g)


def _channel_dim(t: torch.Tensor, spatial: int | None) -> int:
    return t.ndim - 1 if spatial is None else t.ndim - spatial - 1


def _channel_sum(t: torch.Tensor, spatial: int | None) -> torch.Tensor:
    cd = _channel_dim(t, spatial)
    dims = tuple(d for d in range(t.ndim) if d != cd)
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    return t.sum(dim=dims, dtype=acc) if dims else t.to(acc)


def _channel_view(vec: torch.Tensor, like: torch.Tensor, spatial: int | None) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[_channel_dim(like, spatial)] = -1
    return vec.reshape(shape)


class Geometry(NamedTuple):
    """Static arguments of the V-projection: conv (``spatial`` dims) or linear (None)."""

    spatial: int | None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1


def v_project(x: torch.Tensor, v_weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
    if geo.spatial is None:
        return F.linear(x, v_weight)
    return CONV_FN[geo.spatial](x, v_weight, None, geo.stride, geo.padding, geo.dilation, geo.groups)


def _layout_of(t: torch.Tensor, spatial: int) -> torch.memory_format:
    """channels_last(_3d) when ``t`` is laid out so (and not also plainly contiguous), else contiguous."""
    cl = {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial)
    if cl is not None and not t.is_contiguous() and t.is_contiguous(memory_format=cl):
        return cl
    return torch.contiguous_format


def v_input_grad(grad_z: torch.Tensor, x_shape: Sequence[int], v_weight: torch.Tensor, geo: Geometry):
    if geo.spatial is None:
        return grad_z.matmul(v_weight)
    # Only the input's shape is needed: convolution_backward reads no input values for the
    # input gradient (what torch.nn.grad.conv2d_input does too). On the CPU an uninitialised
    # tensor of the input's layout costs no resident memory (its pages are never touched) and
    # takes oneDNN's fast path: 5-10% faster than a zero-stride expanded stand-in on the
    # ResNet-50 layer2-4 shapes (benchmarks/bench_svf.py); on a GPU it would be real memory.
    if grad_z.device.type == "cpu":
        layout = _layout_of(grad_z, geo.spatial)
        like = torch.empty(x_shape, dtype=grad_z.dtype, device=grad_z.device, memory_format=layout)
    else:
        like = grad_z.new_empty(1).expand(*x_shape)
    zeros = [0] * geo.spatial
    return torch.ops.aten.convolution_backward(
        grad_z, like, v_weight, None, list(geo.stride), list(geo.padding), list(geo.dilation),
        False, zeros, geo.groups, [True, False, False],
    )[0]  # fmt: skip


def _scaled(U: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """U with its rows scaled (a folded BatchNorm's ``a``), or U itself."""
    if scale is None:
        return U
    g, m, _ = U.shape
    return U * scale.to(U.dtype).reshape(g, m, 1)


class Factorized(torch.autograd.Function):
    """y = U-projection(V-projection(x) * S) + bias, keeping only z = V-projection(x).

    Autograd would keep x for the V-conv (its input gradient needs only Vh), and z and z * S
    for the scaling; here S is folded into the small U weight, dL/dS is one reduction over
    z, the input gradient needs only the shapes, and no weight gradient is formed anywhere.
    A folded BatchNorm's scale comes as ``scale`` (U's rows) and is applied again in the
    backward, so U itself (a buffer) is what is kept, not a scaled copy per layer.
    """

    @staticmethod
    def forward(ctx, x, S, U, scale, v_weight, bias, geo):  # noqa: D102 - autograd.Function protocol
        z = v_project(x, v_weight, geo)
        ctx.save_for_backward(z, S, U, scale, v_weight)
        ctx.geo = geo
        ctx.x_shape = tuple(x.shape)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return project(z, _scaled(U, scale) * S.to(U.dtype).unsqueeze(-2), bias, geo.spatial)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102 - autograd.Function protocol
        z, S, U, scale, v_weight = ctx.saved_tensors
        geo = ctx.geo
        need_x, need_s, _, _, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_s = grad_bias = None
        if need_x or need_s:
            # back through the U projection: U^T per group (autocast may hand a half grad)
            grad_zs = project(grad_y, _scaled(U, scale).mT.to(grad_y.dtype), None, geo.spatial)
            if need_s:
                grad_s = _channel_sum(grad_zs * z.to(grad_zs.dtype), geo.spatial)
                grad_s = grad_s.reshape(S.shape).to(S.dtype)
            if need_x:
                scale_s = _channel_view(S.reshape(-1).to(grad_zs.dtype), grad_zs, geo.spatial)
                grad_z = grad_zs.mul_(scale_s)
                grad_x = v_input_grad(grad_z, ctx.x_shape, v_weight.to(grad_z.dtype), geo).to(ctx.x_dtype)
        if need_bias:
            grad_bias = _channel_sum(grad_y, geo.spatial).to(ctx.bias_dtype)
        return grad_x, grad_s, None, None, None, grad_bias, None

