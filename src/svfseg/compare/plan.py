"""What one `svfseg compare` runs (`ComparePlan`) and the config of each of its cells."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from svfseg.compare.variants import Arm, folder_name
from svfseg.engine.runfolder import RunFolder
from svfseg.regimes import NO_ADAPTATION, regime_spec


@dataclass
class ComparePlan:
    """What one compare runs.

    Attributes:
        config: Recipe file.
        regimes: Regimes to train (``model.regime`` values).
        seeds: Training seeds (the pairs of the intervals).
        folds: Folds.
        shots: Shots.
        overrides: ``key=value`` overrides applied to every cell.
        out: Output folder.
        reference: Regime every other is compared with.
        backbone_lr: Grid of lr multipliers for the backbone-side groups (one value: no sweep).
        test_episodes: Size of the test episode file per (fold, shot) (None: the protocol's first run).
        val_episodes: Size of the base-class validation episode file.
        arms: Row label -> :class:`~svfseg.compare.variants.Arm` for the rows of ``regimes`` that are
            variants (a regime plus overrides, from ``--vary``); a label not in it is a plain regime.
        warm_start: Steps of a shared head warm start per (fold, shot) (0: none): the head is
            trained once with the frozen backbone, then every cell starts from it (``model.init_head``).
        threads: torch CPU threads of every cell (None: torch's default).
        force: Retrain (rescore) the cells an earlier compare into ``out`` made with other settings
            (otherwise refused, naming the differing keys).
        adapt: ``adapt.params`` choices every finished cell is also scored with on its test episodes
            (``none`` = the plain score, always there); each choice's steps and lr are chosen on the
            first seed's base-class validation episodes and reused for the other seeds.
    """

    config: str
    regimes: list[str]
    seeds: list[int]
    folds: list[int] = field(default_factory=lambda: [0])
    shots: list[int] = field(default_factory=lambda: [1])
    overrides: list[str] = field(default_factory=list)
    out: Path = Path("runs/compare")
    reference: str = "frozen"
    backbone_lr: list[float] = field(default_factory=lambda: [1.0])
    test_episodes: Optional[int] = None
    val_episodes: int = 200
    arms: dict = field(default_factory=dict)
    warm_start: int = 0
    threads: Optional[int] = None
    force: bool = False
    adapt: list[str] = field(default_factory=lambda: [NO_ADAPTATION])


def lr_overrides(mult: Optional[float]) -> list[str]:
    """The backbone-side lr multiplier as overrides (None: the recipe's)."""
    return [] if mult is None else [f"optim.lr_mult.{group}={mult}" for group in _SWEPT_GROUPS]


#: The parameter groups ``--backbone-lr`` sets (whatever a regime trains in the backbone).
_SWEPT_GROUPS = ("svf", "backbone")


def _cell_name(regime: str, mult: Optional[float], seed: int) -> str:
    return f"{folder_name(regime)}" + (f"_lrx{mult:g}" if mult is not None else "") + f"_seed{seed}"


#: Training seed of the shared warm start: outside the cells' seeds, so no cell replays its episodes.
WARM_START_SEED = 10_000


def trains_backbone(regime: str) -> bool:
    """Whether ``regime`` trains part of the backbone (only those sweep ``--backbone-lr`` and are ``--vary``'d)."""
    return regime_spec(regime).backbone_grad


def sweep_grid(plan: ComparePlan, label: str) -> list[Optional[float]]:
    """The ``--backbone-lr`` values row ``label`` tries ([None]: no sweep, the recipe's multipliers)."""
    trains = trains_backbone(plan.arms.get(label, Arm(label, label)).regime)  # a --vary row: its regime
    return list(plan.backbone_lr) if trains and len(plan.backbone_lr) > 1 else [None]


def _cell_dir(plan: ComparePlan, fold: int, shot: int) -> Path:
    return plan.out / "runs" / f"fold{fold}_{shot}shot"


def warm_start_checkpoint(plan: ComparePlan, fold: int, shot: int) -> Optional[Path]:
    """The shared head every cell of (fold, shot) starts from, or None without a warm start."""
    return RunFolder(_cell_dir(plan, fold, shot) / "warm_start").best if plan.warm_start else None


@dataclass(frozen=True)
class Owned:
    """A config key compare sets in a cell: its value there, and what a user does instead of overriding it.

    Attributes:
        value: the key's value in the cell.
        option: the compare option that sets it (``--folds``), or, where none does, what to do instead.
        sep: how the option lists several values (``--folds 1 2``, ``--seeds 1,2``).
    """

    value: Any
    option: str
    sep: str = ","

    def instead(self, values: list[str]) -> str:
        return f"use {self.option} {self.sep.join(values)}" if self.option.startswith("--") else self.option


def _common_keys(plan: ComparePlan, fold: int, shot: int) -> dict[str, Owned]:
    """The keys compare sets in every run of (fold, shot), the warm start included."""
    keys = {"fold": Owned(fold, "--folds", " "), "shot": Owned(shot, "--shots", " "),
            "output_dir": Owned(_cell_dir(plan, fold, shot), "--out")}
    if plan.threads:
        keys["threads"] = Owned(plan.threads, "--threads")
    return keys


def cell_keys(plan: ComparePlan, fold: int, shot: int, regime: str, seed: int,
              mult: Optional[float]) -> dict[str, Owned]:
    """Every config key compare sets in one cell, by dotted key: the one declaration of what compare owns.

    :func:`cell_config` applies them after the recipe and the user's overrides; :func:`check_owned_keys`
    refuses an override or a ``--vary`` key among them (it would be replaced without a word).
    """
    arm = plan.arms.get(regime, Arm(regime, regime))  # a --vary row: its regime and overrides
    keys = {**_common_keys(plan, fold, shot), "seed": Owned(seed, "--seeds"),
            "model.regime": Owned(arm.regime, "--regimes"),
            "name": Owned(_cell_name(regime, mult, seed), "remove it: compare names each cell's folder (row, "
                                                          "lr, seed) under --out"),
            "train.select_on": Owned("base_heldout", "remove it: compare selects every cell's checkpoint on "
                                                     "base-class validation episodes (base_heldout)"),
            "train.val_every": Owned(1, "remove it: compare validates every cell once per epoch"),
            "train.val_episodes": Owned(plan.val_episodes, "--val-episodes"),
            # a cell's own score is the plain test; its adaptation rows are scored apart (cell_config's extra)
            "adapt.params": Owned(NO_ADAPTATION, "--adapt", ","),
            "train.val_episodes_file": Owned(plan.out / "episodes" / f"val_base_fold{fold}_{shot}shot.json",
                                             "remove it: compare makes one base-class validation file per (fold, "
                                             "shot) in --out/episodes; set its size with --val-episodes N")}
    if mult is not None:  # a --backbone-lr sweep
        swept = ",".join(f"{m:g}" for m in plan.backbone_lr)
        keys.update({f"optim.lr_mult.{group}": Owned(mult, f"remove it: --backbone-lr {swept} sets "
                                                           f"it per cell; list the values to try there, or give "
                                                           f"--backbone-lr one value to keep the recipe's")
                     for group in _SWEPT_GROUPS})
    warm = warm_start_checkpoint(plan, fold, shot)
    if warm:
        keys["model.init_head"] = Owned(warm, "remove it or --warm-start: --warm-start starts every cell from "
                                              "the head it trains")
    return keys


def _as_overrides(keys: dict[str, Owned]) -> list[str]:
    return [f"{k}={o.value}" for k, o in keys.items()]


def cell_config(plan: ComparePlan, fold: int, shot: int, regime: str, seed: int, mult: Optional[float],
                extra: Sequence[str] = ()):
    """The config of one cell: recipe, the plan's overrides, the row's ``--vary`` overrides, then compare's keys
    (and ``extra``, e.g. the ``adapt.*`` keys its adaptation rows are scored with)."""
    from svfseg.config import load_config

    arm = plan.arms.get(regime, Arm(regime, regime))
    return load_config(plan.config, [*plan.overrides, *arm.overrides,
                                     *_as_overrides(cell_keys(plan, fold, shot, regime, seed, mult)), *extra])


def check_owned_keys(plan: ComparePlan) -> None:
    """Refuse an override or a ``--vary`` key that sets a key compare sets in the cells (:func:`cell_keys`).

    Such a value would be replaced in every cell without a word: rows labelled different would be
    one experiment, ``fold=2`` would run fold 0. The message names the option to use instead.

    Raises:
        ValueError: naming the override, the key and the compare option.
    """
    from svfseg.config import keys_set_by

    rows = {label: cell_keys(plan, plan.folds[0], plan.shots[0], label, plan.seeds[0], sweep_grid(plan, label)[0])
            for label in plan.regimes}
    every = {k: o for keys in rows.values() for k, o in keys.items()}
    for item in plan.overrides:
        for key, value in keys_set_by([item]).items():
            if key in every:
                raise ValueError(f"compare: the override {item!r} sets {key}, which compare sets in every cell "
                                 f"(it would be replaced): {every[key].instead([_shown(value)])}")
    for label, arm in plan.arms.items():
        for key, value in keys_set_by(list(arm.overrides)).items():
            if key in rows[label]:
                values = [_shown(v) for v in _values_of(plan, key)]
                raise ValueError(f"compare: --vary {key}={'|'.join(values)} varies {key}, which compare sets in "
                                 f"every cell of {arm.regime!r} (the rows would not differ as labelled): "
                                 f"{rows[label][key].instead(values)}")


def _values_of(plan: ComparePlan, key: str) -> list[Any]:
    """The values ``key`` takes over the ``--vary`` rows, in order (those of its ``--vary`` option)."""
    from svfseg.config import keys_set_by

    seen: list[Any] = []
    for arm in plan.arms.values():
        value = keys_set_by(list(arm.overrides)).get(key)
        if value is not None and value not in seen:
            seen.append(value)
    return seen


def _shown(value: Any) -> str:
    return str(value).replace(" ", "") if isinstance(value, (list, dict)) else str(value)


def warm_start_config(plan: ComparePlan, fold: int, shot: int):
    """The shared warm start: the head trained ``plan.warm_start`` steps with the frozen backbone, last weights kept."""
    from svfseg.config import load_config

    return load_config(plan.config, [
        *plan.overrides, *_as_overrides(_common_keys(plan, fold, shot)), f"seed={WARM_START_SEED}",
        "model.regime=frozen", "name=warm_start", "train.epochs=1", f"train.steps_per_epoch={plan.warm_start}",
        "train.val_every=0", "train.select_on=last"])


def check_plan_lists(plan: ComparePlan) -> None:
    """Refuse empty or repeated seeds, regimes, folds, shots and adaptations (a repeated seed is no second pair),
    and episode counts beyond what an episode list holds."""
    from svfseg.regimes import adapt_name, adapt_trains

    try:  # canonical names (head+svf -> svf+head), so a repeat is seen and folders are named one way; the plain
        # score (no adaptation) is always there, once
        plan.adapt = [NO_ADAPTATION, *[adapt_name(p) for p in plan.adapt if adapt_trains(p)]]
    except ValueError as e:
        raise ValueError(f"compare: --adapt: {e}") from None
    for option, values in (("--seeds", plan.seeds), ("--regimes", plan.regimes), ("--folds", plan.folds),
                           ("--shots", plan.shots), ("--adapt", plan.adapt)):
        if not values:
            raise ValueError(f"compare: {option}: expected at least one value, found none")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"compare: {option}: expected distinct values, found {values} (repeats {repeated})")
    from svfseg.data.episodes import MAX_EPISODES

    for option, count in (("--test-episodes", plan.test_episodes), ("--val-episodes", plan.val_episodes)):
        if count is not None and not 1 <= count <= MAX_EPISODES:
            raise ValueError(f"compare: {option}: expected 1 .. {MAX_EPISODES:,} episodes, found {count:,}")


