"""What each ``adapt.params`` choice does to a model: the working copy it adapts and the parameters that train.

The choices are declared torch-free in ``svfseg.regimes`` (``ADAPT_REGISTRY``); this module registers one
collector per name. The user's model is never modified: adaptation works on a deep copy, prepared once
(SVD of the stages, LoRA adapters, or merging what a choice cannot train through), whose trained
parameters are reset to their starting values before every episode.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from svfseg.models.fewshot import FewShotModel
from svfseg.models.lora import apply_lora, lora_layers, lora_parameters, merge_lora
from svfseg.models.peers import bitfit_parameters, bn_affine_parameters, stage_modules
from svfseg.models.policy import svf_config
from svfseg.policies import LoRAConfig, SVFPolicy
from svfseg.regimes import ADAPT_NAMES, AdaptSpec
from svfseg.svf import apply_svf, forms_plan, merge_svf, svf_layers, trained_factor_parameters

Named = list[tuple[str, nn.Parameter]]


def _named(model: nn.Module, params: Sequence[nn.Parameter]) -> Named:
    ids = {id(p) for p in params}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _svf(work: FewShotModel, head_names: set[str], policy: SVFPolicy) -> Named:
    return [(f"backbone.{n}", p) for n, p in trained_factor_parameters(work.backbone)]


def _bn(work: FewShotModel, head_names: set[str], policy: SVFPolicy) -> Named:
    return _named(work, bn_affine_parameters(stage_modules(work.backbone, policy.stages, "adapt bn")))


def _bitfit(work: FewShotModel, head_names: set[str], policy: SVFPolicy) -> Named:
    return _named(work, bitfit_parameters(stage_modules(work.backbone, policy.stages, "adapt bitfit")))


def _lora(work: FewShotModel, head_names: set[str], policy: SVFPolicy) -> Named:
    return _named(work, lora_parameters(work.backbone))


def _head(work: FewShotModel, head_names: set[str], policy: SVFPolicy) -> Named:
    return [(n, p) for n, p in work.named_parameters() if n in head_names]


def _full(work: FewShotModel, head_names: set[str], policy: SVFPolicy) -> Named:
    return [(f"backbone.{n}", p) for n, p in work.backbone.named_parameters()]


_COLLECT: dict[str, Callable[[FewShotModel, set[str], SVFPolicy], Named]] = {
    "none": lambda work, head_names, policy: [], "svf": _svf, "bn": _bn, "bitfit": _bitfit, "lora": _lora,
    "head": _head, "full": _full,
}
assert tuple(_COLLECT) == ADAPT_NAMES, "every declared adapt.params choice needs its collector"


def head_parameter_names(model: FewShotModel) -> set[str]:
    """The parameters that trained as the few-shot head: trainable and outside the backbone (BAM's frozen base
    learner is not among them)."""
    return {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")}


def prepare_model(model: FewShotModel, parts: Sequence[AdaptSpec], *, policy: SVFPolicy,
                  lora: LoRAConfig) -> tuple[FewShotModel, Named]:
    """A working copy of ``model`` ready to adapt ``parts``, and the parameters that train there (by name).

    Structure is changed once, on the copy: ``svf`` decomposes the policy's stages when the model has
    no SVD layers (a model trained with SVF keeps its own, trained singular values); ``lora`` adds
    adapters (starting at zero) when it has none; what a choice cannot train through is merged back
    into plain layers first (SVD layers with folded BatchNorm for ``bn``/``bitfit``, every SVD/LoRA
    layer for ``full``). Everything else is frozen; the copy is in eval mode (BN statistics frozen,
    no dropout), so adapting it is deterministic.

    Args:
        model: The loaded few-shot model (unchanged).
        parts: ``adapt_parts(settings.params)``.
        policy: The ``svf:`` policy whose stages the staged choices train (a model trained with SVF: its own).
        lora: The ``lora:`` section (rank etc. of adapters added here; dropout is not applied).
    """
    names = {p.name for p in parts}
    head_names = head_parameter_names(model)
    work = copy.deepcopy(model)
    backbone = work.backbone
    plain_bn = bool(names & {"bn", "bitfit"})  # BN affine trains: no BN may stay folded into an SVD layer
    whole = any(p.whole_backbone for p in parts)
    if any(True for _ in svf_layers(backbone)) and ("svf" not in names or plain_bn or whole or "lora" in names):
        merge_svf(backbone)  # restores the plain convs and their BatchNorms (same keys, weights as trained)
    if lora_layers(backbone) and (whole or "svf" in names):
        merge_lora(backbone)
    if "svf" in names and not any(True for _ in svf_layers(backbone)):
        folded = dataclasses.replace(policy, fold_bn=False if plain_bn else policy.fold_bn, train_bn=False)
        apply_svf(backbone, svf_config(folded, backbone))
    if "lora" in names and not lora_layers(backbone):
        apply_lora(backbone, policy.stages, r=lora.r, alpha=lora.alpha, dropout=0.0)
    work.requires_grad_(False)
    named: Named = []
    for spec in parts:
        found = _COLLECT[spec.name](work, head_names, policy)
        if (spec.backbone or spec.head) and not found:
            raise ValueError(f"adapt.params={spec.name}: nothing to train in this {type(model).__name__} "
                             f"({spec.trains}; svf.stages={list(policy.stages)})")
        named += found
    for _, p in named:
        p.requires_grad_(True)
    # The forms of the SVD layers "auto" would choose: the plan the model holds, frozen (a loaded checkpoint's
    # is empty, so the cost model decides every adaptation shape). Timing here would let two adaptations of
    # one episode, in two processes, take other forms and round differently; adaptation scores must repeat.
    plan = forms_plan(work)  # the copy's own (deepcopy): the user's model keeps its plan as it was
    if plan is not None:
        plan.freeze()
    work.eval()
    return work, named
