"""Run-folder logging: CSV files, TensorBoard scalars and the training-curve PNG."""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from svfseg.engine.runfolder import RunFolder, write_atomic

logger = logging.getLogger(__name__)

TRAIN_FIELDS = ("step", "epoch", "loss", "loss_main", "loss_aux", "lr", "steps_per_s", "elapsed_s")
VAL_FIELDS = ("step", "epoch", "on", "miou", "fb_iou", "episodes", "best")


class CsvLog:
    """Append rows to a CSV file, started anew or keeping the rows up to ``keep_through`` (a resume's step)."""

    def __init__(self, path: Path, fields: Sequence[str], keep_through: Optional[int] = None):
        self.path, self.fields = Path(path), tuple(fields)
        rows = []
        if keep_through is not None:
            rows = [r for r in read_csv(self.path) if int(r["step"]) <= keep_through]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: Mapping) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: _fmt(row.get(k)) for k in self.fields})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def read_csv(path: Path, fields: Sequence[str] = ("step",)) -> list[dict]:
    """Rows of a CSV log (strings) that have ``fields`` and a whole-number step; [] when the file is missing.

    A log another process emptied or cut mid-row (a folder cleared under a running compare) loses
    the rows it cannot give, with a warning, instead of failing whoever reads it.
    """
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        logger.warning("%s: unreadable log (%s); left out", path, e)
        return []
    good = [r for r in rows if all(r.get(k) not in (None, "") for k in fields) and _whole(r.get("step"))]
    if len(good) < len(rows):
        logger.warning("%s: %d of %d rows lack %s; left out", path, len(rows) - len(good), len(rows), list(fields))
    return good


def _whole(text: Optional[str]) -> bool:
    try:
        int(text)
        return True
    except (TypeError, ValueError):
        return False


class RunLogger:
    """CSV logs (+ TensorBoard when enabled) of one training run, on the main process only.

    Args:
        run_dir: the run folder.
        keep_through: a resumed run's step (``engine.state.Resume.log_rows_through``): later rows are
            dropped; None: the logs start anew.
        tensorboard: also write TensorBoard event files under the folder's ``tb``.
    """

    def __init__(self, run_dir: str | os.PathLike | RunFolder, keep_through: Optional[int] = None,
                 tensorboard: bool = True):
        folder = RunFolder(run_dir)
        self.run_dir = folder.path
        self.train = CsvLog(folder.train_log, TRAIN_FIELDS, keep_through)
        self.val = CsvLog(folder.val_log, VAL_FIELDS, keep_through)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder.tensorboard), purge_step=keep_through)
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


def plot_curves(run_dir: str | os.PathLike | RunFolder, out: Optional[Path] = None) -> Optional[Path]:
    """Loss, learning rate and validation scores against the step, as a PNG (matplotlib Agg).

    A missing, empty or damaged log plots what it can give (rows without the columns are left out).

    Returns:
        The PNG path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = RunFolder(run_dir)
    train = read_csv(folder.train_log, ("step", "loss", "loss_main", "lr"))
    val = read_csv(folder.val_log, ("step", "on", "miou", "fb_iou"))
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
    out = Path(out) if out else folder.curves
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return out
