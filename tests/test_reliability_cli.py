"""Faults through the CLI: a held run folder, corrupt images, failed resumes, shared stems, one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import error_line, tiny_run_args
from svfseg.cli import main
from svfseg.data.index import build_class_index
from svfseg.data.io import DataError, read_image, read_list
from test_reliability_engine import hold_lock



def tiny(root, out, name, *extra):
    # frozen backbone, no validation: the cheapest run that writes every file of a run folder
    return tiny_run_args(root, out, name, "train.tensorboard=false", "train.val_every=0", "model.regime=frozen",
                         *extra)


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *tiny(data_root, out, "done", "train.epochs=1")]) == 0
    return out / "done"


def test_second_train_on_a_held_folder_is_refused_and_writes_nothing(data_root, finished, tmp_path, capsys):
    run = tmp_path / "same"
    holder = hold_lock(run)  # e.g. a requeued cluster job still running there
    try:
        assert main(["train", *tiny(data_root, tmp_path, "same")]) == 1
        assert f"in use by svfseg train (PID {holder.pid} on host" in error_line(capsys, "train")
        assert sorted(p.name for p in run.iterdir()) == [".svfseg.lock"]  # no config.yaml, no meta.json, no CSV
    finally:
        holder.kill()
        holder.wait()
    run = shutil.copytree(finished, tmp_path / "copy")
    holder = hold_lock(run)
    try:  # --resume takes the same lock
        before = (run / "meta.json").read_bytes()
        assert main(["train", "--resume", str(run), "train.epochs=3"]) == 1
        assert f"PID {holder.pid}" in error_line(capsys, "train")
        assert (run / "meta.json").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_truncated_jpeg_in_training_list_is_refused_with_its_path(data_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(data_root, root, ignore=shutil.ignore_patterns(".svfseg_cache"))
    image = root / read_list(root / "train.txt")[3][0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match="truncated JPEG"):
        read_image(image)
    assert main(["train", *tiny(root, tmp_path, "cut")]) == 1
    err = capsys.readouterr().err
    assert f"{image}: expected a complete image, found a truncated JPEG" in err and "Traceback" not in err
    assert not (tmp_path / "cut" / "config.yaml").exists()


def test_dataset_fingerprint_changes_when_pixels_swap(data_root, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(data_root, root, ignore=shutil.ignore_patterns(".svfseg_cache"))
    before, problems = build_class_index(root, "val", 20, progress=False)
    assert not problems
    rec = next(r for r in before.records if r.counts)
    lbl = np.array(Image.open(root / rec.label))
    fg, bg = np.argwhere(lbl == next(iter(rec.counts))), np.argwhere(lbl == 0)
    (y1, x1), (y0, x0) = fg[0], bg[0]
    lbl[y1, x1], lbl[y0, x0] = lbl[y0, x0], lbl[y1, x1]  # same counts, same size, same names
    Image.fromarray(lbl).save(root / rec.label)
    after, _ = build_class_index(root, "val", 20, progress=False)
    assert [r.counts for r in after.records] == [r.counts for r in before.records]
    assert after.fingerprint != before.fingerprint
    assert after.legacy_fingerprint == before.legacy_fingerprint  # what svfseg 0.1 saw: blind to the swap
    from svfseg.data.episodes import Episode, EpisodeList

    eps = lambda fp: EpisodeList("synthetic", "val", 0, 1, 0, "pfenet", 2048, fp, (Episode("a", 1, ("b",)),))  # noqa
    with pytest.raises(DataError, match="the images or labels differ"):
        eps(before.fingerprint).check_dataset(after.fingerprint, legacy=after.legacy_fingerprint)
    with caplog.at_level("WARNING"):  # a list svfseg 0.1 wrote still loads, with a warning
        eps(before.legacy_fingerprint).check_dataset(after.fingerprint, legacy=after.legacy_fingerprint)
    assert "did not cover file contents" in caplog.text


def test_failed_resume_leaves_config_and_meta_byte_identical(data_root, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *tiny(data_root, tmp_path, "r", "train.stop_after_steps=3")]) == 130
    config, meta = (run / "config.yaml").read_bytes(), (run / "meta.json").read_bytes()
    assert main(["train", "--resume", str(run), "model.name=baseline"]) == 1
    assert "name: checkpoint has 'pfenet', this run expects 'baseline'" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "train.epochs=1"]) == 1  # fewer steps than done: no "step 3/2"
    assert "checkpoint is at step 3, but the config gives 2 steps" in error_line(capsys, "train")
    assert (run / "config.yaml").read_bytes() == config and (run / "meta.json").read_bytes() == meta
    (run / ".last.pt.x1y2z3.tmp").write_bytes(b"left by a crash")
    assert main(["train", "--resume", str(run), "train.stop_after_steps=null"]) == 0
    assert not (run / ".last.pt.x1y2z3.tmp").exists()
    history = json.loads((run / "meta.json").read_text())
    assert [h["resume"] for h in history["history"]] == [False, True]
    assert "train.stop_after_steps=3" in history["command"]  # the first command is kept
    assert "train.stop_after_steps=null" in history["history"][1]["command"]


def _image(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


def test_predict_two_queries_with_one_stem_and_no_overwrite(finished, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _image(tmp_path / "a" / "q.jpg", 0)
    _image(tmp_path / "b" / "q.jpg", 1)
    _image(tmp_path / "s.png", 2)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(finished / "best.pt"), "--support", str(tmp_path / "s.png"),
            str(tmp_path / "m.png"), "--query", str(tmp_path / "a" / "q.jpg"), str(tmp_path / "b" / "q.jpg"),
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_q_mask.png", "a_q_overlay.png", "b_q_mask.png",
                                                     "b_q_overlay.png"]
    assert printed.count("renamed") == 2
    stamp = (out / "a_q_mask.png").stat().st_mtime_ns
    assert main(args) == 1
    assert "a_q_mask.png: output file exists (4 in all)" in error_line(capsys, "predict")
    assert (out / "a_q_mask.png").stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0


def test_predict_refuses_class_index_masks_and_bad_sizes(finished, tmp_path, capsys):
    _image(tmp_path / "s.png", 0)
    index_png = np.zeros((40, 48), np.uint8)
    index_png[5:20, 5:20] = 3
    index_png[25:35, 25:35] = 15
    index_png[0, :] = 255  # the VOC border: without the check only these pixels would be the object
    Image.fromarray(index_png).save(tmp_path / "classes.png")
    base = ["predict", "--checkpoint", str(finished / "best.pt"), "--support", str(tmp_path / "s.png"),
            str(tmp_path / "classes.png"), "--query", str(tmp_path / "s.png")]
    assert main([*base, "--out", str(tmp_path / "o1")]) == 1
    assert "found values [0, 3, 15, 255]; for a class-index PNG pick the object with --mask-class" in \
        error_line(capsys, "predict")
    assert main([*base, "--out", str(tmp_path / "o2"), "--mask-class", "3"]) == 0
    assert main([*base, "--out", str(tmp_path / "o3"), "--size", "-5"]) == 1
    assert "expected --size >= 32" in error_line(capsys, "predict")


def test_soft_edged_mask_needs_an_explicit_threshold(tmp_path):
    from svfseg.predict import PredictInputError, read_binary_mask

    soft = np.zeros((20, 20), np.uint8)
    soft[5:15, 5:15] = 255
    soft[4, 5:15] = 100  # anti-aliased edge
    soft[15, 5:15] = 180
    Image.fromarray(soft).save(tmp_path / "soft.png")
    with pytest.raises(PredictInputError, match=r"found values \[0, 100, 180, 255\]"):
        read_binary_mask(tmp_path / "soft.png")
    assert read_binary_mask(tmp_path / "soft.png", threshold=128).sum() == 110
    both = np.zeros((20, 20), np.uint8)
    both[2:6, 2:6], both[0, :] = 1, 255  # 1 = object, 255 = ignored border (VOC style)
    Image.fromarray(both).save(tmp_path / "voc.png")
    assert read_binary_mask(tmp_path / "voc.png").sum() == 16


def test_merge_of_frozen_run_or_foreign_file(finished, tmp_path, capsys):
    assert main(["merge", "--checkpoint", str(finished / "best.pt"), "--out", str(tmp_path / "m.pt")]) == 0
    assert "nothing to merge" in capsys.readouterr().out and not (tmp_path / "m.pt").exists()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")  # someone else's checkpoint
    assert main(["merge", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "m.pt")]) == 1
    assert "other.pt: expected an svfseg checkpoint" in error_line(capsys, "merge")


def test_expected_failures_are_one_line_and_debug_shows_the_traceback(data_root, finished, tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / "bad.yaml").write_text("model:\n  name: [pfenet\nfold: 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: expected valid YAML, found" in error_line(capsys, "train")
    (tmp_path / "afile").write_text("")
    assert main(["train", *tiny(data_root, tmp_path / "afile" / "runs", "x")]) == 1
    assert "afile" in error_line(capsys, "train")
    if os.geteuid() != 0:  # root writes anywhere: the file case above covers it there
        (tmp_path / "ro").mkdir(mode=0o500)
        assert main(["train", *tiny(data_root, tmp_path / "ro", "x")]) == 1
        assert "Permission denied" in error_line(capsys, "train")
    data = (finished / "last.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    assert main(["test", "--checkpoint", str(tmp_path / "half.pt")]) == 1
    line = error_line(capsys, "test")
    assert "half.pt: expected an svfseg checkpoint" in line and "weights_only" not in line
    with pytest.raises(Exception, match="truncated or corrupt"):
        main(["--debug", "test", "--checkpoint", str(tmp_path / "half.pt")])
    monkeypatch.setenv("SVFSEG_DEBUG", "1")
    with pytest.raises(Exception, match="truncated or corrupt"):
        main(["test", "--checkpoint", str(tmp_path / "half.pt")])


def test_foreign_file_as_a_user_sees_it(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    proc = subprocess.run([sys.executable, "-m", "svfseg", "test", "--checkpoint", str(tmp_path / "random.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("svfseg test: error: "), proc.stderr
    assert "weights_only" not in proc.stderr
