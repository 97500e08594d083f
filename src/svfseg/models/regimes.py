"""What each backbone regime does to a backbone (configure, train/eval mode, merge), registered against ``svfseg.regimes``.

The facts of a regime (what trains, staged, mergeable, its config section, its 0.1 alias) are
declared torch-free in ``svfseg.regimes``; this module holds the one `Regime` per name that
adds the behaviour. Models, export and the engine ask `get_regime`, never compare names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from svfseg.models.backbones import freeze_batchnorm, is_frozen_batchnorm
from svfseg.models.lora import apply_lora, merge_lora, set_lora_dropout_mode
from svfseg.models.peers import train_bitfit, train_bn_affine, train_last_stage
from svfseg.models.policy import apply_policy, folds_bn
from svfseg.policies import LoRAConfig, SVFPolicy
from svfseg.regimes import REGIME_NAMES, RegimeSpec, names_where, regime_spec
from svfseg.svf import merge_svf, svf_layers

_BN = nn.modules.batchnorm._BatchNorm
#: How a backbone's BatchNorm is treated (:meth:`Regime.configure_backbone`).
_BATCHNORM = ("frozen", "fixed", "trains")


@dataclass(frozen=True)
class Settings:
    """The settings a regime applies: the ``svf:`` policy (staged regimes) and the ``lora:`` section."""

    policy: SVFPolicy | None = None
    lora: LoRAConfig | None = None


def _freeze(backbone: nn.Module, settings: Settings) -> None:
    backbone.requires_grad_(False)


def _train_all(backbone: nn.Module, settings: Settings) -> None:
    backbone.requires_grad_(True)


def _svf(backbone: nn.Module, settings: Settings) -> None:
    apply_policy(backbone, settings.policy or SVFPolicy())


def _lora(backbone: nn.Module, settings: Settings) -> None:
    lora = settings.lora or LoRAConfig()
    apply_lora(backbone, (settings.policy or SVFPolicy()).stages, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)


def _on_stages(train: Callable[[nn.Module, tuple[str, ...]], int]) -> Callable[[nn.Module, Settings], None]:
    def configure(backbone: nn.Module, settings: Settings) -> None:
        train(backbone, (settings.policy or SVFPolicy()).stages)

    return configure


def _eval_whole(backbone: nn.Module, training: bool) -> None:
    backbone.eval()  # no dropout / drop-path in a backbone that is not fine-tuned as a whole


def _eval_bn_only(backbone: nn.Module, training: bool) -> None:
    for m in backbone.modules():
        if isinstance(m, _BN):
            m.eval()


def _eval_whole_lora(backbone: nn.Module, training: bool) -> None:
    backbone.eval()
    set_lora_dropout_mode(backbone, training)  # the adapters' own dropout follows the model's mode


def _merge_nothing(backbone: nn.Module, fold_bn: bool) -> int:
    return 0


def _merge_svf(backbone: nn.Module, fold_bn: bool) -> int:
    n = sum(1 for _ in svf_layers(backbone))
    if n:
        merge_svf(backbone, fold_bn=fold_bn)
    return n


def _merge_lora(backbone: nn.Module, fold_bn: bool) -> int:
    return merge_lora(backbone)


def _policy_as_given(policy: SVFPolicy) -> SVFPolicy:
    return policy


def _policy_folded(policy: SVFPolicy) -> SVFPolicy:
    # The policy as applied: BN folding resolved (None means "whenever BN is frozen").
    return dataclasses.replace(policy, fold_bn=folds_bn(policy))


@dataclass(frozen=True)
class Regime:
    """A regime's spec plus its behaviour.

    Attributes:
        spec: the torch-free facts (``svfseg.regimes``).
        configure: sets what of a backbone trains, in place (BN is already frozen structurally).
        set_mode: the backbone's train/eval mode after ``model.train(training)``: BN always in eval mode.
        merge: folds the regime's extra structure into plain layers; the number of merged layers.
        resolve_policy: the ``svf:`` policy as the model records it (SVF resolves ``fold_bn``).
    """

    spec: RegimeSpec
    configure: Callable[[nn.Module, Settings], None]
    set_mode: Callable[[nn.Module, bool], None] = _eval_whole
    merge: Callable[[nn.Module, bool], int] = _merge_nothing
    resolve_policy: Callable[[SVFPolicy], SVFPolicy] = _policy_as_given

    @property
    def name(self) -> str:
        return self.spec.name

    def settings(self, svf_policy: SVFPolicy | None, lora: LoRAConfig | None) -> Settings:
        """The settings a model of this regime records: defaults filled in, the policy resolved.

        Raises:
            ValueError: a policy for a regime that trains no stages, or LoRA settings for another regime.
        """
        if svf_policy is not None and not self.spec.staged:
            raise ValueError(f"svf_policy given but regime={self.name!r}; it applies to {list(names_where(staged=True))}")
        takes_lora = self.spec.model_kwarg == "lora"
        if lora is not None and not takes_lora:
            raise ValueError(f"lora settings given but regime={self.name!r}; use regime='lora'")
        policy = self.resolve_policy(svf_policy or SVFPolicy()) if self.spec.staged else None
        return Settings(policy, (lora or LoRAConfig()) if takes_lora else None)

    def configure_backbone(self, backbone: nn.Module, settings: Settings, *, batchnorm: str = "frozen") -> None:
        """Freeze every BatchNorm structurally, then let the regime decide what trains.

        Args:
            backbone: the backbone, configured in place.
            settings: what the regime applies (:meth:`settings`).
            batchnorm: ``frozen`` (the few-shot models: statistics frozen, the regime decides about
                the affine parameters), ``fixed`` (statistics and affine parameters frozen whatever the
                regime: BAM's base learner with ``train_bn=False``) or ``trains`` (a whole-backbone
                regime's BatchNorm trains, statistics and affine: BAM's stage 1).
        """
        if batchnorm not in _BATCHNORM:
            raise ValueError(f"batchnorm: expected one of {_BATCHNORM}, found {batchnorm!r}")
        if not (batchnorm == "trains" and self.spec.whole_backbone):
            freeze_batchnorm(backbone)
        self.configure(backbone, settings)
        if batchnorm == "fixed":
            for m in backbone.modules():
                if is_frozen_batchnorm(m):
                    m.requires_grad_(False)

    def apply_mode(self, backbone: nn.Module, training: bool, *, batchnorm: str = "frozen") -> None:
        """The backbone's mode after ``model.train(training)`` (``batchnorm`` as in :meth:`configure_backbone`:
        BatchNorm that trains follows the model's mode)."""
        if not (batchnorm == "trains" and self.spec.whole_backbone):
            self.set_mode(backbone, training)


_BEHAVIOUR: dict[str, dict] = {
    "frozen": dict(configure=_freeze),
    "svf": dict(configure=_svf, merge=_merge_svf, resolve_policy=_policy_folded),
    "full": dict(configure=_train_all, set_mode=_eval_bn_only),
    "bitfit": dict(configure=_on_stages(train_bitfit)),
    "bn": dict(configure=_on_stages(train_bn_affine)),
    "last_stage": dict(configure=_on_stages(train_last_stage)),
    "lora": dict(configure=_lora, set_mode=_eval_whole_lora, merge=_merge_lora),
}
_REGIMES: dict[str, Regime] = {name: Regime(regime_spec(name), **_BEHAVIOUR[name]) for name in REGIME_NAMES}


def get_regime(name: str | None, *, where: str = "model") -> Regime:
    """The registered regime ``name`` (None: "frozen").

    Raises:
        ValueError: an unknown name (the message lists the valid ones and says where).
    """
    return _REGIMES[regime_spec("frozen" if name is None else name, where=where).name]


def merge_adapters(backbone: nn.Module, fold_bn: bool = False) -> dict[str, int]:
    """Merge every mergeable regime's structure found in ``backbone``: {regime: merged layers} (non-zero only)."""
    counts = {r.name: r.merge(backbone, fold_bn) for r in _REGIMES.values() if r.spec.mergeable}
    return {k: v for k, v in counts.items() if v}
