"""Running a compare: the warm starts, each regime's sweep and seeds, then compare.json/.md/.png."""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Optional

from svfseg.compare.adapt import adapt_rows, score_adaptations
from svfseg.compare.cells import CellInterrupted, _check_episode_count, run_cell
from svfseg.compare.plan import (WARM_START_SEED, ComparePlan, cell_config, check_owned_keys, check_plan_lists,
                                 sweep_grid, warm_start_checkpoint, warm_start_config)
from svfseg.compare.plot import plot_compare
from svfseg.compare.render import compare_markdown
from svfseg.compare.summary import summarize
from svfseg.engine.runfolder import RunFolder, write_json_atomic, write_text_atomic
from svfseg.engine.runlock import RunLock

logger = logging.getLogger(__name__)


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
    from svfseg.engine.resolved import resolve_run
    from svfseg.engine.tasks.fewshot import protocol_runs

    path = plan.out / "episodes" / f"test_fold{cfg.fold}_{cfg.shot}shot.json"
    seed, count = protocol_runs(cfg, cfg.eval.protocol)[0]
    _check_episode_count(path, plan.test_episodes or count, "--test-episodes", plan.force)
    if not path.exists():
        ds = eval_dataset(resolve_run(cfg), seed=seed, count=plan.test_episodes or count)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.episodes.save(path)
    return path


def _run_regime(plan: ComparePlan, fold: int, shot: int, regime: str, cells: list, sweeps: dict, adapted: list,
                choices: dict) -> None:
    """The sweep (if any), then every seed of one regime at one (fold, shot) and its adaptation scores; appends to
    ``cells``/``sweeps``/``adapted`` (``choices``: the adaptation settings the first seed chose)."""
    grid = sweep_grid(plan, regime)
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
                reason = RunFolder(rec["run_dir"]).diverged_reason()
                diverged[f"{mult:g}"] = reason if reason is not None else "non-finite loss"
        scored = {m: v for m, v in trials.items() if v is not None and math.isfinite(v)}
        chosen = max(scored, key=scored.get) if scored else grid[0]
        sweeps[f"{regime}/fold{fold}/{shot}shot"] = {"val_miou": {f"{m:g}": v for m, v in trials.items()},
                                                     "movement": moved, "chosen": chosen, "diverged": diverged}
    for seed in plan.seeds:
        cfg = cell_config(plan, fold, shot, regime, seed, chosen)
        episodes = test_episode_file(plan, cfg)
        rec = run_cell(cfg, episodes, plan.force)
        cells.append({"regime": regime, "seed": seed, "fold": fold, "shot": shot, "lr_mult": chosen, **rec})
        if rec.get("status") == "finished":
            adapted += score_adaptations(plan, fold, shot, regime, seed, chosen, rec, episodes, choices)


def run_compare(plan: ComparePlan, *, lock: Optional[RunLock] = None) -> dict:
    """Run every cell of ``plan`` (skipping finished ones), then write compare.json/.md/.png.

    ``plan.threads`` holds for everything the compare computes (episode files, every cell's training and
    scoring, the warm starts), not only where the cells' configs name it. The whole ``plan.out`` is locked
    for the compare's duration (a second compare into it is refused at once, naming this one's PID), and
    each cell's folder while it is looked at and trained.

    Args:
        plan: what to run.
        lock: ``plan.out``'s lock, already held by the caller (``svfseg demo``); None: taken here.

    Returns:
        The ``compare.json`` content.
    """
    from svfseg.engine.model import check_model_names
    from svfseg.engine.runtime import threads_for

    check_plan_lists(plan)
    check_owned_keys(plan)
    if plan.reference not in plan.regimes:
        raise ValueError(f"--reference {plan.reference!r} is not among --regimes {plan.regimes}")
    for name in plan.regimes:  # a typo in a regime or an override fails now, not hours in
        check_model_names(cell_config(plan, plan.folds[0], plan.shots[0], name, plan.seeds[0], None))
    if plan.warm_start < 0:
        raise ValueError(f"--warm-start: expected a number of steps >= 0, found {plan.warm_start}")
    if lock is not None and not (lock.held and lock.run_dir == plan.out):
        raise ValueError(f"run_compare: the lock given is not held on --out {plan.out}")
    with compare_lock(plan.out) if lock is None else contextlib.nullcontext(), threads_for(plan.threads):
        return _run_locked(plan)


def compare_lock(out: Path, what: str = "svfseg compare") -> RunLock:
    """The lock a compare holds on its whole ``--out`` (refused at once when another process holds it)."""
    return RunLock(out, what, instead="choose another --out")


def _run_locked(plan: ComparePlan) -> dict:
    plan.out.mkdir(parents=True, exist_ok=True)
    cells, sweeps, warm, adapted, choices = [], {}, [], [], {}
    stopped = False
    try:
        for fold in plan.folds:
            for shot in plan.shots:
                if plan.warm_start:
                    warm.append(run_warm_start(plan, fold, shot))
                for name in plan.regimes:
                    _run_regime(plan, fold, shot, name, cells, sweeps, adapted, choices)
    except CellInterrupted as e:
        logger.warning("compare: %s", e)
        stopped = True
    result = summarize(plan, cells, sweeps)
    result["stopped"] = stopped
    result["variants"] = {a.label: {"regime": a.regime, "overrides": list(a.overrides)} for a in plan.arms.values()}
    result["warm_start"] = warm
    result["adapt"] = list(plan.adapt)
    result["adapt_rows"] = adapt_rows(plan, adapted, cells)
    result["adapt_choices"] = choices
    result["adapted"] = adapted
    write_json_atomic(plan.out / "compare.json", result, default=str)
    write_text_atomic(plan.out / "compare.md", compare_markdown(result))
    plot_compare(result, plan.out / "compare.png")
    return result
