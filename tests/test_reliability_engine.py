"""Faults below the CLI: run-folder lock, damaged/foreign checkpoints, ENOSPC, non-finite weights, NaN results."""
import errno
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from svfseg.data import EpisodeList
from svfseg.data.episodes import Episode
from svfseg.data.index import ClassIndex, ImageRecord
from svfseg.data.io import DataError
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.loop import fit
from svfseg.engine.state import TrainingState
from svfseg.engine.state import load_resume_state
from svfseg.engine.runlock import RunLock, RunLocked
from svfseg.engine.tasks import FewShotTask
from svfseg.engine.tasks.base import write_results
from svfseg.engine.distributed import DistInfo
from test_engine_toys import ToyFewShot, ToyTrain, toy_config

# The holder loads runlock.py alone (stdlib only), so it starts in milliseconds, not torch's seconds.
HOLD_LOCK = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("runlock", sys.argv[2])
    runlock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runlock)
    with runlock.RunLock(sys.argv[1], "svfseg train"):
        print("locked", flush=True)
        sys.stdin.read()
""")


def hold_lock(folder):
    """A second process that takes the folder's lock and keeps it until killed."""
    import svfseg.engine.runlock as runlock

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), runlock.__file__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunLocked, match=f"PID {holder.pid} on host "):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the flock
        holder.wait()
    with RunLock(tmp_path / "run") as lock:  # free at once, although the lock file is still there
        assert lock.held and (tmp_path / "run" / ".svfseg.lock").exists()
    assert not lock.held


def _fit(tmp_path, name, *extra, model=None, resume=None):
    cfg = toy_config(tmp_path, f"name={name}", "train.val_every=0", "train.epochs=2", *extra)
    torch.manual_seed(0)
    model = model or ToyFewShot()
    state = TrainingState(cfg, model, run_dir=tmp_path / name, describe=model.describe(), train_items=len(ToyTrain()),
                          resume_from=resume)
    res = fit(cfg, state, ToyTrain(), task=FewShotTask(), val=None)
    return res, model


def test_half_written_last_pt_falls_back_to_previous_and_resumes_identically(tmp_path, caplog):
    full, m_full = _fit(tmp_path, "full")
    run = tmp_path / "cut"
    _fit(tmp_path, "cut", "train.stop_after_steps=6")  # last.pt at the end of epoch 0 (step 4), then at 6
    assert ckpt.load(ckpt.previous_path(run / "last.pt"))["step"] == 4  # the file it replaced, kept
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # a crash or a full disk in an older version
    cfg = toy_config(tmp_path, "name=cut", "train.val_every=0", "train.epochs=2", "resume=true")
    with caplog.at_level(logging.WARNING):
        state = load_resume_state(cfg, run)
    assert state["step"] == 4
    assert "truncated or corrupt" in caplog.text and "last.prev.pt" in caplog.text
    assert (run / "last.damaged.pt").exists()  # kept for a look, out of the next rotation's way
    torch.manual_seed(99)
    resumed, m_res = _fit(tmp_path, "cut", model=ToyFewShot(), resume=state)
    assert resumed.status == "finished" and resumed.step == full.step
    a, b = m_full.state_dict(), m_res.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_and_foreign_files_give_one_line_never_weights_only(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(3000))
    torch.save({"w": torch.zeros(3)}, tmp_path / "good.pt")
    half = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(half[: len(half) // 2])
    import pickle

    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(ValueError("not a checkpoint")))
    for name in ("random.pt", "half.pt", "pickle.pt"):
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load(tmp_path / name)
        msg = str(e.value)
        assert name in msg and "\n" not in msg and "weights_only" not in msg, msg


def test_enospc_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(100)}, path, keep_previous=True)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device; the previous checkpoint is kept"):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(100)}, path, keep_previous=True)
    assert path.read_bytes() == before and ckpt.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no .tmp, no rotation happened


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
    with pytest.raises(ckpt.CheckpointWriteError, match=r"expected \d+ MB free on its disk, found 10 MB"):
        ckpt.save_atomic({"w": torch.zeros(4 << 20)}, tmp_path / "big.pt")  # 16 MB of tensors
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".last.pt.ab12cd.tmp").write_bytes(b"half")
    (tmp_path / ".last.pt.prev.tmp").write_bytes(b"link")
    (tmp_path / "notes.tmp").write_text("mine")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]


class Exploding(ToyFewShot):
    """A weight goes to inf at one call while the loss stays finite (tanh(inf) = 1)."""

    def __init__(self, at_call):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.zeros(()))
        self.at_call = at_call

    def forward(self, *a):
        if self.training and self.calls + 1 == self.at_call:
            with torch.no_grad():
                self.gain.fill_(float("inf"))
        out = super().forward(*a)
        return type(out)(out.logits * torch.tanh(self.gain).add(2.0), out.aux_logits) if self.training else out


def test_exploding_weights_with_finite_loss_never_replace_the_last_good_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"hold NaN/inf at step 5 .*model.gain"):
        _fit(tmp_path, "boom", "train.checkpoint_every=1", model=Exploding(at_call=5))
    state = ckpt.load(tmp_path / "boom" / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert ckpt.load(tmp_path / "boom" / "last.prev.pt")["step"] == 3


def test_non_finite_optimiser_state_is_refused(tmp_path):
    momentum = torch.tensor([1e30 * 1e30])  # overflowed to inf in float32
    blob = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {"momentum_buffer": momentum}}}}
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.state\[0\].momentum_buffer"):
        ckpt.check_finite(blob, tmp_path / "last.pt")


def test_results_json_writes_null_for_nan_and_says_why(tmp_path):
    results = {"summary": {"miou": {"mean": 0.5, "std": float("nan")}}, "per_class": [0.1, float("nan")]}
    write_results(tmp_path, results, "md", DistInfo(device=torch.device("cpu")))

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    out = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert out["summary"]["miou"]["std"] is None and out["per_class"] == [0.1, None]
    assert "summary.miou.std" in out["null_values"] and "not defined" in out["null_values"]


def test_episode_whose_class_is_absent_is_refused():
    recs = tuple(ImageRecord(f"JPEGImages/{i}.jpg", f"L/{i}.png", (50, 50), c)
                 for i, c in enumerate([{1: 900}, {1: 3000}, {2: 3000}]))
    index = ClassIndex(root=".", split="val", num_classes=20, records=recs, fingerprint="f" * 16)
    ok = Episode("JPEGImages/0.jpg", 1, ("JPEGImages/1.jpg",))
    absent = Episode("JPEGImages/2.jpg", 1, ("JPEGImages/1.jpg",))  # class 1 is not in the query at all
    make = lambda eps: EpisodeList("synthetic", "val", 0, 1, 0, "pfenet", 2048, "f" * 16, tuple(eps))  # noqa: E731
    make([ok]).check_classes_present(index)
    with pytest.raises(DataError, match=r"episode 1 \(class 1\): no pixel of the class in \['JPEGImages/2.jpg'\]"):
        make([ok, absent]).check_classes_present(index, where="eps.json")
