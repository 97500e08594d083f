"""What the page says about a checkpoint: its recorded test score and the data it was trained on."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from svfseg.results import pct

logger = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"  # written by `svfseg demo` beside each checkpoint it copies out of a compare cell


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint's training data (from its own config) and recorded test score (from a file beside it)."""

    path: str
    regime: Optional[str] = None
    benchmark: Optional[str] = None
    data_root: Optional[str] = None
    fold: Optional[int] = None
    shot: Optional[int] = None
    merged: bool = False
    test_miou: Optional[float] = None  # fraction, 0-1
    test_fb_iou: Optional[float] = None
    test_episodes: Optional[int] = None
    score_from: Optional[str] = None  # the file the score was read from
    cell: Optional[str] = None  # the run folder a demo checkpoint was copied from
    converted_from: Optional[str] = None  # `svfseg convert`: the upstream file, its format and sha256
    problem: Optional[str] = None  # why a file beside the checkpoint could not be used
    class_names: tuple[str, ...] = ()  # its benchmark's names, indexed by class id - 1; () when unknown
    # adapt.params -> {"steps", "lr", "source"}: adaptation settings chosen on validation for this checkpoint
    # (`svfseg demo` records its adaptation stage's choices in SOURCE.json)
    adapt_choices: dict = field(default_factory=dict)

    @property
    def data_text(self) -> str:
        """``synthetic fold 0, 1-shot (data/synthetic-5i)``; "unknown training data" when nothing says."""
        if self.benchmark is None:
            return "unknown training data"
        parts = [self.benchmark] + ([f"fold {self.fold}"] if self.fold is not None else [])
        text = " ".join(parts) + (f", {self.shot}-shot" if self.shot is not None else "")
        text += f" ({self.data_root})" if self.data_root else ""
        return text + (f"; converted from {self.converted_from}" if self.converted_from else "")

    @property
    def score_text(self) -> str:
        """``test mIoU 41.0% (FB-IoU 60.0%, 1000 episodes)`` or ``no recorded test score``."""
        if self.test_miou is None:
            return "no recorded test score"
        extra = [f"FB-IoU {pct(self.test_fb_iou, digits=1, unit='%')}"] if self.test_fb_iou is not None else []
        extra += [f"{self.test_episodes} episodes"] if self.test_episodes else []
        return f"test mIoU {pct(self.test_miou, digits=1, unit='%')}" + (f" ({', '.join(extra)})" if extra else "")

    def no_object_reason(self) -> str:
        """The sentence shown when this checkpoint's prediction has no foreground."""
        if self.test_miou is None:
            return f"this checkpoint has no recorded test score (trained on {self.data_text})"
        episodes = f", {self.test_episodes} episodes" if self.test_episodes else ""
        return (f"this checkpoint scored {pct(self.test_miou, digits=1, unit='%')} mIoU on its test "
                f"({self.data_text}{episodes})")


def _fraction(value: Any, where: str, key: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 or math.isnan(value):
        raise ValueError(f"{where}: expected {key} a fraction between 0 and 1, found {value!r}")
    return float(value)


def _from_checkpoint(path: Path) -> dict:
    """Training data of a checkpoint from its stored config (tensors memory-mapped, not read)."""
    from svfseg.engine import checkpoint as ckpt
    from svfseg.engine.model import MERGED_FORMAT

    state = ckpt.peek(path)
    cfg = state.get("config") if isinstance(state, dict) else None
    if not isinstance(cfg, dict):
        return {}
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    regime = model.get("regime")
    merged = state.get("format") == MERGED_FORMAT
    source = state.get("converted_from") if isinstance(state.get("converted_from"), dict) else None
    converted = (f"{source.get('format')} `{source.get('file')}` (sha256 {str(source.get('sha256'))[:12]})"
                 if source else None)
    return {"regime": ("converted" if source else "merged export") if merged else regime,
            "benchmark": data.get("benchmark"), "data_root": data.get("root"), "fold": cfg.get("fold"),
            "shot": cfg.get("shot"), "merged": merged, "converted_from": converted}


def _from_source_json(file: Path) -> dict:
    where = str(file)
    try:
        src = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: expected a JSON object, found unreadable JSON ({e})") from None
    if not isinstance(src, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(src).__name__}")
    out = {"test_miou": _fraction(src.get("test_miou"), where, "test_miou"),
           "test_fb_iou": _fraction(src.get("test_fb_iou"), where, "test_fb_iou"),
           "test_episodes": src.get("test_episodes"), "cell": src.get("cell"), "score_from": where}
    # The demo also records the training data; it wins over the config only where it is given.
    for key in ("regime", "benchmark", "data_root", "fold", "shot"):
        if src.get(key) is not None:
            out[key] = src[key]
    choices = src.get("adapt") or {}
    if not isinstance(choices, dict) or not all(isinstance(c, dict) and isinstance(c.get("steps"), int)
                                                and (c.get("lr") is None or isinstance(c["lr"], (int, float)))
                                                for c in choices.values()):
        raise ValueError(f"{where}: expected 'adapt' to map adapt.params to {{steps, lr, source}}, found {choices!r}")
    out["adapt_choices"] = choices
    return out


def _from_results_json(checkpoint: Path) -> dict:
    # `svfseg compare` scores a cell's best.pt into test/; `svfseg test` writes test_<protocol>_<K>shot/.
    from svfseg.engine.runfolder import RunFolder

    for file in RunFolder(checkpoint.parent).results_files():
        try:
            res = json.loads(file.read_text())
            if Path(res.get("checkpoint") or checkpoint.name).name != checkpoint.name:
                continue  # e.g. a test of last.pt in the same folder
            summary, run = res.get("summary") or {}, (res.get("runs") or [{}])[0]
            miou = (summary.get("miou") or {}).get("mean", run.get("miou"))
            fb = (summary.get("fb_iou") or {}).get("mean", run.get("fb_iou"))
            episodes = sum(int(r.get("episodes") or 0) for r in res.get("runs") or []) or None
            return {"test_miou": _fraction(miou, str(file), "summary.miou.mean"),
                    "test_fb_iou": _fraction(fb, str(file), "summary.fb_iou.mean"), "test_episodes": episodes,
                    "score_from": str(file)}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            logger.warning("%s: not used for the score of %s (%s)", file, checkpoint, e)
    return {}


def _class_names(benchmark: Optional[str], root: Optional[str]) -> tuple[str, ...]:
    """The class names of a checkpoint's benchmark (a custom root's from its dataset.yaml); () when unknown."""
    if benchmark is None:
        return ()
    from svfseg.data.benchmark import Benchmark

    try:
        return tuple(Benchmark.resolve(benchmark, root or ".").class_names)
    except Exception as e:  # noqa: BLE001 - names are a convenience: the class picker falls back to ids
        logger.warning("no class names for benchmark %s at %s: %s", benchmark, root,
                       (str(e).splitlines() or [type(e).__name__])[0])
        return ()


def checkpoint_record(path: str | os.PathLike) -> CheckpointRecord:
    """Training data and recorded test score of ``path``.

    The score comes from ``SOURCE.json`` beside the checkpoint (what the demo writes), else from
    the run folder's ``test/results.json`` or ``test_*/results.json`` of the same checkpoint;
    the training data from the checkpoint's own config, the class names from its benchmark (a custom root's
    ``dataset.yaml``, relative to the working folder as training stored it). Nothing here raises: a file that cannot
    be used is named in ``problem`` (and the log), and the page says "no recorded test score".
    """
    p = Path(path)
    fields: dict[str, Any] = {}
    problems = []
    try:
        fields.update(_from_checkpoint(p))
    except Exception as e:  # noqa: BLE001 - the model loader reports a broken checkpoint at Run time
        problems.append(f"{p}: its config cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    source = p.parent / SOURCE_FILE
    try:
        fields.update(_from_source_json(source) if source.is_file() else _from_results_json(p))
    except ValueError as e:
        problems.append(str(e))
    for text in problems:
        logger.warning("%s", text)
    names = _class_names(fields.get("benchmark"), fields.get("data_root"))
    return CheckpointRecord(path=str(path), problem="; ".join(problems) or None, class_names=names, **fields)
