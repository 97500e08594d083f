"""What one `svfseg compare` runs (`ComparePlan`) and the config of each of its cells."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from svfseg.compare.variants import Arm, folder_name
from svfseg.engine.runfolder import RunFolder
from svfseg.regimes import NO_ADAPTATION


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
    return [] if mult is None else [f"optim.lr_mult.svf={mult}", f"optim.lr_mult.backbone={mult}"]


def _cell_name(regime: str, mult: Optional[float], seed: int) -> str:
    return f"{folder_name(regime)}" + (f"_lrx{mult:g}" if mult is not None else "") + f"_seed{seed}"


#: Training seed of the shared warm start: outside the cells' seeds, so no cell replays its episodes.
WARM_START_SEED = 10_000


def _cell_dir(plan: ComparePlan, fold: int, shot: int) -> Path:
    return plan.out / "runs" / f"fold{fold}_{shot}shot"


def warm_start_checkpoint(plan: ComparePlan, fold: int, shot: int) -> Optional[Path]:
    """The shared head every cell of (fold, shot) starts from, or None without a warm start."""
    return RunFolder(_cell_dir(plan, fold, shot) / "warm_start").best if plan.warm_start else None


def _common_overrides(plan: ComparePlan, fold: int, shot: int) -> list[str]:
    return [*plan.overrides, f"fold={fold}", f"shot={shot}", f"output_dir={_cell_dir(plan, fold, shot)}",
            *([f"threads={plan.threads}"] if plan.threads else [])]


def cell_config(plan: ComparePlan, fold: int, shot: int, regime: str, seed: int, mult: Optional[float],
                extra: Sequence[str] = ()):
    """The config of one cell: recipe, the plan's overrides, then the cell's own keys (and ``extra``, e.g. the
    ``adapt.*`` keys its adaptation rows are scored with)."""
    from svfseg.config import load_config

    eps = plan.out / "episodes"
    arm = plan.arms.get(regime, Arm(regime, regime))  # a --vary row: its regime and overrides
    warm = warm_start_checkpoint(plan, fold, shot)
    return load_config(plan.config, [
        *_common_overrides(plan, fold, shot), *arm.overrides, f"seed={seed}", f"model.regime={arm.regime}",
        f"name={_cell_name(regime, mult, seed)}",
        "train.select_on=base_heldout", "train.val_every=1", f"train.val_episodes={plan.val_episodes}",
        f"train.val_episodes_file={eps / f'val_base_fold{fold}_{shot}shot.json'}", *lr_overrides(mult),
        *([f"model.init_head={warm}"] if warm else []), *extra])


def warm_start_config(plan: ComparePlan, fold: int, shot: int):
    """The shared warm start: the head trained ``plan.warm_start`` steps with the frozen backbone, last weights kept."""
    from svfseg.config import load_config

    return load_config(plan.config, [
        *_common_overrides(plan, fold, shot), f"seed={WARM_START_SEED}", "model.regime=frozen", "name=warm_start",
        "train.epochs=1", f"train.steps_per_epoch={plan.warm_start}", "train.val_every=0", "train.select_on=last"])


def check_plan_lists(plan: ComparePlan) -> None:
    """Refuse empty or repeated seeds, regimes, folds, shots and adaptations (a repeated seed is no second pair)."""
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


