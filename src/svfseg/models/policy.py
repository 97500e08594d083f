"""Which backbone weights SVF decomposes and trains in a few-shot model (the paper's policy)."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from svfseg.svf import SVFConfig, apply_svf, singular_value_parameters, svf_layers

logger = logging.getLogger(__name__)

_MODES = ("auto", "reparam", "factorized", "tune")


@dataclass
class SVFPolicy:
    """SVF policy for a backbone with named stages.

    The default is the paper's: every conv (1x1 and 3x3, downsample included) of layer2,
    layer3 and layer4 is decomposed and only its singular values train; layer0, layer1, every
    other backbone weight and every BatchNorm stay frozen.

    Attributes:
        stages: Backbone stages whose convs are decomposed and whose singular values train.
        skip_1x1: Leave 1x1 convs undecomposed (frozen).
        skip_3x3: Leave 3x3 convs undecomposed (frozen).
        train_bn: Also train the BatchNorm affine parameters inside ``stages`` (running
            statistics stay frozen: BN is always in eval mode).
        train_bias: Also train the conv biases of the decomposed layers.
        mode: SVD layer forward, "auto" | "reparam" | "factorized" | "tune" (see ``svfseg.svf``).
        fold_bn: Fold each frozen BatchNorm after a decomposed conv into its SVD layer (exact:
            same outputs and S gradients, less time and memory; state-dict keys unchanged).
            None (default) means "whenever BN is frozen", i.e. ``not train_bn``; True with
            ``train_bn`` is refused. Needs a backbone with ``conv_bn_pairs()``.
        lr_mult: Learning-rate multiplier for the singular values relative to the head (the
            authors train them at lr / 10). Reported by ``parameter_groups()``.
    """

    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    skip_1x1: bool = False
    skip_3x3: bool = False
    train_bn: bool = False
    train_bias: bool = False
    mode: str = "auto"
    lr_mult: float = 0.1
    fold_bn: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            self.stages = (self.stages,)
        self.stages = tuple(self.stages)
        if not self.stages or not all(isinstance(s, str) and s for s in self.stages):
            raise ValueError(f"SVFPolicy.stages: expected a non-empty list of stage names, got {self.stages!r}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"SVFPolicy.stages: duplicate stage names in {self.stages!r}")
        if self.mode not in _MODES:
            raise ValueError(f"SVFPolicy.mode: expected one of {_MODES}, got {self.mode!r}")
        if self.skip_1x1 and self.skip_3x3:
            logger.warning("SVFPolicy: skip_1x1 and skip_3x3 both set; only other kernel sizes are decomposed")
        if self.fold_bn is None:
            self.fold_bn = not self.train_bn
        if not isinstance(self.fold_bn, bool):
            raise TypeError(f"SVFPolicy.fold_bn: expected a bool or None, got {self.fold_bn!r}")
        if self.fold_bn and self.train_bn:
            raise ValueError(
                "SVFPolicy: fold_bn=True folds BatchNorm into the SVD layers, which needs frozen BN, "
                "but train_bn=True trains it; set fold_bn=False (or svf.train_bn=false)"
            )
        if not self.lr_mult > 0:
            raise ValueError(f"SVFPolicy.lr_mult: expected a positive number, got {self.lr_mult!r}")

    @property
    def target_regex(self) -> str:
        """Full-match regex on qualified module names selecting everything inside ``stages``."""
        names = "|".join(re.escape(s) for s in self.stages)
        return rf"(?:{names})(?:\..+)?"

    def svf_config(self, backbone: nn.Module | None = None) -> SVFConfig:
        """Return the :class:`svfseg.svf.SVFConfig` this policy stands for.

        Args:
            backbone: With ``fold_bn``, the backbone whose ``conv_bn_pairs()`` are folded.
        """
        pairs = None
        if self.fold_bn and backbone is not None:
            if hasattr(backbone, "conv_bn_pairs"):
                pairs = backbone.conv_bn_pairs()
            else:  # not an svfseg Backbone: nothing is declared, so nothing is folded
                logger.info("SVFPolicy.fold_bn: %s declares no conv_bn_pairs(); no BN folded", type(backbone).__name__)
        return SVFConfig(
            target_modules=self.target_regex,
            skip_1x1=self.skip_1x1,
            skip_3x3=self.skip_3x3,
            mode=self.mode,
            train_bias=self.train_bias,
            fold_bn=pairs,
        )

    def apply_policy(self, backbone: nn.Module) -> nn.Module:
        """Decompose the policy's stages of ``backbone`` in place and set what trains.

        Afterwards exactly these backbone parameters require grad: the singular values of the
        decomposed layers, plus BN affine parameters inside ``stages`` when ``train_bn`` and
        conv biases when ``train_bias``. Keeping BN in eval mode is the caller's job (the
        few-shot models do it in ``train()``).

        Args:
            backbone: A module whose stages are child modules named as in ``stages``.

        Returns:
            ``backbone`` (modified in place).
        """
        children = dict(backbone.named_children())
        missing = [s for s in self.stages if s not in children]
        if missing:
            raise ValueError(
                f"SVFPolicy.stages {missing} not found in {type(backbone).__name__}; "
                f"its child modules are {list(children)}"
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        apply_svf(backbone, self.svf_config(backbone))
        layers = list(svf_layers(backbone))
        if not layers:
            raise ValueError(
                f"SVFPolicy: no layer of stages {list(self.stages)} in {type(backbone).__name__} "
                f"was decomposed (skip_1x1={self.skip_1x1}, skip_3x3={self.skip_3x3})"
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        for _, p in singular_value_parameters(backbone):
            p.requires_grad_(True)
        if self.train_bias:
            for _, layer in layers:
                if getattr(layer, "bias", None) is not None:
                    layer.bias.requires_grad_(True)
        if self.train_bn:
            for stage in self.stages:
                for m in children[stage].modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                        m.weight.requires_grad_(True)
                        m.bias.requires_grad_(True)
        n_s = sum(p.numel() for _, p in singular_value_parameters(backbone))
        logger.info("SVF on %d layers of %s: %d singular values train", len(layers), list(self.stages), n_s)
        return backbone

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for configs, checkpoints and ``describe()``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SVFPolicy:
        """Build a policy from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SVFPolicy: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)
