"""One `svfseg compare` cell: trained, skipped or resumed, then scored; what it was made with (``compare_cell.json``),
and refusing to reuse a cell whose settings changed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from svfseg.config.schema import flat_keys
from svfseg.engine.runfolder import DIVERGED, FINISHED, SCORED, RunFolder, write_json_atomic

logger = logging.getLogger(__name__)


class CellSettingsChanged(ValueError):
    """A cell folder was made by an earlier compare with other settings (rerun with ``--force``)."""


#: Config keys that do not change what a cell computes (how it is run, shown or interrupted).
_QUIET_KEYS = ("resume", "threads", "device", "train.progress", "train.stop_after_steps", "train.tensorboard",
               "train.log_every", "data.workers")
#: Config sections that do not change what a cell trains or its plain test score (adaptation is scored apart).
_QUIET_SECTIONS = ("adapt.",)


def _quiet(key: str) -> bool:
    return key in _QUIET_KEYS or key.startswith(_QUIET_SECTIONS)


def cell_settings(cfg, episodes: Optional[Path]) -> dict:
    """What made a cell: its config (flat keys, the quiet ones left out) and its test episode file."""
    from svfseg.config import to_dict

    flat = {k: v for k, v in flat_keys(to_dict(cfg)).items() if not _quiet(k)}
    out = {"config": json.loads(json.dumps(flat))}  # tuples as lists, as they read back
    init_head = getattr(cfg.model, "init_head", None)
    head_record = RunFolder(Path(init_head).parent).cell_record if init_head else None
    if head_record is not None and head_record.exists():
        # a cell started from a shared warm start is another cell when that head was made otherwise
        out["init_head"] = json.loads(head_record.read_text()).get("config")
    if episodes is not None:
        blob = json.loads(Path(episodes).read_text())
        out["test_episodes"] = {"fingerprint": blob.get("fingerprint"), "count": len(blob.get("episodes", []))}
    return out


def _recorded_settings(folder: RunFolder) -> Optional[dict]:
    """The settings a cell folder records (``compare_cell.json``; else its ``config.yaml``), None when new."""
    import yaml

    if folder.cell_record.exists():
        return json.loads(folder.cell_record.read_text())
    if folder.config.exists():  # a cell made before the record, or one still training
        flat = flat_keys(yaml.safe_load(folder.config.read_text()) or {})
        return {"config": json.loads(json.dumps({k: v for k, v in flat.items() if not _quiet(k)}))}
    return None


def settings_differences(have: dict, want: dict) -> list[str]:
    """``key: was X, now Y`` for every setting that differs (test episodes only where both record them)."""
    from svfseg.config import ExperimentConfig, to_dict

    # a key an older svfseg did not write yet had its default value then
    defaults = json.loads(json.dumps(flat_keys(to_dict(ExperimentConfig()))))
    a = {**{k: v for k, v in defaults.items() if k in want.get("config", {})}, **have.get("config", {})}
    b = want.get("config", {})
    diffs = [f"{k}: was {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    if "init_head" in have and "init_head" in want and have["init_head"] != want["init_head"]:
        diffs.append("the shared warm start (--warm-start) it started from")
    if "test_episodes" in have and "test_episodes" in want and have["test_episodes"] != want["test_episodes"]:
        diffs.append(f"test episodes: was {have['test_episodes']}, now {want['test_episodes']}")
    return diffs


def _check_episode_count(path: Path, count: int, option: str, force: bool) -> None:
    """Refuse (``force``: delete, to be remade) an episode file of ``out`` made with another count."""
    if not path.exists():
        return
    have = len(json.loads(path.read_text()).get("episodes", []))
    if have == count:
        return
    if not force:
        raise CellSettingsChanged(f"{path}: holds {have} episodes from an earlier compare into this --out, "
                                  f"this one asks {option} {count}; rerun with --force to remake it and redo the "
                                  f"cells, or use another --out")
    logger.warning("compare --force: %s held %d episodes, remaking it with %d", path, have, count)
    path.unlink()


def _check_cell_settings(cfg, episodes: Optional[Path], force: bool) -> Optional[str]:
    """What ``force`` must redo in a cell made with other settings: "retrain", "rescore" (only the test
    episodes differ) or None; without ``force`` any difference is refused."""
    run_dir = cfg.run_dir()
    have = _recorded_settings(RunFolder(run_dir))
    if have is None:
        return None
    want = cell_settings(cfg, episodes)
    diffs = settings_differences(have, want)
    if not diffs:
        return None
    if not force:
        raise CellSettingsChanged(f"{run_dir}: made by an earlier compare with other settings ("
                                  + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
                                  + "); rerun with --force to retrain such cells, or use another --out")
    retrain = settings_differences({k: v for k, v in have.items() if k != "test_episodes"},
                                   {k: v for k, v in want.items() if k != "test_episodes"})
    redo = "retrain" if retrain else "rescore"
    logger.warning("compare --force: %s was made with other settings (%s); %s", run_dir, "; ".join(diffs[:3]),
                   "retraining it" if redo == "retrain" else "scoring it again")
    return redo


def _write_cell_record(run_dir: Path | RunFolder, settings: dict) -> None:
    """``compare_cell.json``: the settings of a finished (and scored) cell, for the next rerun's check."""
    folder = RunFolder(run_dir)
    old = json.loads(folder.cell_record.read_text()) if folder.cell_record.exists() else {}
    if "test_episodes" not in settings and "test_episodes" in old:
        settings = {**settings, "test_episodes": old["test_episodes"]}  # a sweep trial chosen later keeps it
    write_json_atomic(folder.cell_record, settings)


class CellInterrupted(RuntimeError):
    """A cell stopped on Ctrl-C/SIGTERM: the compare stops too (a rerun resumes that cell)."""


def run_cell(cfg, episodes: Optional[Path], force: bool = False) -> dict:
    """Train (or skip / resume) one cell and score it on ``episodes``; its record for ``compare.json``.

    The cell's folder is locked first, before anything in it is read to decide or cleared. A
    finished cell (``train_summary.json`` says finished) is not retrained, and not rescored when
    ``test/results.json`` exists; a resumable cell (a ``last.pt``, no finished summary) is resumed.
    ``episodes`` None: train only (a sweep trial that was not chosen is never tested). A cell
    folder made with other settings (config keys, test episodes; ``compare_cell.json``) is refused
    with the differing keys, or with ``force`` cleared and retrained.
    """
    folder = RunFolder(cfg.run_dir())
    if force and cfg.train.val_episodes_file:
        _check_episode_count(Path(cfg.train.val_episodes_file), cfg.train.val_episodes, "--val-episodes", True)
    with folder.lock("svfseg compare (cell)") as lock:
        return _run_locked_cell(cfg, folder, lock, episodes, force)


def _run_locked_cell(cfg, folder: RunFolder, lock, episodes: Optional[Path], force: bool) -> dict:
    from svfseg.engine.checkpoint import NonFiniteWeights
    from svfseg.engine.loop import NonFiniteLoss
    from svfseg.engine.run import train_run
    from svfseg.engine.state import resume_if_resumable
    from svfseg.engine.tasks import TestOptions
    from svfseg.engine.testing import score_with_task

    run_dir = str(folder.path)
    redo = _check_cell_settings(cfg, episodes, force)
    if redo == "retrain":
        folder.clear()
    elif redo == "rescore":
        shutil.rmtree(folder.test_dir(), ignore_errors=True)
    status = folder.status()
    if status == DIVERGED:
        return {"run_dir": run_dir, "status": "diverged"}
    if status not in (FINISHED, SCORED):
        resume_if_resumable(cfg, folder)
        try:
            # without a last.pt, whatever the cell folder holds is from an attempt that never
            # checkpointed: start it afresh
            result = train_run(cfg, argv=["svfseg", "compare"], overwrite=not cfg.resume, lock=lock)
        except (NonFiniteLoss, NonFiniteWeights) as e:
            # A diverged cell (e.g. the largest lr of a sweep: a NaN loss, or inf weights that a
            # finite loss did not show yet) is a result, not a crash; the marker keeps a rerun from
            # training it again.
            logger.warning("compare: %s diverged: %s", run_dir, e)
            folder.mark_diverged(str(e))
            return {"run_dir": run_dir, "status": "diverged"}
        if result.status != "finished":
            if cfg.train.stop_after_steps is None:  # a signal, not the planned stop of a test
                raise CellInterrupted(f"{run_dir} stopped at step {result.step}; rerun the same command to resume")
            return {"run_dir": run_dir, "status": result.status}
    summary = folder.read_summary() or {}
    fp = summary.get("footprint") or {}
    steps = max(summary.get("step") or 0, 1)
    rec = {"run_dir": run_dir, "status": "finished",
           "val_miou": (summary.get("best") or {}).get("miou"), "train_seconds": summary.get("seconds"),
           "seconds_per_step": (summary.get("seconds") or 0) / steps,
           "trainable": fp.get("trainable"), "adapter_bytes": (fp.get("adapter") or {}).get("bytes"),
           "peak_memory_bytes": fp.get("peak_memory_bytes"), "movement": fp.get("movement"),
           "movement_max_stage_mean": fp.get("movement_max_stage_mean"),
           "gradient_scale_step1": fp.get("gradient_scale_step1")}
    if episodes is None:
        _write_cell_record(folder, cell_settings(cfg, None))
        return rec
    results_path = folder.results()
    if status != SCORED or "per_episode" not in json.loads(results_path.read_text())["runs"][0]:
        # the same entry as `svfseg test`: the task the model's recipe scores it with; each episode's counts are
        # kept for the paired bootstraps of the adaptation rows (results from before them are scored again)
        score_with_task(folder.best, cfg, options=TestOptions(episodes=episodes, out_dir=folder.test_dir(),
                                                              per_episode=True))
    run = json.loads(results_path.read_text())["runs"][0]
    rec.update(miou=run["miou"], fb_iou=run["fb_iou"], episodes=run["episodes"],
               episode_fingerprint=run["episode_fingerprint"], test_seconds=run["seconds"],
               results=str(results_path))
    _write_cell_record(folder, cell_settings(cfg, episodes))
    return rec
