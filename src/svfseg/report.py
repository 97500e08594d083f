"""`svfseg report`: gather test results of several runs into the paper's table layout, paper numbers beside."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

from svfseg.paper_results import paper_backbone, paper_result

logger = logging.getLogger(__name__)

METHOD_NAMES = {"baseline": "baseline", "pfenet": "PFENet", "bam": "BAM"}
REGIME_SUFFIX = {"svf": " + SVF", "frozen": "", "train": " (full fine-tune)"}


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """``results.json`` files written by `svfseg test`: the paths themselves or anywhere below them."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name.endswith(".json"):
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("results.json"))
        else:
            raise FileNotFoundError(f"report: {p} is neither a run folder nor a results.json file")
    return found


def load_entries(files: Sequence[Path]) -> list[dict]:
    """One entry per results file: setting keys plus the mean mIoU (%) over its seeds."""
    entries = []
    for f in files:
        try:
            r = json.loads(Path(f).read_text())
            entries.append({"benchmark": r["benchmark"], "backbone": r["backbone"], "model": r["model"],
                            "regime": r["regime"], "shot": int(r["shot"]), "fold": int(r["fold"]),
                            "miou": 100 * r["summary"]["miou"]["mean"], "file": str(f),
                            "protocol": r.get("protocol")})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"report: {f} is not an `svfseg test` results.json ({e})") from None
    return entries


def _cell(v: Optional[float]) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def report_table(entries: Sequence[dict], folds: int = 4) -> str:
    """Markdown table: one row per (benchmark, backbone, method, regime); per shot the folds, their
    mean (only when every fold is present) and the paper's mean; a fold cell shows ``ours / paper``
    where the paper reports that fold."""
    groups: dict[tuple, dict] = {}
    for e in entries:
        key = (e["benchmark"], paper_backbone(e["backbone"]), e["model"], e["regime"])
        slot = groups.setdefault(key, {}).setdefault(e["shot"], {})
        if e["fold"] in slot:
            logger.warning("report: two results for %s %d-shot fold %d; using %s", key, e["shot"], e["fold"], e["file"])
        slot[e["fold"]] = e["miou"]
    shots = sorted({e["shot"] for e in entries} | {1, 5})
    head = ["benchmark", "backbone", "method"]
    for k in shots:
        head += [f"{k}-shot f{f}" for f in range(folds)] + [f"{k}-shot mean", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (bench, bb, model, regime) in sorted(groups):
        svf = regime == "svf"
        row = [bench, bb, METHOD_NAMES.get(model, model) + REGIME_SUFFIX.get(regime, f" ({regime})")]
        for k in shots:
            vals = groups[(bench, bb, model, regime)].get(k, {})
            for f in range(folds):
                ours = vals.get(f)
                paper_f = paper_result(bench, bb, model, svf, k, fold=f) if regime in ("svf", "frozen") else None
                row.append(_cell(ours) + (f" / {paper_f:.2f}" if paper_f is not None and ours is not None else ""))
            mean = sum(vals.values()) / folds if len(vals) == folds else None
            row.append(_cell(mean) if mean is not None else (f"({len(vals)}/{folds} folds)" if vals else "–"))
            paper = paper_result(bench, bb, model, svf, k) if regime in ("svf", "frozen") else None
            row.append(_cell(paper))
        lines.append("| " + " | ".join(row) + " |")
    note = ("\nmIoU (%). Ours: mean over the test seeds of each run. Paper: Sun et al. (NeurIPS 2022), mean of "
            "4 folds, † protocol; `ours / paper` where the paper reports the fold.\n")
    return "\n".join(lines) + "\n" + note


def report(paths: Sequence[str | Path], out: Optional[str | Path] = None) -> str:
    """Build the table from run folders / results files; optionally write it to ``out``."""
    files = find_results(paths)
    if not files:
        raise FileNotFoundError(f"report: no results.json under {list(map(str, paths))} "
                                f"(run `svfseg test --checkpoint RUN/best.pt` first)")
    text = report_table(load_entries(files))
    if out:
        Path(out).write_text(text)
    return text
