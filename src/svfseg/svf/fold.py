"""Frozen BatchNorm folding: BN(conv(x)) = a * conv(x) + b, for SVD layers and plain convs."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ConvBNPairs = Sequence[Sequence[str]]


def bn_scale_shift(bn: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (a, b) with BN_eval(y) = a * y + b per channel: a = gamma / sqrt(var + eps), b = beta - a * mean.

    Args:
        bn: a BatchNorm with running statistics, or a `FoldedBatchNorm`.
        dtype: compute in this dtype (default: the statistics' own).

    Returns:
        Two (channels,) tensors (differentiable in gamma/beta).
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    a = torch.rsqrt(cast(bn.running_var) + bn.eps)
    if bn.weight is not None:
        a = cast(bn.weight) * a
    b = -a * cast(bn.running_mean)
    if bn.bias is not None:
        b = b + cast(bn.bias)
    return a, b


def has_trainable_affine(bn: nn.Module) -> bool:
    """Whether any of the BatchNorm's own parameters (gamma, beta) requires grad."""
    return any(p.requires_grad for p in bn.parameters(recurse=False))


class FoldedBatchNorm(nn.Module):
    """Stands in for a BatchNorm whose affine map was folded into the preceding SVD layer.

    Its forward is the identity: the SVD layer already applies ``a * y + b``. It keeps the
    BatchNorm's parameters and buffers under their original names, so the model's state
    dict (and strict loading of files written before folding) is unchanged, and the SVD
    layer reads ``a`` and ``b`` from it on every call, so loading new statistics stays exact.
    `restore` gives the original BatchNorm back (`merge_svf`).
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        self.original_type = type(bn)
        for name, param in bn.named_parameters(recurse=False):
            self.register_parameter(name, param)
        if not bn.affine:
            self.weight = self.bias = None
        for name, buf in bn.named_buffers(recurse=False):
            self.register_buffer(name, buf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - identity by design
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, folded from {self.original_type.__name__}"

    def restore(self) -> _BatchNorm:
        """Returns a BatchNorm of the original type with these very tensors, in eval mode."""
        bn = self.original_type(
            self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine, device="meta"
        )
        for name, param in self.named_parameters(recurse=False):
            setattr(bn, name, param)
        for name, buf in self.named_buffers(recurse=False):
            bn.register_buffer(name, buf)
        return bn.train(False)


def _get(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"fold_bn: {what} {name!r} is not a module of {type(model).__name__}") from None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_pairs(model: nn.Module, pairs: ConvBNPairs) -> list[tuple[str, str]]:
    """Validates (conv name, BN name) pairs against the model; returns them as tuples.

    Raises:
        ValueError: a name is missing, the BN is no BatchNorm with running statistics, its
            channel count differs from the conv's outputs, or a BN appears twice.
    """
    out, seen = [], set()
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
            raise ValueError(f"fold_bn: expected (conv name, bn name) pairs, found {pair!r}")
        conv_name, bn_name = pair
        conv, bn = _get(model, conv_name, "conv"), _get(model, bn_name, "BatchNorm")
        if not isinstance(bn, (_BatchNorm, FoldedBatchNorm)):
            raise ValueError(f"fold_bn: {bn_name!r} should be a BatchNorm, found {type(bn).__name__}")
        if getattr(bn, "running_var", None) is None:
            raise ValueError(f"fold_bn: BatchNorm {bn_name!r} has no running statistics to fold")
        channels = getattr(conv, "out_channels", getattr(conv, "out_features", None))
        if channels != bn.num_features:
            raise ValueError(
                f"fold_bn: {conv_name!r} has {channels} output channels but {bn_name!r} has "
                f"{bn.num_features} features"
            )
        if bn_name in seen:
            raise ValueError(f"fold_bn: BatchNorm {bn_name!r} is listed twice")
        seen.add(bn_name)
        out.append((conv_name, bn_name))
    return out


def trainable_bn_error(name: str) -> ValueError:
    """The error for a BatchNorm that is to be folded but trains."""
    return ValueError(
        f"fold_bn: BatchNorm {name!r} has trainable affine parameters; folding needs a frozen "
        "BatchNorm (set svf.train_bn=false / drop it from trainable_modules, or fold_bn=false)"
    )


def refuse_trainable(bn: nn.Module, name: str) -> None:
    """Raises when a BatchNorm to fold has trainable affine parameters."""
    if has_trainable_affine(bn):
        raise trainable_bn_error(name)


@torch.no_grad()
def fold_conv_bn(model: nn.Module, pairs: Iterable[Sequence[str]]) -> nn.Module:
    """Folds frozen BatchNorms into the plain convs before them, in place (inference export).

    Each conv gets weight ``a[:, None] * W`` and bias ``a * bias + b``; the BatchNorm becomes
    nn.Identity, so the state dict loses its keys and the conv gains a bias: this is a
    deployment step, not a training one. Each BN must be in eval mode (its running
    statistics are what gets folded).

    Args:
        model: the network.
        pairs: (conv name, BN name) pairs, e.g. ``backbone.conv_bn_pairs()``; pairs whose
            conv is not a plain nn.Conv1d/2d/3d (an SVD layer, an Identity) are skipped.

    Returns:
        The same model object.
    """
    for conv_name, bn_name in check_pairs(model, list(pairs)):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or isinstance(bn, FoldedBatchNorm):
            continue
        if bn.training:
            raise ValueError(f"fold_conv_bn: BatchNorm {bn_name!r} is in training mode; call model.eval() first")
        a, b = bn_scale_shift(bn)
        shape = (-1,) + (1,) * (conv.weight.ndim - 1)
        conv.weight.mul_(a.to(conv.weight.dtype).reshape(shape))
        bias = b if conv.bias is None else a * conv.bias + b
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        _set(model, bn_name, nn.Identity())
    return model
