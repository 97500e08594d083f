"""`svfseg compare`: several backbone regimes x seeds x folds x shots on identical episodes, with paired intervals.

Every cell (regime, seed, fold, shot) is an ordinary run folder under ``OUT/runs``; all cells of
a (fold, shot) are scored on one saved test episode file, and select/validate on one saved
file of base-class validation episodes (``train.select_on=base_heldout``), so the test fold
is looked at only once, after training.

The short-budget rule (``--backbone-lr``): the learning-rate multiplier of whatever a regime
trains in the backbone (the ``svf`` and ``backbone`` parameter groups) is chosen per regime
from a small grid on the base-class validation episodes of the first seed; the chosen value
is then used for every seed. The same grid and the same choice rule apply to every regime. A
tie goes to the earlier grid value (list the grid ascending: a tie keeps the smaller lr), and a
diverged trial counts as failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from svfseg.compare_cells import (  # noqa: F401  (CellSettingsChanged, cell_settings, settings_differences: public here)
    CellSettingsChanged,
    _check_cell_settings,
    _check_episode_count,
    _write_cell_record,
    cell_settings,
    settings_differences,
)
from svfseg.compare_render import compare_markdown, verdict_sentence  # noqa: F401  (public here too)
from svfseg.compare_plot import plot_compare
from svfseg.compare_variants import Arm, expand_arms, folder_name
from svfseg.regimes import regime_spec
from svfseg.results import mean_std
from svfseg.stats import PairedInterval, paired_t_interval

logger = logging.getLogger(__name__)


class CellInterrupted(RuntimeError):
    """A cell stopped on Ctrl-C/SIGTERM: the compare stops too (a rerun resumes that cell)."""


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
        arms: Row label -> :class:`~svfseg.compare_variants.Arm` for the rows of ``regimes`` that are
            variants (a regime plus overrides, from ``--vary``); a label not in it is a plain regime.
        warm_start: Steps of a shared head warm start per (fold, shot) (0: none): the head is
            trained once with the frozen backbone, then every cell starts from it (``model.init_head``).
        threads: torch CPU threads of every cell (None: torch's default).
        force: Retrain (rescore) the cells an earlier compare into ``out`` made with other settings
            (otherwise refused, naming the differing keys).
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
    return _cell_dir(plan, fold, shot) / "warm_start" / "best.pt" if plan.warm_start else None


def _common_overrides(plan: ComparePlan, fold: int, shot: int) -> list[str]:
    return [*plan.overrides, f"fold={fold}", f"shot={shot}", f"output_dir={_cell_dir(plan, fold, shot)}",
            *([f"threads={plan.threads}"] if plan.threads else [])]


def cell_config(plan: ComparePlan, fold: int, shot: int, regime: str, seed: int, mult: Optional[float]):
    """The config of one cell: recipe, the plan's overrides, then the cell's own keys."""
    from svfseg.config import load_config

    eps = plan.out / "episodes"
    arm = plan.arms.get(regime, Arm(regime, regime))  # a --vary row: its regime and overrides
    warm = warm_start_checkpoint(plan, fold, shot)
    return load_config(plan.config, [
        *_common_overrides(plan, fold, shot), *arm.overrides, f"seed={seed}", f"model.regime={arm.regime}",
        f"name={_cell_name(regime, mult, seed)}",
        "train.select_on=base_heldout", "train.val_every=1", f"train.val_episodes={plan.val_episodes}",
        f"train.val_episodes_file={eps / f'val_base_fold{fold}_{shot}shot.json'}", *lr_overrides(mult),
        *([f"model.init_head={warm}"] if warm else [])])


def warm_start_config(plan: ComparePlan, fold: int, shot: int):
    """The shared warm start: the head trained ``plan.warm_start`` steps with the frozen backbone, last weights kept."""
    from svfseg.config import load_config

    return load_config(plan.config, [
        *_common_overrides(plan, fold, shot), f"seed={WARM_START_SEED}", "model.regime=frozen", "name=warm_start",
        "train.epochs=1", f"train.steps_per_epoch={plan.warm_start}", "train.val_every=0", "train.select_on=last"])


def run_warm_start(plan: ComparePlan, fold: int, shot: int) -> dict:
    """Train (or reuse) the warm start of (fold, shot); its record for ``compare.json``."""
    cfg = warm_start_config(plan, fold, shot)
    rec = run_cell(cfg, None, plan.force)
    if rec.get("status") != "finished":
        raise RuntimeError(f"compare: the warm start {cfg.run_dir()} did not finish ({rec.get('status')}); "
                           f"rerun the same command to resume it")
    return {"fold": fold, "shot": shot, "steps": plan.warm_start, "seed": WARM_START_SEED,
            "checkpoint": str(warm_start_checkpoint(plan, fold, shot)), "train_seconds": rec.get("train_seconds")}


def test_episode_file(plan: ComparePlan, cfg) -> Path:
    """The one test episode file of ``cfg``'s (fold, shot), made on first use."""
    from svfseg.engine.data import eval_dataset
    from svfseg.engine.tasks.fewshot import protocol_runs

    path = plan.out / "episodes" / f"test_fold{cfg.fold}_{cfg.shot}shot.json"
    seed, count = protocol_runs(cfg, cfg.eval.protocol)[0]
    _check_episode_count(path, plan.test_episodes or count, "--test-episodes", plan.force)
    if not path.exists():
        ds = eval_dataset(cfg, seed=seed, count=plan.test_episodes or count)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.episodes.save(path)
    return path


def run_cell(cfg, episodes: Optional[Path], force: bool = False) -> dict:
    """Train (or skip / resume) one cell and score it on ``episodes``; its record for ``compare.json``.

    A finished cell (``train_summary.json`` says finished) is not retrained, and not rescored
    when ``test/results.json`` exists; a cell with a ``last.pt`` but no finished summary is
    resumed. ``episodes`` None: train only (a sweep trial that was not chosen is never tested).
    A cell folder made with other settings (config keys, test episodes; ``compare_cell.json``)
    is refused with the differing keys, or with ``force`` cleared and retrained.
    """
    from svfseg.engine.checkpoint import NonFiniteWeights
    from svfseg.engine.loop import NonFiniteLoss
    from svfseg.engine.run import train_run
    from svfseg.engine.runfiles import clear_run
    from svfseg.engine.tasks import TestOptions
    from svfseg.engine.testing import score_with_task

    run_dir = cfg.run_dir()
    if force and cfg.train.val_episodes_file:
        _check_episode_count(Path(cfg.train.val_episodes_file), cfg.train.val_episodes, "--val-episodes", True)
    redo = _check_cell_settings(cfg, episodes, force)
    if redo == "retrain":
        clear_run(run_dir)
    elif redo == "rescore":
        shutil.rmtree(run_dir / "test", ignore_errors=True)
    summary_path, results_path = run_dir / "train_summary.json", run_dir / "test" / "results.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    done = summary is not None and summary.get("status") == "finished"
    diverged = run_dir / "diverged.txt"
    if diverged.exists():
        return {"run_dir": str(run_dir), "status": "diverged"}
    if not done:
        if (run_dir / "last.pt").exists():
            cfg.resume = True
            logger.info("compare: resuming %s", run_dir)
        try:
            # without a last.pt, whatever the cell folder holds is from an attempt that never
            # checkpointed: start it afresh
            result = train_run(cfg, argv=["svfseg", "compare"], overwrite=not cfg.resume)
        except (NonFiniteLoss, NonFiniteWeights) as e:
            # A diverged cell (e.g. the largest lr of a sweep: a NaN loss, or inf weights that a
            # finite loss did not show yet) is a result, not a crash; the marker keeps a rerun from
            # training it again.
            logger.warning("compare: %s diverged: %s", run_dir, e)
            diverged.write_text(f"{e}\n")
            return {"run_dir": str(run_dir), "status": "diverged"}
        summary = json.loads(summary_path.read_text())
        if result.status != "finished":
            if cfg.train.stop_after_steps is None:  # a signal, not the planned stop of a test
                raise CellInterrupted(f"{run_dir} stopped at step {result.step}; rerun the same command to resume")
            return {"run_dir": str(run_dir), "status": result.status}
    fp = summary.get("footprint") or {}
    steps = max(summary.get("step") or 0, 1)
    rec = {"run_dir": str(run_dir), "status": "finished",
           "val_miou": (summary.get("best") or {}).get("miou"), "train_seconds": summary.get("seconds"),
           "seconds_per_step": (summary.get("seconds") or 0) / steps,
           "trainable": fp.get("trainable"), "adapter_bytes": (fp.get("adapter") or {}).get("bytes"),
           "peak_memory_bytes": fp.get("peak_memory_bytes"), "movement": fp.get("movement"),
           "movement_max_stage_mean": fp.get("movement_max_stage_mean"),
           "gradient_scale_step1": fp.get("gradient_scale_step1")}
    if episodes is None:
        _write_cell_record(run_dir, cell_settings(cfg, None))
        return rec
    if not results_path.exists() or not done:
        # the same entry as `svfseg test`: the task the model's recipe scores it with
        score_with_task(run_dir / "best.pt", cfg, options=TestOptions(episodes=episodes, out_dir=run_dir / "test"))
    run = json.loads(results_path.read_text())["runs"][0]
    rec.update(miou=run["miou"], fb_iou=run["fb_iou"], episodes=run["episodes"],
               episode_fingerprint=run["episode_fingerprint"], test_seconds=run["seconds"])
    _write_cell_record(run_dir, cell_settings(cfg, episodes))
    return rec


def _trains_backbone(regime: str) -> bool:
    return regime_spec(regime).backbone_grad


def _run_regime(plan: ComparePlan, fold: int, shot: int, regime: str, cells: list, sweeps: dict) -> None:
    """The sweep (if any) and then every seed of one regime at one (fold, shot); appends to ``cells``/``sweeps``."""
    trains = _trains_backbone(plan.arms.get(regime, Arm(regime, regime)).regime)  # a --vary row: its regime
    grid = plan.backbone_lr if trains and len(plan.backbone_lr) > 1 else [None]
    chosen = grid[0]
    if len(grid) > 1:
        # The sweep: first seed only, chosen on base-class validation episodes; only the chosen
        # trial is then scored on the test episodes (and serves as that seed's cell).
        trials, moved, diverged = {}, {}, {}
        for mult in grid:
            rec = run_cell(cell_config(plan, fold, shot, regime, plan.seeds[0], mult), None, plan.force)
            trials[mult] = rec.get("val_miou") if rec.get("status") == "finished" else None
            moved[f"{mult:g}"] = rec.get("movement_max_stage_mean")
            if rec.get("status") == "diverged":  # why, in the words of the error that run_cell kept
                marker = Path(rec["run_dir"]) / "diverged.txt"
                diverged[f"{mult:g}"] = marker.read_text().strip() if marker.is_file() else "non-finite loss"
        scored = {m: v for m, v in trials.items() if v is not None and math.isfinite(v)}
        chosen = max(scored, key=scored.get) if scored else grid[0]
        sweeps[f"{regime}/fold{fold}/{shot}shot"] = {"val_miou": {f"{m:g}": v for m, v in trials.items()},
                                                     "movement": moved, "chosen": chosen, "diverged": diverged}
    for seed in plan.seeds:
        cfg = cell_config(plan, fold, shot, regime, seed, chosen)
        rec = run_cell(cfg, test_episode_file(plan, cfg), plan.force)
        cells.append({"regime": regime, "seed": seed, "fold": fold, "shot": shot, "lr_mult": chosen, **rec})


def check_plan_lists(plan: ComparePlan) -> None:
    """Refuse empty or repeated seeds, regimes, folds and shots (a repeated seed is no second pair)."""
    for option, values in (("--seeds", plan.seeds), ("--regimes", plan.regimes), ("--folds", plan.folds),
                           ("--shots", plan.shots)):
        if not values:
            raise ValueError(f"compare: {option}: expected at least one value, found none")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"compare: {option}: expected distinct values, found {values} (repeats {repeated})")


def run_compare(plan: ComparePlan) -> dict:
    """Run every cell of ``plan`` (skipping finished ones), then write compare.json/.md/.png.

    Returns:
        The ``compare.json`` content.
    """
    check_plan_lists(plan)
    if plan.reference not in plan.regimes:
        raise ValueError(f"--reference {plan.reference!r} is not among --regimes {plan.regimes}")
    for name in plan.regimes:  # a typo in a regime or an override fails now, not hours in
        cell_config(plan, plan.folds[0], plan.shots[0], name, plan.seeds[0], None)
    if plan.warm_start < 0:
        raise ValueError(f"--warm-start: expected a number of steps >= 0, found {plan.warm_start}")
    plan.out.mkdir(parents=True, exist_ok=True)
    cells, sweeps, warm = [], {}, []
    stopped = False
    try:
        for fold in plan.folds:
            for shot in plan.shots:
                if plan.warm_start:
                    warm.append(run_warm_start(plan, fold, shot))
                for name in plan.regimes:
                    _run_regime(plan, fold, shot, name, cells, sweeps)
    except CellInterrupted as e:
        logger.warning("compare: %s", e)
        stopped = True
    result = summarize(plan, cells, sweeps)
    result["stopped"] = stopped
    result["variants"] = {a.label: {"regime": a.regime, "overrides": list(a.overrides)} for a in plan.arms.values()}
    result["warm_start"] = warm
    (plan.out / "compare.json").write_text(json.dumps(result, indent=1, default=str))
    (plan.out / "compare.md").write_text(compare_markdown(result))
    plot_compare(result, plan.out / "compare.png")
    return result


def summarize(plan: ComparePlan, cells: list[dict], sweeps: dict) -> dict:
    """Per regime: mean +- std over seeds (fold-averaged), paired interval to the reference, costs."""
    final = [c for c in cells if c.get("status") == "finished"]
    incomplete = [c for c in cells if c.get("status") not in ("finished", "diverged")]
    diverged = [c for c in cells if c.get("status") == "diverged"]

    def per_seed(regime: str, key: str) -> dict[int, float]:
        out = {}
        for seed in plan.seeds:
            vals = [c[key] for c in final if c["regime"] == regime and c["seed"] == seed]
            if len(vals) == len(plan.folds) * len(plan.shots):
                out[seed] = sum(vals) / len(vals)
        return out

    ref = per_seed(plan.reference, "miou")
    rows = {}
    for name in plan.regimes:
        mine = [c for c in final if c["regime"] == name]
        if not mine:
            continue
        miou, fb = per_seed(name, "miou"), per_seed(name, "fb_iou")
        seeds = [s for s in plan.seeds if s in miou and s in ref]
        interval: Optional[PairedInterval] = None
        if name != plan.reference and seeds:
            interval = paired_t_interval([miou[s] for s in seeds], [ref[s] for s in seeds])
        m, sd = mean_std(miou.values())
        fm, fsd = mean_std(fb.values())
        one = mine[0]
        moves = [c["movement_max_stage_mean"] for c in mine if c.get("movement_max_stage_mean") is not None]
        rows[name] = {
            "miou_mean": m, "miou_std": sd, "fb_iou_mean": fm, "fb_iou_std": fsd,
            "per_seed_miou": {str(k): v for k, v in miou.items()}, "seeds": len(miou),
            "diff_to_reference": None if interval is None else interval.__dict__,
            "verdict": None if interval is None else interval.verdict(),
            "trainable": one.get("trainable"), "adapter_bytes": one.get("adapter_bytes"),
            "train_seconds_mean": mean_std([c["train_seconds"] for c in mine])[0],
            "seconds_per_step": mean_std([c["seconds_per_step"] for c in mine])[0],
            "peak_memory_bytes": max((c["peak_memory_bytes"] or 0) for c in mine) or None,
            "movement_max_stage_mean": (sum(moves) / len(moves)) if moves else None,
            "lr_mult": one.get("lr_mult"),
        }
    return {"config": str(plan.config), "regimes": plan.regimes, "seeds": plan.seeds, "folds": plan.folds,
            "shots": plan.shots, "overrides": plan.overrides, "reference": plan.reference,
            "backbone_lr_grid": plan.backbone_lr, "interval": "paired t over seeds, 95%",
            "sweeps": sweeps, "rows": rows, "cells": cells, "incomplete": incomplete, "diverged": diverged}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_compare_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg compare`."""
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--regimes", default="frozen,svf,full", help="comma-separated model.regime values")
    p.add_argument("--seeds", default="0,1", type=_ints, help="comma-separated training seeds")
    p.add_argument("--folds", default=["0"], nargs="+", help="folds (default 0)")
    p.add_argument("--shots", default=["1"], nargs="+", help="shots (default 1)")
    p.add_argument("--reference", default="frozen", help="regime the others are compared with")
    p.add_argument("--backbone-lr", default="1", type=_floats,
                   help="grid of lr multipliers for the trained backbone groups, chosen per regime on base-class "
                        "validation episodes (e.g. 1,10,100; one value = no sweep)")
    p.add_argument("--test-episodes", type=int, default=None, help="test episodes per (fold, shot)")
    p.add_argument("--val-episodes", type=int, default=200, help="base-class validation episodes per (fold, shot)")
    p.add_argument("--warm-start", type=int, default=0, metavar="STEPS",
                   help="train the head STEPS steps with the frozen backbone once per (fold, shot), then start every "
                        "cell (frozen included) from that head (default 0: no warm start)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads of every cell")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    p.add_argument("--vary", action="append", default=[], metavar="[REGIME:]KEY=V1|V2",
                   help="extra rows: REGIME (default: every regime that trains the backbone, except the reference) "
                        "once per value of KEY, e.g. --vary 'svf:svf.train=[S]|[U,S]|[S,V]' or "
                        "--vary 'svf:svf.stages=[layer4]|[layer3,layer4]'; repeat for more keys (every combination)")
    p.add_argument("--force", action="store_true",
                   help="retrain (rescore) the cells an earlier compare into --out made with other settings")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every cell")
    return p


def run_compare_cli(args: argparse.Namespace) -> int:
    """Entry point of `svfseg compare`: runs, then prints the Markdown."""
    # `--folds 0 1 key=value` : argparse hands the overrides after a list option to that option.
    overrides = list(args.overrides)
    lists = {}
    for name in ("folds", "shots"):
        items = [x for x in getattr(args, name) if "=" not in x]
        overrides += [x for x in getattr(args, name) if "=" in x]
        try:
            lists[name] = [int(x) for x in items]
        except ValueError:
            raise ValueError(f"--{name}: expected integers, got {items}") from None
    arms = expand_arms([r for r in args.regimes.split(",") if r], args.reference, args.vary, _trains_backbone)
    plan = ComparePlan(config=args.config, regimes=[a.label for a in arms], seeds=args.seeds,
                       folds=lists["folds"], shots=lists["shots"], overrides=overrides, out=args.out,
                       reference=args.reference, backbone_lr=args.backbone_lr, test_episodes=args.test_episodes,
                       val_episodes=args.val_episodes, warm_start=args.warm_start, threads=args.threads,
                       arms={a.label: a for a in arms if a.overrides}, force=args.force)
    result = run_compare(plan)
    print(compare_markdown(result))
    return 130 if result.get("stopped") else 0
