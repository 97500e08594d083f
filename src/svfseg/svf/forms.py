"""What decides a layer's forward form ("reparam" or "factorized"): the cost model (the fallback) and the plan key."""

from __future__ import annotations

import torch
from torch import nn

# Cost of one elementwise pass per activation element (the S gradient, the input gradient
# through S), in multiply-accumulate units: such passes are memory-bound while convs run as
# GEMMs at tens of MACs per memory access. Fitted to single-thread CPU timings of the
# ResNet-50 layer2-4 shapes (estimated and measured ratios agree within ~5%); only near-ties
# depend on it.
_ELEMENTWISE_COST = 48.0


def estimate_costs(
    *,
    groups: int,
    out_per_group: int,
    in_per_group: int,
    rank: int,
    positions: int,
    training: bool,
    input_grad: bool,
) -> dict[str, float]:
    """Estimates the cost of one call of each forward form, in multiply-accumulates.

    "reparam" pays a fixed rebuild (out x rank x in) in the forward and again in the backward
    (projecting the weight gradient on U, Vh), plus the conv and the full weight gradient.
    "factorized" pays the V-conv and the 1x1 U-conv per output position (the U-conv twice:
    forward and backward), one or two elementwise passes for S, and no weight gradient.

    Args:
        groups: conv groups (1 for Linear).
        out_per_group: output channels per group.
        in_per_group: in/groups * prod(kernel).
        rank: kept rank per group.
        positions: batch x output positions (rows for Linear).
        training: whether a graph to S is recorded (a backward will follow).
        input_grad: whether the input needs a gradient.

    Returns:
        {"reparam": cost, "factorized": cost}.
    """
    g, m, n, r, p = groups, out_per_group, in_per_group, rank, positions
    rebuild = g * m * r * n
    conv = p * g * m * n
    conv_v = p * g * r * n
    conv_u = p * g * m * r
    elementwise = _ELEMENTWISE_COST * p * g * r
    if not training:
        # Without a graph the rebuilt weight is cached, and S folds into the U-conv weight.
        return {"reparam": float(conv), "factorized": float(conv_v + conv_u)}
    reparam = 2 * rebuild + 2 * conv + (conv if input_grad else 0)
    factorized = conv_v + 2 * conv_u + elementwise + ((conv_v + elementwise) if input_grad else 0)
    return {"reparam": float(reparam), "factorized": float(factorized)}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype for the device, or None when autocast is off."""
    if device_type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def estimate_form(layer: nn.Module, x: torch.Tensor) -> str:
    """The cost model's choice for a training call of ``layer`` on ``x`` (the fallback where nothing was measured)."""
    g, m, r = layer.U.shape
    costs = estimate_costs(
        groups=g, out_per_group=m, in_per_group=layer.Vh.shape[2], rank=r,
        positions=layer._positions(x), training=True, input_grad=x.requires_grad,
    )  # fmt: skip
    return min(costs, key=costs.get)


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "strided"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


def form_key(layer: nn.Module, x: torch.Tensor) -> str:
    """What decides the faster form, as one readable string (a forms plan's key).

    The layer's geometry (type, weight shape, rank, stride, padding, dilation, groups, bias, folded
    BatchNorm) and the input's shape, memory layout, dtype, device type (not its index: every DDP
    rank shares one plan), whether it needs a gradient, and the autocast dtype.
    """
    amp = autocast_dtype(x.device.type)
    return (
        f"{layer.geometry_text()} | x={list(x.shape)} {_layout(x)} {_dtype_name(x.dtype)} {x.device.type} "
        f"grad={int(x.requires_grad)} amp={_dtype_name(amp)}"
    )
