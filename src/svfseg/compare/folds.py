"""The paper's layout of a compare: per shot, one row per compared regime, folds 0-3 and their mean."""
from __future__ import annotations

from svfseg.results import DASH, SeedStats, format_stats, markdown_table, seed_stats


def fold_layout(result: dict) -> dict:
    """``{shot: {row: {"folds": {fold: SeedStats | None}, "mean": SeedStats | None}}}`` from compare cells.

    A fold cell is the mean ± std over the seeds of that (row, fold, shot); the mean is the mean
    of the fold means, shown only when every fold of the plan has one (as the paper's mean of 4
    folds), with the std over the seeds present in every fold (each seed's fold-average).
    """
    final = [c for c in result.get("cells", []) if c.get("status") == "finished"
             and c.get("miou") is not None]
    out: dict = {}
    for shot in result["shots"]:
        rows: dict = {}
        for row in result["rows"]:
            per_fold = {f: {c["seed"]: 100 * c["miou"] for c in final
                            if c["regime"] == row and c["fold"] == f and c["shot"] == shot}
                        for f in result["folds"]}
            folds = {f: seed_stats(v.values()) for f, v in per_fold.items()}
            mean = None
            if all(s is not None for s in folds.values()):
                centre = sum(s.mean for s in folds.values()) / len(folds)
                common = set.intersection(*(set(v) for v in per_fold.values()))
                across = seed_stats(sum(per_fold[f][s] for f in per_fold) / len(per_fold) for s in common)
                mean = (SeedStats(centre, across.std, across.n, across.values) if across is not None and across.n > 1
                        else SeedStats(centre, 0.0, 1, (centre,)))
            rows[row] = {"folds": folds, "mean": mean}
        out[shot] = rows
    return out


def fold_layout_markdown(result: dict) -> list[str]:
    """Markdown lines: one table per shot, rows = compared regimes, columns = folds and their mean (mIoU %)."""
    layout = fold_layout(result)
    lines = ["Per fold, as the paper lays it out (mIoU %, mean ± std over seeds; the mean of the folds "
             f"needs all of {result['folds']}):", ""]
    for shot, rows in layout.items():
        head = [f"{shot}-shot"] + [f"fold {f}" for f in result["folds"]] + ["mean"]
        body = [[row] + [format_stats(s) for s in r["folds"].values()] + [format_stats(r["mean"]) if r["mean"]
                                                                         else DASH]
                for row, r in rows.items()]
        lines += [markdown_table(head, body), ""]
    return lines
