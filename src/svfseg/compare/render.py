"""compare.md of `svfseg compare`: the interval table (through ``svfseg.results``) and one verdict per regime."""

from __future__ import annotations

from pathlib import Path

from svfseg.compare.folds import fold_layout_markdown
from svfseg.results import DASH, STD_NOTE, markdown_table, pct, size_text


def verdict_sentence(regime: str, row: dict, reference: str) -> str:
    """One sentence: does ``regime`` beat the reference beyond the 95% interval?"""
    d = row["diff_to_reference"]
    if d is None:
        return f"- **{regime}**: no interval (needs at least two seeds)."
    span = (f"{pct(d['mean'], True)} mIoU points, 95% CI [{pct(d['low'], True)}, {pct(d['high'], True)}] "
            f"(half-width {pct((d['high'] - d['low']) / 2)})") \
        if d["low"] is not None else f"{pct(d['mean'], True)} mIoU points from one seed, no interval"
    text = {"better": f"beats {reference} beyond the interval",
            "worse": f"is worse than {reference} beyond the interval",
            "within": f"does not differ from {reference} beyond the interval (the difference is within noise)",
            "unknown": f"cannot be compared with {reference} from one seed"}[row["verdict"]]
    return f"- **{regime}** {text}: {span} over {d['n']} seed(s)."


def compare_markdown(result: dict) -> str:
    """The Markdown of ``compare.json``: the table, then one verdict sentence per regime."""
    ref = result["reference"]
    lines = [f"# compare: {', '.join(result['regimes'])} (reference {ref})", "",
             f"`{result['config']}`, folds {result['folds']}, shots {result['shots']}, seeds {result['seeds']}; "
             f"every cell scored on the same test episodes per (fold, shot). Interval: {result['interval']} "
             f"(paired by seed; fold/shot-averaged first); std is the sample std over seeds (n-1).", "",
             *_warm_start_lines(result)]
    header = ["regime", f"mIoU (%) mean ± std ({STD_NOTE})", "per-seed mIoU (%)", "FB-IoU (%)",
              f"Δ mIoU vs {ref} [95% CI]", "trainable (backbone)", "adapter file", "backbone lr x", "train s/step",
              "peak mem", "SV/weight movement"]
    rows = []
    for regime, r in result["rows"].items():
        d = r["diff_to_reference"]
        diff = DASH if d is None else (f"{pct(d['mean'], True)} [{pct(d['low'], True)}, {pct(d['high'], True)}]"
                                       if d["low"] is not None else f"{pct(d['mean'], True)} [{DASH}]")
        tr = r["trainable"] or {}
        move = pct(r["movement_max_stage_mean"], unit="%")
        lr = DASH if r["lr_mult"] is None else f"{r['lr_mult']:g}"
        mem = DASH if not r["peak_memory_bytes"] else f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"
        per_seed = ", ".join(pct(v) for v in r["per_seed_miou"].values()) or DASH
        rows.append([regime, f"{pct(r['miou_mean'])} ± {pct(r['miou_std'])}", per_seed, pct(r["fb_iou_mean"]), diff,
                     f"{tr.get('total', 0):,} ({tr.get('backbone', 0):,})", size_text(r["adapter_bytes"]), lr,
                     f"{r['seconds_per_step']:.2f}", mem, move])
    lines.append(markdown_table(header, rows))
    lines += ["", "Movement: the most-moved stage's mean relative change of what trained (singular values: "
              "|S-S0|/|S0| per value; other tensors ||p-p0||/||p0||).", ""]
    if result["sweeps"]:
        lines.append("Backbone lr multiplier chosen on base-class validation episodes (first seed):")
        for k, v in result["sweeps"].items():
            lines.append(f"- {k}: val mIoU " + ", ".join(_trial_text(m, s, v) for m, s in v["val_miou"].items())
                         + f" -> x{v['chosen']:g}")
        lines.append("")
    lines.append("Verdicts:")
    for regime, r in result["rows"].items():
        if regime != ref:
            lines.append(verdict_sentence(regime, r, ref))
    if result.get("diverged"):
        lines += ["", f"{len(result['diverged'])} cell(s) diverged (non-finite loss): "
                  + ", ".join(Path(c["run_dir"]).name for c in result["diverged"])]
    if result["incomplete"]:
        lines += ["", f"{len(result['incomplete'])} cell(s) did not finish; rerun the same command to resume them."]
    if len(result["folds"]) > 1 or len(result["shots"]) > 1:
        lines += [""] + fold_layout_markdown(result)
    return "\n".join(lines) + "\n"


def _trial_text(mult: str, val_miou, sweep: dict) -> str:
    """``x10: 45.20``, or ``x100: diverged (loss is nan (...) at step 9)`` (the first clause of its diverged.txt)."""
    why = (sweep.get("diverged") or {}).get(mult)  # an older compare.json has no "diverged"
    return f"x{mult}: diverged ({why.split(';')[0].strip()})" if why is not None else f"x{mult}: {pct(val_miou)}"


def _warm_start_lines(result: dict) -> list[str]:
    """What compare.md says about a shared warm start (nothing without one)."""
    warm = result.get("warm_start") or []
    if not warm:
        return []
    w = warm[0]
    return [f"Warm start: every cell started from one shared head, trained {w['steps']} steps with the frozen "
            f"backbone (seed {w['seed']}, per fold and shot; linear probe then fine-tune, Kumar et al. 2022); each "
            f"cell then trained its own steps from there, so the seeds vary only that fine-tuning.", ""]
