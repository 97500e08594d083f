"""The settings of the svf and lora regimes (`SVFPolicy`, `LoRAConfig`) and of test-time adaptation (`AdaptSettings`): torch-free."""

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
        mode: SVD layer forward, "auto" | "reparam" | "factorized" (see ``svfseg.svf``; "tune" is auto's
            older name). "auto": per layer geometry, the form measured fastest on the run's first step,
            recorded in the run folder and its checkpoints and followed by its resume and every rank.
        plan: A forms plan file (``svf_forms.json`` of an earlier run, or ``svfseg.svf.FormsPlan.save``)
            that mode "auto" follows instead of measuring (None: measure).
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
    plan: Optional[str] = None
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
        if self.plan is not None and (not isinstance(self.plan, str) or not self.plan.strip()):
            raise ValueError(f"SVFPolicy.plan: expected the path of a forms plan file or null, got {self.plan!r}")
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


#: Optimisers of test-time adaptation (``adapt.optimizer``).
ADAPT_OPTIMIZERS = ("adam", "sgd")


@dataclass
class AdaptSettings:
    """The ``adapt:`` section: fine-tune part of the model on each test episode's own supports, then predict its query.

    From the K supports alone, pseudo-episodes are made: each support in turn is the query and the
    others its supports (K >= 2), or a support is the query of an augmented copy of itself (K = 1,
    and for K >= 2 too with ``augment``). What ``params`` names trains for ``steps`` steps on the
    cross-entropy of the model's prediction, the episode's query is predicted, and the model is
    restored exactly before the next episode. The query's image and label play no part before the
    prediction. What each ``params`` choice trains is declared in ``svfseg.regimes`` (``ADAPT_REGISTRY``).

    Attributes:
        params: ``none`` (the plain test), ``svf``, ``bn``, ``bitfit``, ``lora``, ``head``, ``full``, or a
            ``+`` combination (``svf+head``).
        steps: Optimiser steps per episode; None: chosen from ``grid_steps`` on base-class validation episodes.
        lr: Learning rate; None: chosen from ``grid_lr`` on base-class validation episodes. The choice always
            includes not adapting at all (0 steps), so a harmful adaptation is not chosen.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        augment: For K >= 2, also pair each support with an augmented copy of itself (K = 1 always does).
        batch: Pseudo-episodes per step (0: all of them, one step = one pass over the supports).
        grid_lr: The learning rates tried on validation when ``lr`` is None.
        grid_steps: The step counts tried on validation when ``steps`` is None (one adaptation of the largest
            count is scored after each of them).
        val_episodes: Base-class validation episodes the choice is made on.
        seed: Seed of the augmentations (each episode's generator is seeded by this and its index).
        parallel: Episodes adapted in one batched pass, each with its own singular values (``params=svf``
            only; the others adapt one episode at a time). Faster on a CPU; memory grows with it; 1: one at a time.
    """

    params: str = "none"
    steps: Optional[int] = None
    lr: Optional[float] = None
    optimizer: str = "adam"
    augment: bool = False
    batch: int = 0
    grid_lr: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    grid_steps: tuple[int, ...] = (5, 10)
    val_episodes: int = 100
    seed: int = 0
    parallel: int = 4

    def __post_init__(self) -> None:
        self.grid_lr = tuple(float(v) for v in self.grid_lr)
        self.grid_steps = tuple(int(v) for v in self.grid_steps)
        if self.optimizer not in ADAPT_OPTIMIZERS:
            raise ValueError(f"adapt.optimizer: expected one of {list(ADAPT_OPTIMIZERS)}, found {self.optimizer!r}")
        if self.steps is not None and int(self.steps) < 0:
            raise ValueError(f"adapt.steps: expected >= 0 or null (chosen on validation), found {self.steps}")
        if self.lr is not None and not float(self.lr) > 0:
            raise ValueError(f"adapt.lr: expected > 0 or null (chosen on validation), found {self.lr}")
        if not self.grid_lr or any(not v > 0 for v in self.grid_lr):
            raise ValueError(f"adapt.grid_lr: expected learning rates > 0, found {list(self.grid_lr)}")
        if not self.grid_steps or any(v < 1 for v in self.grid_steps):
            raise ValueError(f"adapt.grid_steps: expected step counts >= 1, found {list(self.grid_steps)}")
        for key in ("batch", "val_episodes", "seed"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"adapt.{key}: expected >= 0, found {getattr(self, key)}")
        if int(self.parallel) < 1:
            raise ValueError(f"adapt.parallel: expected >= 1 episodes per pass, found {self.parallel}")

    @property
    def chosen_on_validation(self) -> bool:
        """Whether ``steps`` or ``lr`` is left to the choice on base-class validation episodes."""
        return self.steps is None or (self.lr is None and self.steps != 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (configs, results)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["grid_lr"], d["grid_steps"] = list(self.grid_lr), list(self.grid_steps)
        return d
