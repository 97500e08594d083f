"""A compare's rows: per regime the mean +- std over seeds, the paired interval to the reference, and the costs."""
from __future__ import annotations

from typing import Optional

from svfseg.compare.plan import ComparePlan
from svfseg.compare.statistics import PairedInterval, paired_t_interval
from svfseg.results import mean_std


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
