"""The SVD layers for Conv1d/2d/3d and Linear, and `svf_layer_from` (the plain layer -> its SVD form)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from svfseg.svf.base import SVFLayer
from svfseg.svf.decompose import decompose_weight
from svfseg.svf.factorized import CONV_FN, Geometry
from svfseg.svf.forms import estimate_costs

__all__ = [
    "SUPPORTED_TYPES", "SVFConv1d", "SVFConv2d", "SVFConv3d", "SVFLayer", "SVFLinear", "estimate_costs", "svf_layer_from",
]  # fmt: skip

_CONV_CLS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _explicit_padding(
    padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> list[int]:
    """Padding in F.pad order (last dim first, (before, after) each), as nn.ConvNd pads."""
    pairs = []
    for i, (k, d) in enumerate(zip(kernel_size, dilation)):
        if padding == "valid":
            pairs.append((0, 0))
        elif padding == "same":
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        else:
            pairs.append((padding[i], padding[i]))
    return [v for pair in reversed(pairs) for v in pair]


class _SVFConvNd(SVFLayer):
    """SVD form of nn.ConvNd; stride, padding (any padding_mode), dilation and groups kept."""

    dim: int = 2

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        padding: str | tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        padding_mode: str = "zeros",
        mode: str = "auto",
    ) -> None:
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(U, S, Vh, bias, shape, mode)
        if U.shape[0] != groups:
            raise ValueError(f"{type(self).__name__}: U has {U.shape[0]} groups, conv has {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.padding_mode = padding_mode
        self._pad = _explicit_padding(self.padding, self.kernel_size, self.dilation)

    @classmethod
    def from_conv(
        cls, conv: nn.Module, mode: str = "auto", svd_dtype: torch.dtype = torch.float64, rank_multiple: int = 1
    ) -> "_SVFConvNd":
        """Decomposes an nn.ConvNd exactly (full rank, per group; floored with ``rank_multiple`` > 1).

        Args:
            conv: the nn.Conv1d/2d/3d to decompose (left unchanged).
            mode: forward form, see `SVFConfig.mode`.
            svd_dtype: dtype of the SVD computation.
            rank_multiple: see `SVFConfig.rank_multiple`.

        Returns:
            The SVD layer, on the conv's device and dtype.
        """
        U, S, Vh = decompose_weight(conv.weight, conv.groups, svd_dtype, rank_multiple)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        layer = cls(
            U, S, Vh, bias,
            in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode, mode=mode,
        )  # fmt: skip
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, rank={self.rank}, mode={self.mode}"
        )
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ("" if self.bias is not None else ", bias=False")

    def geometry_text(self) -> str:  # noqa: D102 - documented in SVFLayer
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, k={list(self.kernel_size)}, "
            f"s={list(self.stride)}, p={self._pad}, {self.padding_mode}, d={list(self.dilation)}, g={self.groups}, "
            f"{self._factor_text()})"
        )

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, str | tuple[int, ...]]:
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._pad, mode=self.padding_mode), (0,) * self.dim

    def _positions(self, x: torch.Tensor) -> int:
        spatial = x.shape[-self.dim :]
        batch = math.prod(x.shape[: -self.dim - 1])
        out = 1
        for i, size in enumerate(spatial):
            before, after = self._pad[2 * (self.dim - 1 - i)], self._pad[2 * (self.dim - 1 - i) + 1]
            eff = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            out *= max((size + before + after - eff) // self.stride[i] + 1, 0)
        return batch * out

    def _forward_reparam(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._padded(x)
        weight, bias = self._effective()
        return CONV_FN[self.dim](x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def _geometry(self) -> Geometry:
        """Conv geometry with integer padding (string or non-zero padding is applied by `_forward_factorized`)."""
        before, after = self._pad[0::2][::-1], self._pad[1::2][::-1]
        padding = tuple(before) if self.padding_mode == "zeros" and before == after else (0,) * self.dim
        return Geometry(self.dim, self.stride, padding, self.dilation, self.groups)

    def _v_weight(self) -> torch.Tensor:
        g, _, r = self.U.shape
        return self.Vh.reshape(g * r, self.in_channels // g, *self.kernel_size)

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        geo = self._geometry()
        if any(self._pad) and not any(geo.padding):  # asymmetric "same" or reflect/replicate/circular
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if x.ndim == self.dim + 1:  # unbatched input: the input-gradient kernel wants a batch dim
            return self._run_factorized(x.unsqueeze(0), geo).squeeze(0)
        return self._run_factorized(x, geo)

    def to_plain(self, fold_bn: bool = False) -> nn.Module:  # noqa: D102 - documented in SVFLayer
        weight, bias = self._plain_params(fold_bn)
        conv = torch.nn.utils.skip_init(
            _CONV_CLS[self.dim], self.in_channels, self.out_channels, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=bias is not None, padding_mode=self.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        conv.weight = weight
        conv.bias = bias
        return conv.train(self.training)


class SVFConv1d(_SVFConvNd):
    """SVD form of nn.Conv1d."""

    dim = 1


class SVFConv2d(_SVFConvNd):
    """SVD form of nn.Conv2d."""

    dim = 2


class SVFConv3d(_SVFConvNd):
    """SVD form of nn.Conv3d."""

    dim = 3


class SVFLinear(SVFLayer):
    """SVD form of nn.Linear (a single group)."""

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_features: int,
        out_features: int,
        mode: str = "auto",
    ) -> None:
        super().__init__(U, S, Vh, bias, (out_features, in_features), mode)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mode: str = "auto", svd_dtype: torch.dtype = torch.float64, rank_multiple: int = 1
    ) -> "SVFLinear":
        """Decomposes an nn.Linear exactly (full rank; floored with ``rank_multiple`` > 1).

        Args:
            linear: the layer to decompose (left unchanged).
            mode: forward form, see `SVFConfig.mode`.
            svd_dtype: dtype of the SVD computation.
            rank_multiple: see `SVFConfig.rank_multiple`.

        Returns:
            The SVD layer, on the linear layer's device and dtype.
        """
        U, S, Vh = decompose_weight(linear.weight, 1, svd_dtype, rank_multiple)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(
            U, S, Vh, bias, in_features=linear.in_features, out_features=linear.out_features,
            mode=mode,
        )  # fmt: skip
        return layer.train(linear.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, mode={self.mode}, bias={self.bias is not None}"
        )

    def geometry_text(self) -> str:  # noqa: D102 - documented in SVFLayer
        return f"{type(self).__name__}({self.in_features}, {self.out_features}, {self._factor_text()})"

    def _positions(self, x: torch.Tensor) -> int:
        return math.prod(x.shape[:-1])

    def _forward_reparam(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._effective()
        return F.linear(x, weight, bias)

    def _geometry(self) -> Geometry:
        return Geometry(None)

    def _v_weight(self) -> torch.Tensor:
        return self.Vh[0]

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_factorized(x, self._geometry())

    def to_plain(self, fold_bn: bool = False) -> nn.Module:  # noqa: D102 - documented in SVFLayer
        weight, bias = self._plain_params(fold_bn)
        linear = torch.nn.utils.skip_init(
            nn.Linear, self.in_features, self.out_features, bias=bias is not None,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        linear.weight = weight
        linear.bias = bias
        return linear.train(self.training)


def svf_layer_from(
    module: nn.Module, mode: str = "auto", svd_dtype: torch.dtype = torch.float64, rank_multiple: int = 1
) -> SVFLayer:
    """Decomposes a supported plain layer (exact type nn.Conv1d/2d/3d or nn.Linear).

    Args:
        module: the layer.
        mode: forward form.
        svd_dtype: dtype of the SVD computation.
        rank_multiple: see `SVFConfig.rank_multiple` (1: exact).

    Returns:
        The matching SVF layer.
    """
    kind = type(module)
    if kind is nn.Linear:
        return SVFLinear.from_linear(module, mode, svd_dtype, rank_multiple)
    for dim, conv_cls in _CONV_CLS.items():
        if kind is conv_cls:
            return _SVF_CONV_BY_DIM[dim].from_conv(module, mode, svd_dtype, rank_multiple)
    raise TypeError(
        f"expected nn.Conv1d/2d/3d or nn.Linear (exact type), found {kind.__module__}.{kind.__qualname__}"
    )


SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_SVF_CONV_BY_DIM: dict[int, type[_SVFConvNd]] = {1: SVFConv1d, 2: SVFConv2d, 3: SVFConv3d}
