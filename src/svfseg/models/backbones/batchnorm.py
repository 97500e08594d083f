"""Structurally frozen BatchNorm: always in eval mode, no trainable affine parameters."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _FrozenMixin:
    """Makes ``train(mode)`` a no-op for this module: it stays in eval mode."""

    def train(self, mode: bool = True):  # noqa: D102 - same contract as nn.Module.train
        return super().train(False)  # type: ignore[misc]


class FrozenBatchNorm1d(_FrozenMixin, nn.BatchNorm1d):
    """BatchNorm1d that always normalises with its running statistics."""


class FrozenBatchNorm2d(_FrozenMixin, nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics."""


class FrozenBatchNorm3d(_FrozenMixin, nn.BatchNorm3d):
    """BatchNorm3d that always normalises with its running statistics."""


_FROZEN = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    # SyncBatchNorm in a backbone sees 4-D feature maps; frozen it needs no synchronisation.
    nn.SyncBatchNorm: FrozenBatchNorm2d,
}


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm frozen by :func:`freeze_batchnorm`."""
    return isinstance(module, _FrozenMixin)


def _frozen_copy(bn: _BatchNorm, name: str) -> _BatchNorm:
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(
            f"freeze_batchnorm: BatchNorm {name or '<root>'} has no running statistics "
            "(track_running_stats=False), so it cannot be frozen"
        )
    cls = next((f for base, f in _FROZEN.items() if type(bn) is base), None)
    if cls is None:
        raise TypeError(f"freeze_batchnorm: unsupported BatchNorm type {type(bn).__name__} at {name}")
    frozen = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    frozen.load_state_dict(bn.state_dict())
    frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.train(False)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a frozen copy (in place where possible).

    Frozen BatchNorms ignore ``train()``, so they always use (and never update) their running
    statistics, and their affine parameters have ``requires_grad=False``. They are subclasses
    of the original BatchNorm class with the same state-dict keys, so weight files load the
    same way before and after freezing. A caller that wants to train the affine parameters
    (the "train BN" policy) may set ``requires_grad`` back on them; the statistics stay fixed.

    Args:
        module: Any module; BatchNorms already frozen are left as they are.

    Returns:
        ``module`` itself, or the frozen copy when ``module`` is itself a BatchNorm.
    """
    if isinstance(module, _BatchNorm) and not is_frozen_batchnorm(module):
        return _frozen_copy(module, "")
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not is_frozen_batchnorm(child):
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, _frozen_copy(child, qualified))
    return module
