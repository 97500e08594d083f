"""LoRA on a backbone's convs through Hugging Face ``peft``: inject, count, merge back to plain convs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

from torch import nn

logger = logging.getLogger(__name__)


def lora_targets(backbone: nn.Module, stages: Sequence[str]) -> list[str]:
    """Qualified names of the convs LoRA adapts: every ungrouped Conv2d inside ``stages``.

    Grouped (depthwise) convs are left out: peft can neither merge them nor give them a rank
    that is not a multiple of the group count, and they hold few weights anyway.
    """
    prefixes = tuple(f"{s}." for s in stages)
    return [n for n, m in backbone.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and n.startswith(prefixes)]


def apply_lora(backbone: nn.Module, stages: Sequence[str], *, r: int, alpha: float, dropout: float) -> int:
    """Wrap the target convs of ``backbone`` in peft LoRA layers (in place); only the adapters train.

    The adapters start at zero (peft initialises B to 0), so the model computes exactly what the
    frozen backbone does until the first step.

    Returns:
        The number of adapter parameters.

    Raises:
        ValueError: ``stages`` has no ungrouped conv.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(backbone, stages)
    if not targets:
        raise ValueError(f"regime 'lora' cannot apply to {type(backbone).__name__}: stages {list(stages)} have no "
                         f"ungrouped Conv2d (check svf.stages)")
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                        bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about non-transformers models
        inject_adapter_in_model(config, backbone)
    backbone.requires_grad_(False)
    params = lora_parameters(backbone)
    for p in params:
        p.requires_grad_(True)
    n = sum(p.numel() for p in params)
    logger.info("LoRA r=%d on %d convs of %s: %d adapter parameters", r, len(targets), list(stages), n)
    return n


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter matrices inside ``module`` (``lora_A`` / ``lora_B`` of every peft layer)."""
    return [p for n, p in module.named_parameters() if ".lora_A." in f".{n}" or ".lora_B." in f".{n}"]


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every peft LoRA layer inside ``module``."""
    # Recognised by their adapter dicts rather than peft's LoraLayer class: importing peft takes
    # seconds (it loads transformers), and every export and mode switch asks this question.
    return [(n, m) for n, m in module.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and hasattr(m, "get_base_layer")]


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its conv and put the plain conv back in its place.

    Afterwards ``module`` has the state-dict keys of the original architecture.

    Returns:
        The number of merged layers.
    """
    layers = lora_layers(module)
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(layers)


def set_lora_dropout_mode(module: nn.Module, training: bool) -> None:
    """Put the adapters' dropout in ``training`` mode (the backbone around it stays in eval mode)."""
    for _, layer in lora_layers(module):
        layer.lora_dropout.train(training)
