"""compare.png of `svfseg compare`: mIoU per regime with its t-interval, and one seed's training curves."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


def plot_compare(result: dict, out: Path) -> Optional[Path]:
    """compare.png: mIoU per regime (seeds as dots, mean with its t-interval) and one seed's training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scipy.stats import t as student_t

    from svfseg.engine.runfolder import RunFolder, write_atomic
    from svfseg.engine.runlog import read_csv

    rows = result["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (regime, r) in enumerate(rows.items()):
        vals = [100 * v for v in r["per_seed_miou"].values()]
        ax.scatter([i] * len(vals), vals, color="0.6", s=12, zorder=2)
        half = 0.0
        if len(vals) > 1:
            half = float(student_t.ppf(0.975, len(vals) - 1)) * 100 * r["miou_std"] / math.sqrt(len(vals))
        ax.errorbar([i], [100 * r["miou_mean"]], yerr=[half], fmt="o", capsize=5, zorder=3)
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set_ylabel("test mIoU (%)")
    ax.set_title("mIoU per regime (95% t-interval of the mean over seeds)")
    first = result["seeds"][0]
    for c in result["cells"]:
        if c.get("seed") != first or c.get("status") != "finished":
            continue
        log = read_csv(RunFolder(c["run_dir"]).train_log, ("step", "loss"))
        if log:
            bx.plot([int(x["step"]) for x in log], [float(x["loss"]) for x in log],
                    label=f"{c['regime']} f{c['fold']} {c['shot']}s")
    bx.set_xlabel("step")
    bx.set_ylabel("training loss")
    bx.set_title(f"training curves, seed {first}")
    if bx.lines:
        bx.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
