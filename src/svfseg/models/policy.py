"""Apply an :class:`~svfseg.policies.SVFPolicy` (the `svf:` section) (the paper's layer2-4 by default) to a backbone with named stages."""

from __future__ import annotations

import logging

import torch
from torch import nn

from svfseg.policies import SVFPolicy
from svfseg.svf import (SVFConfig, apply_svf, decompose_weight, floored_rank, full_rank, rebuild_weight, svf_layers,
                        trained_factor_parameters)

logger = logging.getLogger(__name__)

__all__ = ["SVFPolicy", "apply_policy", "floor_ranks_outside", "folds_bn", "svf_config"]


def folds_bn(policy: SVFPolicy) -> bool:
    """Whether ``policy`` folds frozen BN into its SVD layers (``fold_bn`` None: whenever BN is frozen)."""
    return (not policy.train_bn) if policy.fold_bn is None else bool(policy.fold_bn)


def svf_config(policy: SVFPolicy, backbone: nn.Module | None = None) -> SVFConfig:
    """The per-layer :class:`svfseg.svf.SVFConfig` that ``policy`` stands for.

    Args:
        policy: What to decompose and train.
        backbone: With BN folding, the backbone whose ``conv_bn_pairs()`` are folded.
    """
    pairs = None
    if folds_bn(policy) and backbone is not None:
        if hasattr(backbone, "conv_bn_pairs"):
            pairs = backbone.conv_bn_pairs()
        else:  # not an svfseg Backbone: nothing is declared, so nothing is folded
            logger.info("SVFPolicy.fold_bn: %s declares no conv_bn_pairs(); no BN folded", type(backbone).__name__)
    return SVFConfig(
        target_modules=policy.target_regex,
        skip_1x1=policy.skip_1x1,
        skip_3x3=policy.skip_3x3,
        mode=policy.mode,
        train_bias=policy.train_bias,
        fold_bn=pairs,
        train_factors=policy.train,
        rank_multiple=policy.rank_multiple,
    )


def floor_ranks_outside(backbone: nn.Module, policy: SVFPolicy) -> list[str]:
    """Replace every conv / linear weight outside ``policy.stages`` by its rank-floored rebuild, in place.

    The SVF authors decompose every backbone conv at the floored rank and freeze the S of the stages
    they do not train; a frozen SVD layer computes its rebuilt weight, so the plain layer holding that
    weight is the same network. Returns ``"name in -> out"`` for each layer that lost rank.
    """
    lossy = []
    with torch.no_grad():
        for name, m in backbone.named_modules():
            if type(m) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) or name.split(".")[0] in policy.stages:
                continue
            groups = getattr(m, "groups", 1)
            full = full_rank(m.weight.shape, groups)
            kept = floored_rank(full, policy.rank_multiple)
            if kept < full:
                U, S, Vh = decompose_weight(m.weight, groups, rank_multiple=policy.rank_multiple)
                m.weight.copy_(rebuild_weight(U, S, Vh, m.weight.shape))
                lossy.append(f"{name} {full} -> {kept}")
    return lossy


def apply_policy(backbone: nn.Module, policy: SVFPolicy) -> nn.Module:
    """Decompose the policy's stages of ``backbone`` in place and set what trains.

    Afterwards exactly these backbone parameters require grad: the factors of the decomposed
    layers named in ``policy.train`` (the singular values by default), plus BN affine
    parameters inside ``stages`` when ``train_bn`` and conv biases when ``train_bias``. Frozen BN after a decomposed conv is folded into the SVD
    layer when the policy says so (exact; same state-dict keys). Keeping BN in eval mode is
    the caller's job (the few-shot models do it in ``train()``).

    Args:
        backbone: A module whose stages are child modules named as in ``policy.stages``.
        policy: What to decompose and train.

    Returns:
        ``backbone`` (modified in place).
    """
    children = dict(backbone.named_children())
    missing = [s for s in policy.stages if s not in children]
    if missing:
        raise ValueError(
            f"SVFPolicy.stages {missing} not found in {type(backbone).__name__}; "
            f"its child modules are {list(children)}"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)
    lossy = floor_ranks_outside(backbone, policy) if policy.rank_multiple > 1 else []
    apply_svf(backbone, svf_config(policy, backbone))
    layers = list(svf_layers(backbone))
    if policy.rank_multiple > 1:
        lossy += [f"{name} {full_rank(layer.weight_shape, layer.groups)} -> {layer.rank}" for name, layer in layers
                  if layer.rank < full_rank(layer.weight_shape, layer.groups)]
        logger.warning("svf.rank_multiple=%d floors every backbone rank to a multiple of %d, as the SVF authors' "
                       "svf.py: %s", policy.rank_multiple, policy.rank_multiple,
                       f"{len(lossy)} layer(s) lose rank and change their output, so the network no longer computes "
                       f"its pretrained features ({', '.join(lossy)})" if lossy else "no layer of this backbone "
                       "loses rank (exact)")
    if not layers:
        raise ValueError(
            f"SVFPolicy: no layer of stages {list(policy.stages)} in {type(backbone).__name__} "
            f"was decomposed (skip_1x1={policy.skip_1x1}, skip_3x3={policy.skip_3x3})"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)
    for _, p in trained_factor_parameters(backbone):
        p.requires_grad_(True)
    if policy.train_bias:
        for _, layer in layers:
            if getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad_(True)
    if policy.train_bn:
        for stage in policy.stages:
            for m in children[stage].modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    m.weight.requires_grad_(True)
                    m.bias.requires_grad_(True)
    n_s = sum(p.numel() for _, p in trained_factor_parameters(backbone))
    logger.info("SVF on %d layers of %s: %d values of %s train", len(layers), list(policy.stages), n_s,
                "/".join(policy.train))
    return backbone
