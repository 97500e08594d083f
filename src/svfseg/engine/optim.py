"""Optimiser construction: parameter groups with lr multipliers, the poly schedule, decay towards pretrained values."""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9, warmup_steps: int = 0) -> float:
    """Learning rate of optimiser step ``step`` (0-based) under the poly schedule.

    ``lr = base_lr * (1 - step / total_steps) ** power``; a pure function of the step, so it is
    right at every step and after a resume. The optional linear warm-up ramps from
    ``base_lr / warmup_steps`` to the poly value over the first ``warmup_steps`` steps.
    (The reference implementations count from 1, so their very last step has lr 0; here the first step has
    the full lr and the last one a small positive lr.)

    Args:
        step: index of the step about to be taken, 0 <= step < total_steps.
        total_steps: number of optimiser steps in the whole run.
        base_lr: peak learning rate.
        power: poly exponent (0.9 in the references; 0 = constant).
        warmup_steps: linear warm-up length in steps (0 = none).

    Returns:
        The learning rate for that step.
    """
    if total_steps <= 0:
        raise ValueError(f"poly_lr: total_steps must be > 0, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"poly_lr: step {step} outside [0, {total_steps})")
    lr = base_lr * (1.0 - step / total_steps) ** power
    if warmup_steps > 0 and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_mult']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def build_param_groups(
    model: nn.Module,
    lr_mult: Mapping[str, float],
    weight_decay: float,
    no_decay_groups: Iterable[str] = (),
) -> list[dict]:
    """Optimiser groups from ``model.parameter_groups()``, each with its lr multiplier.

    Args:
        model: a few-shot model exposing ``parameter_groups() -> [{"name", "params"}]``.
        lr_mult: multiplier per group name (e.g. ``{"head": 10, "svf": 1, "backbone": 1}``).
        weight_decay: SGD weight decay (towards 0) for the groups.
        no_decay_groups: group names whose SGD weight decay is 0 (their decay is handled
            elsewhere, e.g. by :class:`ReferenceDecay`).

    Returns:
        A list of torch optimiser group dicts with extra keys ``name`` and ``lr_mult``.
    """
    raw = model.parameter_groups() if hasattr(model, "parameter_groups") else [
        {"name": "head", "params": [p for p in model.parameters() if p.requires_grad]}]
    groups, seen = [], set()
    no_decay = set(no_decay_groups)
    for g in raw:
        name = g["name"]
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        if name not in lr_mult:
            raise KeyError(f"optim.lr_mult has no entry for parameter group '{name}' "
                           f"(model groups: {[x['name'] for x in raw]}; lr_mult keys: {sorted(lr_mult)})")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"parameter group '{name}' repeats a parameter of another group")
            seen.add(id(p))
        groups.append({"params": params, "name": name, "lr_mult": float(lr_mult[name]),
                       "weight_decay": 0.0 if name in no_decay else weight_decay})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters outside model.parameter_groups() would never be updated: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


class ReferenceDecay:
    """Weight decay towards a snapshot of the parameters (e.g. the pretrained singular values).

    SGD's own weight decay adds ``wd * p`` to the gradient and so pulls parameters towards 0;
    for singular values that means shrinking the pretrained spectrum. This adds
    ``wd * (p - p0)`` instead, before the optimiser step, with ``p0`` taken at the start.

    Args:
        named_params: (name, parameter) pairs to regularise.
        weight_decay: the decay coefficient.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float):
        self.weight_decay = float(weight_decay)
        self.params = dict(named_params)
        self.reference = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def apply(self) -> None:
        """Add ``wd * (p - p0)`` to each gradient (call after unscaling, before ``step``)."""
        if self.weight_decay == 0:
            return
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - self.reference[name].to(p.device), alpha=self.weight_decay)

    def state_dict(self) -> dict:
        return {"weight_decay": self.weight_decay, "reference": {n: t.cpu() for n, t in self.reference.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        ref = state["reference"]
        if set(ref) != set(self.params):
            raise KeyError(f"ReferenceDecay: checkpoint holds references for {len(ref)} parameters, "
                           f"the model has {len(self.params)}; e.g. missing {sorted(set(self.params) - set(ref))[:3]}")
        self.reference = {n: ref[n].to(self.params[n].device).clone() for n in self.params}
        self.weight_decay = float(state["weight_decay"])


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    lr_mult: Mapping[str, float],
    decay_to_pretrained: Iterable[str] = ("svf",),
) -> tuple[torch.optim.SGD, Optional[ReferenceDecay]]:
    """SGD over the model's parameter groups, plus the decay towards pretrained values.

    Args:
        model: the few-shot model.
        lr: base learning rate (each group runs at ``lr * lr_mult[name]``).
        momentum: SGD momentum.
        weight_decay: decay coefficient.
        lr_mult: lr multiplier per group name.
        decay_to_pretrained: group names decayed towards their initial values instead of 0.

    Returns:
        (optimizer, reference_decay or None).
    """
    targets = set(decay_to_pretrained)
    groups = build_param_groups(model, lr_mult, weight_decay, no_decay_groups=targets)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    ids = {id(p) for g in groups if g["name"] in targets for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    ref = ReferenceDecay(named, weight_decay) if named else None
    for g in groups:
        logger.info("param group %-8s %9d params  lr x%g  wd %s", g["name"], sum(p.numel() for p in g["params"]),
                    g["lr_mult"], "towards pretrained" if g["name"] in targets else g["weight_decay"])
    return optimizer, ref
