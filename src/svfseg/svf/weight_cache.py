"""The rebuilt weight W = U diag(S) Vh of an SVD layer, and its cache for calls without a graph to S."""

from __future__ import annotations

import torch
from torch import nn

from svfseg.svf.decompose import rebuild_weight


def _version(t: torch.Tensor) -> int:
    # Inference tensors carry no version counter; they cannot change in place outside
    # inference mode, so their storage pointer identifies them.
    return -1 if t.is_inference() else t._version


def _accumulation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float64 or device.type == "mps":  # MPS has no float64
        return dtype if dtype == torch.float64 else torch.float32
    return torch.float64 if dtype == torch.float32 else torch.float32


def rebuild(layer: nn.Module, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rebuilds the layer's (weight, bias), a folded BatchNorm included.

    Args:
        layer: the SVD layer.
        precise: accumulate in a wider dtype (for cached/merged weights, built once: 5x smaller
            error, half the float32 entries bit-identical).
    """
    # Autocast off: the conv casts the result itself, and a half-precision rebuild
    # would add error on top of that cast.
    with torch.autocast(layer.U.device.type, enabled=False):
        if not precise:
            U, bias = layer._factors()
            return rebuild_weight(U, layer.S, layer.Vh, layer.weight_shape), bias
        dtype = layer.U.dtype
        wide = _accumulation_dtype(dtype, layer.U.device)
        U, bias = layer._factors(wide)
        weight = rebuild_weight(U, layer.S.to(wide), layer.Vh.to(wide), layer.weight_shape)
        return weight.to(dtype), None if bias is None else bias.to(dtype)


def _cache_key(layer: nn.Module) -> tuple:
    tensors = [layer.S, layer.U, layer.Vh]
    if layer.bias is not None:
        tensors.append(layer.bias)
    bn = layer.folded_bn
    if bn is not None:
        tensors += [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
    key = [(t.data_ptr(), _version(t)) for t in tensors]
    return (tuple(key), layer.S.device, layer.S.dtype, torch.is_inference_mode_enabled())


class WeightCache:
    """One layer's rebuilt weight, reused until S, U, Vh, the bias or a folded BN change.

    Changes are seen through version counters and storage pointers; edits through ``.data``
    are not (the layer's `clear_cache` drops the entry).
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    def clear(self) -> None:
        """Drops the cached weight."""
        self._entry = None

    def weight(self, layer: nn.Module, needs_graph: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) for a forward of ``layer``; cached unless a graph to S is needed."""
        if needs_graph:
            return rebuild(layer)  # never cached: the graph to S must stay intact
        if torch.compiler.is_compiling():
            return rebuild(layer, precise=True)  # storage pointers are not traceable
        key = _cache_key(layer)
        if self._entry is not None and self._entry[0] == key:
            return self._entry[1], self._entry[2]
        with torch.no_grad():
            weight, bias = rebuild(layer, precise=True)
        self._entry = (key, weight, bias)
        return weight, bias
