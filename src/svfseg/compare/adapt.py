"""A compare's adaptation rows: every finished cell scored again with each ``--adapt`` choice on its own test episodes.

Each (regime, adapt.params, fold, shot) chooses its adaptation steps and lr once, on the first
seed's cell, from base-class validation episodes (the ``--backbone-lr`` rule: never the test fold);
the other seeds reuse that choice. A row is paired with the same trained models scored without
adaptation: per test episode (a paired bootstrap, the models fixed) and per seed (a paired t over
training seeds, when there are at least two).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from svfseg.compare.plan import ComparePlan, cell_config
from svfseg.compare.statistics import PairedInterval, paired_bootstrap_miou, paired_t_interval
from svfseg.engine.runfolder import RunFolder, results_file
from svfseg.regimes import adapt_trains
from svfseg.results import mean_std

logger = logging.getLogger(__name__)

def adapt_key(regime: str, params: str, fold: int, shot: int) -> str:
    return f"{regime}/{params}/fold{fold}/{shot}shot"


def reusable_results(results: Path, cfg, episodes: Path) -> Optional[dict]:
    """Earlier results of this adaptation when they were made with the same settings on the same episodes."""
    if not results.is_file():
        return None
    old = json.loads(results.read_text())
    fingerprint = json.loads(Path(episodes).read_text()).get("fingerprint")
    settings = {k: v for k, v in (old.get("adapt") or {}).items() if k in cfg.adapt.to_dict()}
    same = (settings == json.loads(json.dumps(cfg.adapt.to_dict()))
            and old["runs"][0].get("episode_fingerprint") == fingerprint and "per_episode" in old["runs"][0])
    return old if same else None


def score_adaptations(plan: ComparePlan, fold: int, shot: int, regime: str, seed: int, mult: Optional[float],
                      cell: dict, episodes: Path, choices: dict) -> list[dict]:
    """Score one finished cell with every adaptation of ``plan.adapt``; one record per adaptation.

    ``choices`` maps :func:`adapt_key` to the steps and lr chosen on the first seed's cell (filled in here
    by that cell, read by the later seeds').
    """
    from svfseg.engine.tasks import TestOptions
    from svfseg.engine.testing import score_with_task

    out = []
    for params in filter(adapt_trains, plan.adapt):
        key = adapt_key(regime, params, fold, shot)
        chosen = choices.get(key)
        extra = [f"adapt.params={params}"]
        if chosen is not None:  # a later seed: the first seed's choice, not a new look at validation
            extra += [f"adapt.steps={chosen['steps']}"] + ([f"adapt.lr={chosen['lr']}"] if chosen["lr"] else [])
        cfg = cell_config(plan, fold, shot, regime, seed, mult, extra)
        folder = RunFolder(cell["run_dir"])
        out_dir = folder.adapt_test_dir(params)  # `svfseg test`'s results, in the cell's own folder
        res = reusable_results(results_file(out_dir), cfg, episodes)
        if res is None:
            logger.info("compare: %s seed %d: adapting on each episode's supports (%s)", key, seed, params)
            res, _ = score_with_task(folder.best, cfg,
                                     options=TestOptions(episodes=episodes, out_dir=out_dir, per_episode=True))
        record = res["adapt"]["chosen"]
        if chosen is None:
            choices[key] = {"steps": record["steps"], "lr": record["lr"], "trials": record["trials"],
                            "source": record["source"], "seed": seed}
        run = res["runs"][0]
        out.append({"regime": regime, "adapt": params, "seed": seed, "fold": fold, "shot": shot,
                    "miou": run["miou"], "fb_iou": run["fb_iou"], "seconds_per_episode": run.get("seconds_per_episode"),
                    "steps": record["steps"], "lr": record["lr"], "trainable": res["adapt"].get("trainable"),
                    "results": str(results_file(out_dir)), "plain_results": cell.get("results")})
    return out


def _per_episode(path: str) -> list:
    return json.loads(Path(path).read_text())["runs"][0]["per_episode"]


def adapt_rows(plan: ComparePlan, adapted: list[dict], cells: list[dict]) -> dict:
    """Per (regime, adapt.params): mean +- std over seeds and the two paired intervals to no adaptation."""
    rows = {}
    plain = {(c["regime"], c["seed"], c["fold"], c["shot"]): c for c in cells if c.get("status") == "finished"}
    for name in plan.regimes:
        for params in filter(adapt_trains, plan.adapt):
            mine = [a for a in adapted if a["regime"] == name and a["adapt"] == params]
            if not mine:
                continue
            per_seed, ref_seed = {}, {}
            for seed in plan.seeds:
                got = [a for a in mine if a["seed"] == seed]
                refs = [plain.get((name, seed, a["fold"], a["shot"])) for a in got]
                if len(got) == len(plan.folds) * len(plan.shots) and all(refs):
                    per_seed[seed] = sum(a["miou"] for a in got) / len(got)
                    ref_seed[seed] = sum(r["miou"] for r in refs) / len(refs)
            seeds = sorted(per_seed)
            by_seed = paired_t_interval([per_seed[s] for s in seeds], [ref_seed[s] for s in seeds]) if seeds else None
            groups = []
            for fold in plan.folds:
                for shot in plan.shots:
                    pair = [(a, plain[(name, a["seed"], fold, shot)]) for a in mine
                            if a["fold"] == fold and a["shot"] == shot and a["seed"] in per_seed]
                    if pair:
                        groups.append(([_per_episode(a["results"]) for a, _ in pair],
                                       [_per_episode(p["results"]) for _, p in pair]))
            by_episode = paired_bootstrap_miou(groups) if groups else None
            m, sd = mean_std(per_seed.values())
            rows[f"{name} + adapt {params}"] = {
                "regime": name, "adapt": params, "miou_mean": m, "miou_std": sd,
                "per_seed_miou": {str(k): v for k, v in per_seed.items()},
                "plain_miou_mean": mean_std(ref_seed.values())[0],
                "diff_by_episode": None if by_episode is None else by_episode.__dict__,
                "diff_by_seed": None if by_seed is None else by_seed.__dict__,
                "verdict": adapt_verdict(by_episode, by_seed),
                "chosen": {f"fold{a['fold']}/{a['shot']}shot": choice_text(a["steps"], a["lr"])
                           for a in mine if a["seed"] == plan.seeds[0]},
                "trainable": mine[0].get("trainable"),
                "seconds_per_episode": _mean([a["seconds_per_episode"] for a in mine]),
                "plain_seconds_per_episode": _mean([_plain_seconds(plain, a) for a in mine]),
            }
    return rows


def _plain_seconds(plain: dict, a: dict) -> Optional[float]:
    c = plain.get((a["regime"], a["seed"], a["fold"], a["shot"]))
    if not c or not c.get("test_seconds") or not c.get("episodes"):
        return None
    return c["test_seconds"] / c["episodes"]


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def choice_text(steps: int, lr: Optional[float]) -> str:
    return "none" if not steps else f"{steps} steps at lr {lr:g}"


def adapt_verdict(by_episode: Optional[PairedInterval], by_seed: Optional[PairedInterval]) -> str:
    """better / worse / within / unknown: beyond both intervals that exist (the seeds' one needs two seeds)."""
    verdicts = [i.verdict() for i in (by_episode, by_seed) if i is not None and i.verdict() != "unknown"]
    if not verdicts:
        return "unknown"
    if all(v == "better" for v in verdicts):
        return "better"
    if all(v == "worse" for v in verdicts):
        return "worse"
    return "within"
