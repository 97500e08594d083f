"""engine/runfolder.py: the one owner of a run folder's file names, its status, clearing and locking it."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import svfseg
from svfseg.engine import runfolder
from svfseg.engine.runfolder import (DIVERGED, FINISHED, FRESH, RESUMABLE, SCORED, RunFolder, write_atomic,
                                     write_text_atomic)
from svfseg.engine.runlock import RunLocked

SRC = Path(svfseg.__file__).resolve().parent


def _summary(folder: RunFolder, status: str) -> None:
    folder.summary.write_text(json.dumps({"status": status, "step": 2}))


def test_status_from_fresh_to_scored_and_diverged_wins(tmp_path):
    f = RunFolder(tmp_path / "run")
    assert f.status() == FRESH and f.present() == [] and f.read_summary() is None  # not even a folder
    f.path.mkdir()
    f.config.write_text("seed: 0\n")
    assert f.status() == FRESH  # files, but nothing to continue
    f.previous.write_text("x")
    assert f.status() == RESUMABLE  # the fallback of a resume counts (last.pt damaged and moved aside)
    f.last.write_text("x")
    _summary(f, "interrupted")
    assert f.status() == RESUMABLE
    _summary(f, "finished")
    assert f.status() == FINISHED
    f.test_dir().mkdir()
    f.results().write_text("{}")
    assert f.status() == SCORED and f.results_files() == [f.results()]
    f.mark_diverged("loss is nan at step 3")
    assert f.status() == DIVERGED and f.diverged_reason() == "loss is nan at step 3"
    f.summary.write_text("{half a fi")  # unreadable: not finished
    f.diverged_marker.unlink()
    assert f.read_summary() is None and f.status() == RESUMABLE


def test_clear_removes_the_run_and_keeps_what_is_not_its_own(tmp_path):
    f = RunFolder(tmp_path)
    for p in (f.last, f.best, f.config, f.meta, f.summary, f.train_log, f.val_episodes("test_fold"), f.cell_record):
        p.write_text("x")
    f.tensorboard.mkdir()
    (f.tensorboard / "events").write_text("x")
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    with f.lock("svfseg test"):
        removed = f.clear()
    assert {p.name for p in removed} == {"last.pt", "best.pt", "config.yaml", "meta.json", "train_summary.json",
                                         "train_log.csv", "val_episodes_test_fold.json", "compare_cell.json", "tb"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".svfseg.lock", "notes.txt"] and f.present() == []


def test_owns_only_the_files_of_a_run_in_its_folder(tmp_path):
    f = RunFolder(tmp_path / "run")
    f.path.mkdir()
    assert not f.owns(f.last)  # an empty folder holds no run yet
    f.best.write_text("x")
    assert f.owns(f.last) and f.owns(f.path / "val_episodes_base_heldout.json")
    assert not f.owns(f.path / "merged.pt") and not f.owns(tmp_path / "last.pt")


def test_the_lock_is_the_folders_and_refuses_a_second_holder(tmp_path):
    f = RunFolder(tmp_path / "run")
    with f.lock("svfseg train") as held:
        assert held.held and f.lock_file.exists() and held.run_dir == f.path
        with pytest.raises(RunLocked, match="in use by svfseg train"):
            f.lock().acquire()  # another open of the lock file: refused at once


def test_atomic_writes_leave_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_text_atomic(target, "old")

    def fails(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_module_but_the_run_folder_names_a_run_file():
    """A run file's name as a whole string literal (what one joins to a folder) appears in runfolder.py only;
    messages and docstrings that mention a name inside a sentence are not literals of it."""
    names = set(runfolder._FILES.values()) | {runfolder.RESULTS_FILE, runfolder.RESULTS_MARKDOWN}
    hits = [f"{p.relative_to(SRC)}:{line} {value!r}" for p in sorted(SRC.rglob("*.py")) if p.name != "runfolder.py"
            for line, value in _string_constants(p) if value in names]
    assert hits == []


def test_the_name_check_sees_a_literal(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('from pathlib import Path\np = Path("run") / "last.pt"\n"""the last.pt of a run"""\n')
    assert [v for _, v in _string_constants(f) if v in runfolder._FILES.values()] == ["last.pt"]
