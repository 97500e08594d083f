"""Issue 22, items 1-14: faults at the seams between commands, each reproduced through the CLI first."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_SIZE, tiny_run_args
from svfseg.cli import main


def tiny(root, out, name, *extra):
    # frozen backbone, no validation: the cheapest run that writes every file of a run folder
    return tiny_run_args(root, out, name, "train.tensorboard=false", "train.val_every=0", "model.regime=frozen",
                         "train.epochs=1", *extra)


def error_line(capsys, command):
    """The CLI's error: exactly one line on stderr after any log lines, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"svfseg {command}: error: "), err
    return last


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """Two finished tiny runs: ``frozen`` and ``svf`` (mergeable)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *tiny(data_root, out, "frozen")]) == 0
    assert main(["train", *tiny(data_root, out, "svf", "model.regime=svf", "svf.stages=[layer2]")]) == 0
    return out


def _copy(run, tmp_path, name="copy"):
    return shutil.copytree(run, tmp_path / name)


# ---------------------------------------------------------------- item 1: merge --out


def test_merge_refuses_an_existing_out_and_never_writes_onto_the_runs_files(runs, tmp_path, capsys):
    run = _copy(runs / "svf", tmp_path)
    last = (run / "last.pt").read_bytes()
    assert main(["merge", "--checkpoint", str(run / "best.pt"), "--out", str(run / "last.pt")]) == 1
    assert "last.pt" in error_line(capsys, "merge") and (run / "last.pt").read_bytes() == last
    # not even with --overwrite: the run's resumable state is not an output
    assert main(["merge", "--checkpoint", str(run / "best.pt"), "--out", str(run / "last.pt"), "--overwrite"]) == 1
    assert "belongs to the run" in error_line(capsys, "merge") and (run / "last.pt").read_bytes() == last
    other = tmp_path / "merged.pt"
    other.write_bytes(b"keep me")
    assert main(["merge", "--checkpoint", str(run / "best.pt"), "--out", str(other)]) == 1
    assert "--overwrite" in error_line(capsys, "merge") and other.read_bytes() == b"keep me"
    assert main(["merge", "--checkpoint", str(run / "best.pt"), "--out", str(other), "--overwrite"]) == 0
    assert other.read_bytes() != b"keep me"


# ---------------------------------------------------------------- item 2: a finished run without last.pt


def test_train_refuses_a_run_folder_with_run_files_even_without_last_pt(data_root, runs, tmp_path, capsys):
    run = _copy(runs / "frozen", tmp_path, "done")
    (run / "last.pt").unlink()
    (run / "last.prev.pt").unlink(missing_ok=True)
    (run / "test").mkdir()
    (run / "test" / "results.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".svfseg.lock"}
    assert main(["train", *tiny(data_root, tmp_path, "done", "model.regime=svf", "svf.stages=[layer2]")]) == 1
    line = error_line(capsys, "train")
    assert "already holds" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".svfseg.lock"} == before
    # --overwrite starts afresh: the old run's files (its test results too) are gone
    assert main(["train", "--overwrite", *tiny(data_root, tmp_path, "done", "model.regime=svf",
                                                "svf.stages=[layer2]")]) == 0
    assert not (run / "test").exists()
    assert "regime: svf" in (run / "config.yaml").read_text()


# ---------------------------------------------------------------- item 5: ENOSPC inside torch's zip writer


def test_a_zip_writer_failure_mid_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    from svfseg.engine import checkpoint as ckpt

    path = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch raises when the disk fills during its zip write
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1600 vs 1536")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"cannot write checkpoint .*last\.pt.*previous checkpoint "
                                                          r"is kept"):
        ckpt.save_atomic({"model": {"w": torch.zeros(3)}}, path, keep_previous=True)
    assert path.read_bytes() == good and not list(tmp_path.glob(".*.tmp"))


def test_a_real_short_write_is_caught_too(tmp_path, monkeypatch):
    # torch's zip writer turns an OSError of the file object into its RuntimeError
    import errno

    from svfseg.engine import checkpoint as ckpt

    path = tmp_path / "last.pt"
    real_fdopen = ckpt.os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(ckpt.CheckpointWriteError, match="previous checkpoint is kept"):
        ckpt.save_atomic({"model": {"w": torch.ones(10000)}}, path)
    assert not path.exists()


# ---------------------------------------------------------------- item 7: NaN/inf weights


def test_test_predict_and_merge_refuse_a_checkpoint_with_nan_weights(runs, tmp_path, capsys):
    run = _copy(runs / "svf", tmp_path)
    state = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][key][0] = float("nan")
    torch.save(state, run / "best.pt")
    img = tmp_path / "q.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(img)
    mask = tmp_path / "m.png"
    Image.fromarray(np.pad(np.full((20, 20), 255, np.uint8), 10)).save(mask)
    eps = tmp_path / "eps.json"
    assert main(["episodes", "--config", str(run / "config.yaml"), "--count", "2", "--out", str(eps)]) == 0
    for argv in (["test", "--checkpoint", str(run / "best.pt"), "--episodes", str(eps)],
                 ["predict", "--checkpoint", str(run / "best.pt"), "--support", str(img), str(mask), "--query",
                  str(img), "--out", str(tmp_path / "pred")],
                 ["merge", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "m.pt")]):
        assert main(argv) == 1, argv
        line = error_line(capsys, argv[0])
        assert "NaN/inf" in line and key in line and "best.pt" in line, line
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "pred").exists()


# ---------------------------------------------------------------- item 3: compare reruns with other settings


def _compare(root, out, *extra):
    from test_compare import RECIPE

    options = [x for x in extra if x.startswith("--") or x.isdigit()]
    return ["compare", "--config", str(RECIPE), "--regimes", "frozen", "--seeds", "0", "--out", str(out),
            "--val-episodes", "4", *options, f"data.root={root}", f"data.train_crop={TINY_SIZE}",
            f"data.test_size={TINY_SIZE}", "train.batch_size=2", "train.progress=false", "train.epochs=1",
            *[x for x in extra if x not in options]]


def test_compare_rerun_with_other_settings_is_refused_or_forced(data_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    cell = out / "runs" / "fold0_1shot" / "frozen_seed0"
    assert main(_compare(data_root, out, "--test-episodes", "4", "train.steps_per_epoch=2")) == 0
    # other steps: refused, naming the key; nothing of the cell changes
    summary = (cell / "train_summary.json").read_bytes()
    assert main(_compare(data_root, out, "--test-episodes", "4", "train.steps_per_epoch=3")) == 1
    line = error_line(capsys, "compare")
    assert "train.steps_per_epoch: was 2, now 3" in line and "--force" in line
    assert (cell / "train_summary.json").read_bytes() == summary
    # other test episodes: refused too
    assert main(_compare(data_root, out, "--test-episodes", "6", "train.steps_per_epoch=2")) == 1
    assert "--test-episodes 6" in error_line(capsys, "compare")
    # --force: the cell is retrained with the new steps and scored on the new episodes
    assert main(_compare(data_root, out, "--test-episodes", "6", "train.steps_per_epoch=3", "--force")) == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["cells"][0]["episodes"] == 6
    assert json.loads((cell / "train_summary.json").read_text())["step"] == 3
    # the same settings again: skipped, no refusal
    assert main(_compare(data_root, out, "--test-episodes", "6", "train.steps_per_epoch=3")) == 0
