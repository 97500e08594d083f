"""Which statistic a result is, and the paper's statistic recomputed from a run's own logs (`report --as-paper`).

svfseg's number for a run is the mean mIoU over the test seeds of its protocol, on test episodes
drawn after training. The published numbers are other statistics of the same run:

- the SVF authors' train_*.py and BAM's and PFENet's train.py print the best validation mIoU over
  every validation of training, on episodes of the test fold itself: the test fold picks the epoch.
  The SVF authors and BAM validate every epoch on 1,000 episodes (about 200 validations on Pascal,
  99 on COCO with the half-epoch ones); PFENet every 2 epochs on 5,000 (Pascal) and every epoch on
  20,000 (COCO); all at seed 321. The recipes do the same, and the row names the settings;
- BAM's test.py prints the best and the mean over its 5 test seeds.

Both pick a maximum over noisy draws, so both are optimistic next to a mean over fresh seeds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from svfseg.engine.runfolder import RunFolder

#: Labels of the statistics, as a report row states them.
MEAN_OVER_SEEDS = "mean over {n} test seed(s) ({protocol})"
VAL_MAX = "max over {n} validations on the test fold (optimistic)"
#: The same, when the run's config.yaml says how it validated (the recipes follow upstream: PFENet 5,000 /
#: 20,000 episodes every 2 / 1 epochs, BAM and the SVF authors 1,000 every epoch, all at seed 321).
VAL_MAX_OF = "max over {n} validations on the test fold ({episodes:,} episodes at seed {seed}, every {every}; optimistic)"
BEST_OF_SEEDS = "best of {n} test seeds (optimistic)"
ONE_FILE = "one episode file (--episodes)"


def own_statistic(results: dict) -> str:
    """The statistic of ``results.json``'s summary mean: the mean over its test runs."""
    if results.get("protocol") == "file":
        return ONE_FILE
    n = len(results.get("runs") or []) or 1
    return MEAN_OVER_SEEDS.format(n=n, protocol=results.get("protocol") or "?")


def _test_fold_validations(summary: dict) -> list[dict]:
    return [h for h in summary.get("history") or []
            if h.get("on") == "test_fold" and isinstance(h.get("miou"), (int, float)) and math.isfinite(h["miou"])]


def paper_statistic(results: dict, results_path: Path) -> Optional[dict]:
    """The paper's statistic of one tested run, from its own logs; None when they cannot give it.

    Preferred: the max over the run's validations on the test fold (``train.select_on=test_fold``,
    the way the SVF tables were produced), read from the ``train_summary.json`` beside the
    checkpoint; otherwise the best of several test seeds (BAM's test.py).

    Returns:
        ``{"miou", "fb_iou", "statistic"}`` (mIoU and FB-IoU in %; FB-IoU of the same
        validation, or the best FB-IoU over the seeds as BAM prints it).
    """
    # `svfseg test` writes RUN/test_*/results.json; the checkpoint path is as it was typed.
    candidates = [RunFolder(results_path.parent.parent)]
    if results.get("checkpoint"):
        candidates.append(RunFolder(Path(results["checkpoint"]).parent))
    found = next(((c, s) for c in candidates for s in (c.read_summary(),) if s is not None), None)
    if found is not None:
        folder, summary = found
        vals = _test_fold_validations(summary)
        if vals:
            top = max(vals, key=lambda h: h["miou"])
            fb = top.get("fb_iou")
            return {"miou": 100 * top["miou"], "fb_iou": None if fb is None else 100 * fb,
                    "statistic": _validation_statistic(len(vals), folder)}
    runs = [r for r in results.get("runs") or [] if isinstance(r.get("miou"), (int, float))]
    if len(runs) > 1:
        fbs = [r["fb_iou"] for r in runs if isinstance(r.get("fb_iou"), (int, float))]
        return {"miou": 100 * max(r["miou"] for r in runs), "fb_iou": 100 * max(fbs) if fbs else None,
                "statistic": BEST_OF_SEEDS.format(n=len(runs))}
    return None


def _validation_statistic(n: int, folder: RunFolder) -> str:
    """VAL_MAX, with the run's validation settings (episodes, seed, cadence) when its config.yaml gives them."""
    import yaml

    try:
        train = (yaml.safe_load(folder.config.read_text()) or {})["train"]
        every = int(train["val_every"])
        half = bool(train.get("half_epoch_val_max_epochs")) and int(train.get("epochs", 0)) <= int(
            train["half_epoch_val_max_epochs"])
        cadence = f"{every} epoch(s)" + (" and half-way through each" if half else "")
        return VAL_MAX_OF.format(n=n, episodes=int(train["val_episodes"]), seed=int(train["val_seed"]), every=cadence)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return VAL_MAX.format(n=n)


def as_paper_entries(entries: list[dict]) -> list[dict]:
    """Report entries with the paper's statistic in place of ours; runs without one are left out."""
    out = []
    for e in entries:
        p = e.get("paper_statistic")
        if p is not None:
            out.append({**e, "miou": p["miou"], "fb_iou": p["fb_iou"], "statistic": p["statistic"]})
    return out


def row_statistic(entries) -> str:
    """The statistics of a row's entries, each named once (a row may mix protocols)."""
    names = sorted({e.get("statistic") or "?" for e in entries})
    return "; ".join(names) if names else "–"


AS_PAPER_NOTE = ("\n`--as-paper`: each cell is the paper's statistic recomputed from the run's own logs "
                 "(the max over its validations on the test fold, as the SVF/PFENet/BAM training scripts print, "
                 "else the best of its test seeds, as BAM's test.py prints); both let the test data pick a "
                 "maximum, so they are optimistic next to svfseg's mean over fresh test seeds. A row names the "
                 "validation episodes, seed and cadence of its runs where their config.yaml gives them. Runs whose "
                 "logs hold neither are left out.\n")
