"""Run-folder logging: CSV files, TensorBoard scalars and the training-curve PNG."""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

TRAIN_FIELDS = ("step", "epoch", "loss", "loss_main", "loss_aux", "lr", "steps_per_s", "elapsed_s")
VAL_FIELDS = ("step", "epoch", "on", "miou", "fb_iou", "episodes", "best")


class CsvLog:
    """Append rows to a CSV file; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: Optional[int] = None):
        self.path, self.fields = Path(path), tuple(fields)
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: Mapping) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: _fmt(row.get(k)) for k in self.fields})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV log (strings)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLogger:
    """CSV logs (+ TensorBoard when enabled) of one training run, on the main process only.

    Args:
        run_dir: the run folder.
        resume_step: step of the checkpoint a resumed run continues from (later rows are dropped).
        tensorboard: also write TensorBoard event files under ``run_dir/tb``.
    """

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.train = CsvLog(self.run_dir / "train_log.csv", TRAIN_FIELDS, resume_step)
        self.val = CsvLog(self.run_dir / "val_log.csv", VAL_FIELDS, resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)
            except ImportError as e:  # tensorboard is a dependency, but keep training if it is broken
                logger.warning("TensorBoard logging off: %s", e)

    def log_train(self, row: Mapping) -> None:
        self.train.write(row)
        if self.tb is not None:
            for k in ("loss", "loss_main", "loss_aux", "lr", "steps_per_s"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def log_val(self, row: Mapping) -> None:
        self.val.write(row)
        if self.tb is not None:
            for k in ("miou", "fb_iou"):
                self.tb.add_scalar(f"val_{row['on']}/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class LogWindow:
    """The steps since the last CSV row: summed losses, their count, and when the window opened.

    Its :meth:`state` travels in ``last.pt``, so the first row after a resume averages the whole
    window, the steps before the stop included.
    """

    def __init__(self, saved: Optional[Mapping] = None):
        self._open()
        if saved:
            self.loss, self.main, self.aux, self.n = saved["loss"], saved["main"], saved["aux"], saved["n"]
            self.t -= saved.get("seconds", 0.0)

    def _open(self) -> None:
        self.loss = self.main = self.aux = 0.0
        self.n, self.t = 0, time.perf_counter()

    def add(self, values: Sequence[float]) -> None:
        """One step's [loss, main, aux]."""
        self.loss += values[0]
        self.main += values[1]
        self.aux += values[2]
        self.n += 1

    def state(self) -> dict:
        """The window as plain numbers (sums, step count, seconds so far), for ``last.pt``."""
        return {"loss": self.loss, "main": self.main, "aux": self.aux, "n": self.n,
                "seconds": time.perf_counter() - self.t}

    def flush(self, step: int, epoch: int, lr: float, runlog: Optional[RunLogger], bar, t0: float) -> None:
        """Write the window's averages as one CSV row (main process) and on the progress bar; start a new one."""
        n, now = max(self.n, 1), time.perf_counter()
        row = {"step": step, "epoch": epoch, "loss": self.loss / n, "loss_main": self.main / n,
               "loss_aux": self.aux / n, "lr": lr, "steps_per_s": n / max(now - self.t, 1e-9)}
        if runlog is not None:
            row["elapsed_s"] = now - t0
            runlog.log_train(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", epoch=epoch)
        self._open()


def plot_curves(run_dir: Path, out: Optional[Path] = None) -> Optional[Path]:
    """Loss, learning rate and validation scores against the step, as a PNG (matplotlib Agg).

    Returns:
        The PNG path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = read_csv(run_dir / "train_log.csv")
    val = read_csv(run_dir / "val_log.csv")
    if not train and not val:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if train:
        steps = [int(r["step"]) for r in train]
        mk = "." if len(steps) < 30 else None
        axes[0].plot(steps, [float(r["loss"]) for r in train], marker=mk, label="total")
        axes[0].plot(steps, [float(r["loss_main"]) for r in train], marker=mk, label="main", alpha=0.7)
        axes[0].set_title("training loss")
        axes[0].legend()
        axes[1].plot(steps, [float(r["lr"]) for r in train], marker=mk)
        axes[1].set_title("base learning rate (poly)")
    for on in sorted({r["on"] for r in val}):
        rows = [r for r in val if r["on"] == on]
        xs = [int(r["step"]) for r in rows]
        axes[2].plot(xs, [100 * float(r["miou"]) for r in rows], marker="o", label=f"mIoU ({on})")
        axes[2].plot(xs, [100 * float(r["fb_iou"]) for r in rows], marker=".", ls="--", label=f"FB-IoU ({on})")
    axes[2].set_title("validation (%)")
    if val:
        axes[2].legend()
    else:
        axes[2].text(0.5, 0.5, "no validation during training", ha="center", va="center",
                     transform=axes[2].transAxes)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
