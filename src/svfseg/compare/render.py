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
    if result.get("adapt_rows"):
        lines += [""] + adapt_markdown(result["adapt_rows"])
    if len(result["folds"]) > 1 or len(result["shots"]) > 1:
        lines += [""] + fold_layout_markdown(result)
    return "\n".join(lines) + "\n"


def _interval_text(d) -> str:
    if d is None:
        return DASH
    if d.get("low") is None:
        return f"{pct(d['mean'], True)} [{DASH}]"
    return f"{pct(d['mean'], True)} [{pct(d['low'], True)}, {pct(d['high'], True)}]"


ADAPT_NOTE = ("Adaptation: before its query is predicted, each test episode fine-tunes what the row names on its own "
              "supports (leave-one-out pseudo-episodes; 1-shot: augmented copies), then the model is restored. Steps "
              "and lr were chosen on the first seed's base-class validation episodes (not adapting was a candidate). "
              "Two intervals pair each row with the same trained models scored without adaptation: **by episodes**, "
              "a paired bootstrap over the test episodes (2,000 resamples; it covers which episodes were drawn, the "
              "trained models fixed); **by seeds**, a paired t over training seeds (it covers the training noise; "
              "needs two seeds). A row beats no adaptation only when every interval shown is above 0.")


def adapt_markdown(rows: dict) -> list[str]:
    """compare.md's section on test-time adaptation: one row per (regime, adapt.params), then the verdicts."""
    header = ["row", f"mIoU (%) mean ± std ({STD_NOTE})", "without adaptation (%)", "Δ by episodes [95% CI]",
              "Δ by seeds [95% CI]", "chosen (first seed)", "values adapted", "s / episode (without)"]
    table = []
    for label, r in rows.items():
        secs = DASH if r["seconds_per_episode"] is None else (
            f"{r['seconds_per_episode']:.2f} ({r['plain_seconds_per_episode']:.3f})"
            if r["plain_seconds_per_episode"] is not None else f"{r['seconds_per_episode']:.2f}")
        table.append([label, f"{pct(r['miou_mean'])} ± {pct(r['miou_std'])}", pct(r["plain_miou_mean"]),
                      _interval_text(r["diff_by_episode"]), _interval_text(r["diff_by_seed"]),
                      "; ".join(f"{k}: {v}" for k, v in r["chosen"].items()),
                      f"{r['trainable']:,}" if r.get("trainable") is not None else DASH, secs])
    words = {"better": "beats no adaptation beyond every interval",
             "worse": "is worse than no adaptation beyond every interval",
             "within": "does not differ from no adaptation beyond the intervals",
             "unknown": "has no interval"}
    lines = ["## Adaptation on each episode's supports", "", ADAPT_NOTE, "", markdown_table(header, table), "",
             "Verdicts (adaptation):"]
    for label, r in rows.items():
        e = r["diff_by_episode"]
        span = "" if e is None else f": {_interval_text(e)} by episodes ({e['n']} episodes)"
        t = r["diff_by_seed"]
        if t is not None and t.get("low") is not None:
            span += f", {_interval_text(t)} by seeds ({t['n']} seeds)"
        lines.append(f"- **{label}** {words[r['verdict']]}{span}.")
    return lines


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
