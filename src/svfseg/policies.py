"""The settings of the svf and lora regimes (`SVFPolicy`, `LoRAConfig`): torch-free, built by the config, applied by the models."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

SVF_MODES = ("auto", "reparam", "factorized", "tune")
#: The SVD factors ``svf.train`` may name: W = U diag(S) Vh (V for Vh).
SVF_FACTORS = ("U", "S", "V")


@dataclass
class SVFPolicy:
    """Which backbone weights SVF decomposes and what trains: the ``svf:`` section of a config.

    The default is the paper's: every conv (1x1 and 3x3, downsample included) of layer2,
    layer3 and layer4 is decomposed and only its singular values train; layer0, layer1, every
    other backbone weight and every BatchNorm stay frozen. Used when ``model.regime=svf``;
    :func:`svfseg.models.policy.apply_policy` turns it into the per-layer
    :class:`svfseg.svf.SVFConfig` of the model-agnostic library.

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
        decay_to: What weight decay pulls the singular values towards: "pretrained" (their
            initial values) or "zero" (SGD's plain decay, as the authors' code). Read by the
            optimiser; the model ignores it.
        train: Which SVD factors train, any non-empty subset of ``("U", "S", "V")``. ``("S",)``
            is SVF (the default); the SVF paper's ablations also train U and/or V (the factor
            matrices; the layers then run the rebuilt-weight form and still merge exactly).
        rank_multiple: 1 (default) decomposes exactly. 4 rebuilds the SVF authors' network: their
            svf.py floors every rank to a multiple of 4 in every conv of the backbone (the stages
            outside ``stages`` stay frozen, as rank-floored weights), so the 27-column stem conv keeps
            rank 24 and the frozen stem's features change (a warning says which layers lose rank).
    """

    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    skip_1x1: bool = False
    skip_3x3: bool = False
    train_bn: bool = False
    train_bias: bool = False
    mode: str = "auto"
    fold_bn: Optional[bool] = None
    decay_to: str = "pretrained"
    train: tuple[str, ...] = ("S",)
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"SVFPolicy.rank_multiple: expected an int >= 1 (1: exact, 4: the SVF authors' "
                             f"floor), got {self.rank_multiple!r}")
        if isinstance(self.train, str):
            self.train = (self.train,)
        wrong = [f for f in self.train if f not in SVF_FACTORS]
        if wrong or not self.train or len(set(self.train)) != len(tuple(self.train)):
            raise ValueError(f"SVFPolicy.train: expected a non-empty subset of {list(SVF_FACTORS)} "
                             f"(e.g. [S] or [U, S]), got {list(self.train)!r}")
        self.train = tuple(f for f in SVF_FACTORS if f in self.train)
        if isinstance(self.stages, str):
            self.stages = (self.stages,)
        self.stages = tuple(self.stages)
        if not self.stages or not all(isinstance(s, str) and s for s in self.stages):
            raise ValueError(f"SVFPolicy.stages: expected a non-empty list of stage names, got {self.stages!r}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"SVFPolicy.stages: duplicate stage names in {self.stages!r}")
        if self.mode not in SVF_MODES:
            raise ValueError(f"SVFPolicy.mode: expected one of {SVF_MODES}, got {self.mode!r}")
        if self.skip_1x1 and self.skip_3x3:
            logger.warning("SVFPolicy: skip_1x1 and skip_3x3 both set; only other kernel sizes are decomposed")
        if self.fold_bn is not None and not isinstance(self.fold_bn, bool):
            raise TypeError(f"SVFPolicy.fold_bn: expected a bool or None, got {self.fold_bn!r}")
        if self.fold_bn and self.train_bn:
            raise ValueError("SVFPolicy: fold_bn=True folds BatchNorm into the SVD layers, which needs frozen BN, "
                             "but train_bn=True trains it; set fold_bn=False (or svf.train_bn=false)")

    @property
    def target_regex(self) -> str:
        """Full-match regex on qualified module names selecting everything inside ``stages``."""
        names = "|".join(re.escape(s) for s in self.stages)
        return rf"(?:{names})(?:\..+)?"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for configs, checkpoints and ``describe()``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = list(self.stages)
        d["train"] = list(self.train)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SVFPolicy:
        """Build a policy from :meth:`to_dict` output; unknown keys are an error.

        ``lr_mult`` (in policies svfseg 0.1 wrote; the optimiser reads ``optim.lr_mult``) is
        accepted and ignored.
        """
        d = {k: v for k, v in d.items() if k != "lr_mult"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SVFPolicy: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)


@dataclass
class LoRAConfig:
    """The ``lora:`` section (``model.regime=lora``): LoRA adapters (Hugging Face ``peft``) on the convs of ``svf.stages``.

    Attributes:
        r: Rank of each adapter.
        alpha: Scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: Dropout on the adapter input while training.
    """

    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
