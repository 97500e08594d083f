"""Choosing a layer's forward form ("reparam" or "factorized"): the cost model, timing, per-shape plans."""

from __future__ import annotations

import torch
from torch import nn

from svfseg.svf.tune import time_forms

# Cost of one elementwise pass per activation element (the S gradient, the input gradient
# through S), in multiply-accumulate units: such passes are memory-bound while convs run as
# GEMMs at tens of MACs per memory access. Fitted to single-thread CPU timings of the
# ResNet-50 layer2-4 shapes (estimated and measured ratios agree within ~5%); only near-ties
# depend on it.
_ELEMENTWISE_COST = 48.0
_MAX_PLANS = 256


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


def _estimate(layer: nn.Module, x: torch.Tensor) -> str:
    g, m, r = layer.U.shape
    costs = estimate_costs(
        groups=g, out_per_group=m, in_per_group=layer.Vh.shape[2], rank=r,
        positions=layer._positions(x), training=True, input_grad=x.requires_grad,
    )  # fmt: skip
    return min(costs, key=costs.get)


def _tune_key(layer: nn.Module, x: torch.Tensor) -> tuple:
    """What decides the faster form: the layer's geometry and the input's shape, dtype, device."""
    return (
        type(layer).__name__, layer.weight_shape, layer.rank, layer._geometry(), layer.bias is not None,
        layer.folded_bn is not None, tuple(x.shape), x.dtype, str(x.device), x.requires_grad,
        tuple(x.stride()), autocast_dtype(x.device.type),
    )  # fmt: skip


def choose_form(layer: nn.Module, x: torch.Tensor, plans: dict[tuple, str]) -> str:
    """The forward form for ``layer`` on input ``x`` when a graph to S is needed.

    "auto" estimates; "tune" times both forms once per `_tune_key` (in ``layer.tune_cache``).
    The choice is remembered in ``plans`` per input shape, bounded to `_MAX_PLANS` entries.
    """
    key = (tuple(x.shape), x.device.type, x.dtype, x.requires_grad)
    plan = plans.get(key)
    if plan is not None:
        return plan
    if torch.compiler.is_compiling():
        return _estimate(layer, x)  # no timing or cache writes inside a traced graph
    if layer.mode == "tune":
        tune_key = _tune_key(layer, x)
        entry = layer.tune_cache.get(tune_key)
        if entry is None:
            entry = time_forms(layer, x)
            layer.tune_cache.put(tune_key, entry)
        plan = entry["plan"]
    else:
        plan = _estimate(layer, x)
    if len(plans) >= _MAX_PLANS:  # many input sizes (e.g. multi-scale): stay bounded
        plans.clear()
    plans[key] = plan
    return plan
