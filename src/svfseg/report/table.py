"""`svfseg report`: gather test results of several runs into the paper's table layout, paper numbers beside."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from svfseg.config.schema import flat_keys
from svfseg.engine.runfolder import RESULTS_FILE, RunFolder

from svfseg.report.paper import paper_backbone, paper_result
from svfseg.regimes import REGISTRY, regime_label
from svfseg.report.statistic import AS_PAPER_NOTE, as_paper_entries, own_statistic, paper_statistic, row_statistic
from svfseg.results import DASH, STD_NOTE, SeedStats, format_stats, group_by_seed, markdown_table, seed_stats

logger = logging.getLogger(__name__)

METHOD_NAMES = {"baseline": "baseline", "pfenet": "PFENet", "bam": "BAM"}
#: Each regime's suffix of the method name (results record ``model.regime``, e.g. "full").
REGIME_SUFFIX = {name: spec.label for name, spec in REGISTRY.items()}


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """``results.json`` files written by `svfseg test`: the paths themselves or anywhere below them."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name.endswith(".json"):
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob(RESULTS_FILE))
        else:
            raise FileNotFoundError(f"report: {p} is neither a run folder nor a results.json file")
    return found


def load_entries(files: Sequence[Path]) -> list[dict]:
    """One entry per results file: setting keys, the training seed, and the mean mIoU / FB-IoU (%) over its
    test seeds. Files written before the training seed was recorded are told apart by their run folder."""
    entries = []
    for f in files:
        try:
            r = json.loads(Path(f).read_text())
            fb = (r["summary"].get("fb_iou") or {}).get("mean")
            seed = r.get("train_seed")
            entries.append({"benchmark": r["benchmark"], "backbone": r["backbone"], "model": r["model"],
                            "regime": r["regime"], "shot": int(r["shot"]), "fold": int(r["fold"]),
                            "miou": 100 * r["summary"]["miou"]["mean"], "file": str(f),
                            "fb_iou": None if fb is None else 100 * fb, "protocol": r.get("protocol"),
                            "train_seed": seed if seed is not None else f"run {Path(r.get('checkpoint', f)).parent}",
                            "num_folds": int(r.get("num_folds", 4)), "cell": cell_identity(r, f),
                            "statistic": own_statistic(r), "paper_statistic": paper_statistic(r, Path(f))})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"report: {f} is not an `svfseg test` results.json ({e})") from None
    return entries


#: Config keys that differ between the seeds of one cell (or only say how it ran): not part of a cell.
_RUN_KEYS = {"seed", "name", "output_dir", "resume", "threads", "device", "fold", "shot", "data.root",
             "data.workers", "train.progress", "train.tensorboard", "train.stop_after_steps", "train.log_every",
             "train.val_episodes_file"}


def cell_identity(r: dict, results_file: Path) -> dict:
    """What defines the cell a result belongs to besides its table key: the training recipe (the run's
    ``config.yaml`` without seed, name and the run-only keys), the data (dataset fingerprint) and the
    episode protocol and counts. Results of another data root, budget or episode set are another cell.

    A warm start (``model.init_head``) counts by what it is, the recipe of the run that trained the head,
    not by its path: a compare's warm start is one file per fold, and the folds of one row are one cell.
    """
    ckpt = Path(r.get("checkpoint", ""))
    config = _run_recipe(RunFolder(ckpt.parent)) if r.get("checkpoint") else {}
    if config.get("model.init_head"):
        warm = _find_beside(Path(config["model.init_head"]), ckpt.parent)
        if warm is not None and RunFolder(warm.parent).config.is_file():
            config["model.init_head"] = {"warm start trained with": _run_recipe(RunFolder(warm.parent))}
    runs = r.get("runs") or []
    data = sorted({str(x.get("dataset_fingerprint")) for x in runs if x.get("dataset_fingerprint")})
    return {"recipe": config, "data": ",".join(data) or None, "protocol": r.get("protocol"),
            "episodes": ",".join(str(x.get("episodes")) for x in runs) or None}


def _run_recipe(folder: RunFolder) -> dict:
    """A run folder's ``config.yaml`` as flat keys, without the run-only keys ({} when there is none)."""
    import yaml

    try:
        return {k: v for k, v in flat_keys(yaml.safe_load(folder.config.read_text()) or {}).items()
                if k not in _RUN_KEYS}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def _find_beside(path: Path, run_dir: Path) -> Optional[Path]:
    """A file a run names (relative to where it ran): as given, else below one of the run folder's ancestors."""
    if path.is_file():
        return path
    if not path.is_absolute():
        for ancestor in run_dir.resolve().parents:
            if (ancestor / path).is_file():
                return ancestor / path
    return None


def _cell_key(e: dict) -> str:
    import json as _json

    return _json.dumps(e.get("cell") or {}, sort_keys=True, default=str)


def cell_differences(a: dict, b: dict) -> list[str]:
    """What differs between two cell identities (config keys, data, protocol, episode counts)."""
    diffs = []
    ra, rb = a.get("recipe") or {}, b.get("recipe") or {}
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k, "<absent>") != rb.get(k, "<absent>"):
            diffs.append(f"{k} {ra.get(k, '<absent>')!r} vs {rb.get(k, '<absent>')!r}")
    for k, what in (("data", "dataset fingerprint"), ("protocol", "protocol"), ("episodes", "episodes")):
        if a.get(k) != b.get(k):
            diffs.append(f"{what} {a.get(k)} vs {b.get(k)}")
    return diffs


def _seed_count(per_fold: dict) -> str:
    counts = sorted({len(seeds) for seeds in per_fold.values()})
    return DASH if not counts else (str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}")


def _fold_mean(per_fold: dict, folds: int, field: str) -> Optional[SeedStats]:
    """Mean over the folds of each fold's seed mean; the ± is the std over the seeds present in every fold."""
    if len(per_fold) != folds:
        return None
    means = [seed_stats(e.get(field) for e in per_fold[f].values()) for f in range(folds)]
    if any(m is None for m in means):
        return None
    mean = sum(m.mean for m in means) / folds
    common = set.intersection(*(set(per_fold[f]) for f in range(folds)))
    per_seed = seed_stats(sum(per_fold[f][s].get(field) for f in range(folds)) / folds
                          for s in sorted(common, key=str)
                          if all(per_fold[f][s].get(field) is not None for f in range(folds)))
    if per_seed is None or per_seed.n < 2:
        return SeedStats(mean, 0.0, 1, (mean,))
    return SeedStats(mean, per_seed.std, per_seed.n, per_seed.values)


def report_table(entries: Sequence[dict], folds: int = 4) -> str:
    """Markdown table: one row per (benchmark, backbone, method, regime); per shot the folds, their
    mean (only when every fold is present), the FB-IoU mean and the paper's mean; a fold cell shows
    ``ours / paper`` where the paper reports that fold. Each of our cells is the mean over training
    seeds, ``± std`` when there are several; the last column counts the seeds per fold."""
    folds = max([folds, *(e.get("num_folds", 4) for e in entries)])
    # Results of unrelated runs (another data root, budget, recipe or episode set) are another cell,
    # never averaged as seeds of one: a row per variant, and a note of what differs.
    variants: dict[tuple, list[str]] = {}
    for e in entries:
        row_key = (e["benchmark"], paper_backbone(e["backbone"]), e["model"], e["regime"])
        keys = variants.setdefault(row_key, [])
        if _cell_key(e) not in keys:
            keys.append(_cell_key(e))
    grouped = group_by_seed(entries, key=lambda e: (e["benchmark"], paper_backbone(e["backbone"]), e["model"],
                                                    e["regime"], _variant(variants, e), e["shot"], e["fold"]),
                            seed=lambda e: e.get("train_seed", e["file"]))
    groups: dict[tuple, dict] = {}
    for (bench, bb, model, regime, variant, shot, fold), seeds in grouped.items():
        groups.setdefault((bench, bb, model, regime, variant), {}).setdefault(shot, {})[fold] = seeds
    n_folds = {e["benchmark"]: e.get("num_folds", 4) for e in entries}
    shots = sorted({e["shot"] for e in entries} | {1, 5})
    head = ["benchmark", "backbone", "method"]
    for k in shots:
        head += [f"{k}-shot f{f}" for f in range(folds)] + [f"{k}-shot mean", f"{k}-shot FB-IoU", "paper"]
    head += ["seeds", "statistic"]
    rows = []
    for (bench, bb, model, regime, variant) in sorted(groups):
        spec, own = REGISTRY.get(regime), n_folds.get(bench, 4)
        svf = None if spec is None else spec.paper_svf  # which of the paper's rows, None: none
        row = [bench, bb, METHOD_NAMES.get(model, model) + regime_label(regime) + variant]
        all_folds: dict = {}
        for k in shots:
            per_fold = groups[(bench, bb, model, regime, variant)].get(k, {})
            all_folds.update({(k, f): v for f, v in per_fold.items()})
            for f in range(folds):
                ours = seed_stats(e["miou"] for e in per_fold[f].values()) if f in per_fold else None
                paper_f = paper_result(bench, bb, model, svf, k, fold=f) if svf is not None else None
                cell = "" if f >= own else format_stats(ours)
                row.append(cell + (f" / {paper_f:.2f}" if paper_f is not None and ours is not None else ""))
            mean, fb = _fold_mean(per_fold, own, "miou"), _fold_mean(per_fold, own, "fb_iou")
            partial = f"({len(per_fold)}/{own} folds)" if per_fold and len(per_fold) < own else DASH
            row.append(format_stats(mean) if mean is not None else partial)
            row.append(format_stats(fb) if fb is not None else partial)
            paper = paper_result(bench, bb, model, svf, k) if svf is not None else None
            row.append(format_stats(seed_stats([paper])))
        row.append(_seed_count(all_folds))
        row.append(row_statistic(e for per_seed in all_folds.values() for e in per_seed.values()))
        rows.append(row)
    note = ("\nmIoU and FB-IoU (%). Ours: per run the statistic of the last column (by default the mean over its "
            f"test seeds), then mean ± std ({STD_NOTE}) over training seeds (seeds: runs per fold). Paper: Sun et al. "
            "(NeurIPS 2022), mean of 4 folds, † protocol, each the best validation of training on the test fold (the "
            "SVF code's statistic; `--as-paper` computes it from the runs' logs); `ours / paper` where the paper "
            "reports the fold.\n")
    return markdown_table(head, rows) + "\n" + note + _variant_notes(variants, entries)


def _variant(variants: dict, e: dict) -> str:
    keys = variants[(e["benchmark"], paper_backbone(e["backbone"]), e["model"], e["regime"])]
    return "" if len(keys) == 1 else f" [{chr(ord('a') + keys.index(_cell_key(e)))}]"


def _variant_notes(variants: dict, entries: Sequence[dict]) -> str:
    """One line per row split into variants: what differs from variant [a]."""
    import json as _json

    lines = []
    for (bench, bb, model, regime), keys in sorted(variants.items()):
        if len(keys) < 2:
            continue
        first = _json.loads(keys[0])
        for i, k in enumerate(keys[1:], 1):
            diffs = cell_differences(first, _json.loads(k)) or ["an unrecorded setting"]
            lines.append(f"- {bench} {bb} {model} ({regime}) [{chr(ord('a') + i)}] differs from [a] in: "
                         + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else ""))
    if not lines:
        return ""
    return ("\nRows split into variants [a], [b], ...: results of unrelated runs are never averaged as seeds of "
            "one cell.\n" + "\n".join(lines) + "\n")


def report(paths: Sequence[str | Path], out: Optional[str | Path] = None, *, as_paper: bool = False) -> str:
    """Build the table from run folders / results files; optionally write it to ``out``.

    ``as_paper``: each cell is the paper's statistic recomputed from the run's logs (see
    :mod:`svfseg.report.statistic`) instead of svfseg's mean over test seeds.
    """
    files = find_results(paths)
    if not files:
        raise FileNotFoundError(f"report: no results.json under {list(map(str, paths))} "
                                f"(run `svfseg test --checkpoint RUN/best.pt` first)")
    text = as_paper_table(load_entries(files)) if as_paper else report_table(load_entries(files))
    if out:
        Path(out).write_text(text)
    return text


def as_paper_table(entries: Sequence[dict]) -> str:
    """The table of :func:`report_table` with the paper's statistic of each run (``--as-paper``)."""
    paper = as_paper_entries(list(entries))
    if not paper:
        raise ValueError("report --as-paper: no run has validations on the test fold (train.select_on=test_fold) "
                         "or several test seeds, so the paper's statistic cannot be computed from its logs")
    return report_table(paper) + AS_PAPER_NOTE
