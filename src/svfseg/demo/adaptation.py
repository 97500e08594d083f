"""The demo's adaptation stage: the kept SVF checkpoint scored at K shots without and with adaptation on each
episode's own supports, every choice on the same test episodes, each paired with no adaptation per episode.

Each choice's steps and lr are picked on base-class validation episodes (not adapting is a candidate);
the test episodes are scored once. The interval is a paired bootstrap over the test episodes: it covers
which episodes were drawn, for this one trained model (the compare above covers training seeds).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptPlan:
    """What the adaptation stage runs.

    Attributes:
        params: The ``adapt.params`` rows (each paired with no adaptation).
        shot: K of the test and validation episodes.
        test_episodes: Test episodes (fold 0's novel classes, val split).
        val_episodes: Base-class validation episodes each choice is made on.
        grid_lr: Learning rates the choice tries.
        grid_steps: Step counts the choice tries.
    """

    params: tuple[str, ...]
    shot: int
    test_episodes: int
    val_episodes: int
    grid_lr: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    grid_steps: tuple[int, ...] = (5, 10)


def _list(values) -> str:
    return "[" + ",".join(f"{v:g}" for v in values) + "]"


def run_adaptation(checkpoint: Path, plan: AdaptPlan, *, root: Path, out: Path, image_size: int,
                   progress: bool = True) -> dict:
    """Score ``checkpoint`` with no adaptation and with each of ``plan.params``; rows as compare.md lays them out.

    Results go to ``out/adaptation/<K>shot_<params>/`` (a killed demo reuses the finished ones).
    """
    from svfseg.compare.adapt import adapt_verdict, choice_text, reusable_results
    from svfseg.compare.statistics import paired_bootstrap_miou
    from svfseg.config import config_with_overrides, to_dict
    from svfseg.engine.data import write_episode_file
    from svfseg.engine.model import checkpoint_config
    from svfseg.engine.resolved import resolve_run
    from svfseg.engine.runfolder import results_file
    from svfseg.engine.tasks import TestOptions
    from svfseg.engine.testing import score_with_task
    from svfseg.regimes import NO_ADAPTATION

    base = to_dict(checkpoint_config(checkpoint))
    common = [f"data.root={root}", f"data.test_size={image_size}", f"shot={plan.shot}",
              f"adapt.val_episodes={plan.val_episodes}", f"adapt.grid_lr={_list(plan.grid_lr)}",
              f"adapt.grid_steps={_list(plan.grid_steps)}", f"train.progress={str(progress).lower()}"]
    # the count is in the name: a rerun with another --adapt-episodes draws its own file (and rescores)
    episodes = out / "episodes" / f"adapt_test_fold0_{plan.shot}shot_{plan.test_episodes}.json"
    if not episodes.exists():
        cfg = config_with_overrides(base, common, str(checkpoint))
        episodes.parent.mkdir(parents=True, exist_ok=True)
        write_episode_file(resolve_run(cfg), episodes, seed=0, count=plan.test_episodes)
    results = {}
    for params in (NO_ADAPTATION, *plan.params):
        cfg = config_with_overrides(base, [*common, f"adapt.params={params}"], str(checkpoint))
        folder = out / "adaptation" / f"{plan.shot}shot_{params}"
        res = reusable_results(results_file(folder), cfg, episodes)
        if res is None:
            res, _ = score_with_task(checkpoint, cfg, options=TestOptions(episodes=episodes, out_dir=folder,
                                                                          per_episode=True))
        results[params] = res
    plain = results[NO_ADAPTATION]["runs"][0]
    rows = {}
    for params in plan.params:
        res = results[params]
        run, chosen = res["runs"][0], res["adapt"]["chosen"]
        by_episode = paired_bootstrap_miou([([run["per_episode"]], [plain["per_episode"]])])
        rows[f"svf checkpoint + adapt {params}"] = {
            "regime": "svf", "adapt": params, "miou_mean": run["miou"], "miou_std": math.nan,
            "per_seed_miou": {"0": run["miou"]}, "plain_miou_mean": plain["miou"],
            "diff_by_episode": by_episode.__dict__, "diff_by_seed": None,
            "verdict": adapt_verdict(by_episode, None),
            "chosen": {f"fold0/{plan.shot}shot": choice_text(chosen["steps"], chosen["lr"])},
            "steps": chosen["steps"], "lr": chosen["lr"],
            "trials": chosen["trials"], "trainable": res["adapt"]["trainable"],
            "seconds_per_episode": run["seconds_per_episode"],
            "plain_seconds_per_episode": plain["seconds_per_episode"],
        }
    return {"checkpoint": str(checkpoint), "shot": plan.shot, "plan": plan.__dict__, "episodes": str(episodes),
            "plain_miou": plain["miou"], "rows": rows}


def adaptation_markdown(stage: dict) -> str:
    """The demo's adaptation table, its verdicts and the validation scores each choice was made on."""
    from svfseg.compare.render import adapt_markdown
    from svfseg.results import pct

    lines = [f"Test-time adaptation of the SVF checkpoint at {stage['shot']}-shot on "
             f"{stage['plan']['test_episodes']} test episodes (one trained model: the interval is a paired bootstrap "
             f"over these episodes, not over training seeds).", ""]
    lines += adapt_markdown(stage["rows"])
    lines += ["", "Validation mIoU (%) of each candidate (base-class episodes; the choice is the best, ties to no "
                  "adaptation, then fewer steps, then the smaller lr):"]
    for label, r in stage["rows"].items():
        lines.append(f"- {label}: " + ", ".join(f"{k} {pct(v)}" for k, v in r["trials"].items()))
    return "\n".join(lines) + "\n"
