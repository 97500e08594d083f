"""Issue 22, items 1-14: faults at the seams between commands, each reproduced through the CLI first."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_SIZE, error_line, tiny_run_args
from svfseg.cli import main


def tiny(root, out, name, *extra):
    # frozen backbone, no validation: the cheapest run that writes every file of a run folder
    return tiny_run_args(root, out, name, "train.tensorboard=false", "train.val_every=0", "model.regime=frozen",
                         "train.epochs=1", *extra)


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


# ---------------------------------------------------------------- item 12: tracebacks that were still shown


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: call a function on load
        return (print, ("payload ran",))


def _weight_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4, 4)}, good)
    payload, cut, noise, other = (tmp_path / n for n in ("payload.pt", "cut.pt", "noise.pt", "other.pt"))
    torch.save({"w": _Payload()}, payload)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    torch.save({"conv.weight": torch.ones(3, 3, 1, 1)}, other)  # another network's state dict
    return payload, cut, noise, other


def test_bad_model_weights_files_are_one_line_naming_the_file(data_root, tmp_path, capsys):
    for f in _weight_files(tmp_path):
        assert main(["train", *tiny(data_root, tmp_path, f"w_{f.stem}", f"model.weights={f}")]) == 1, f
        err = capsys.readouterr().err
        assert "weights_only" not in err and "payload ran" not in err, err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("svfseg train: error: ") and str(f) in last, err
        assert not (tmp_path / f"w_{f.stem}" / "config.yaml").exists()


def test_unknown_head_and_backbone_keys_are_one_line_naming_the_key(data_root, tmp_path, capsys):
    for key in ("model.head.no_such_option", "model.backbone_kwargs.no_such_option"):
        assert main(["train", *tiny(data_root, tmp_path, "k", f"{key}=1")]) == 2
        assert key in error_line(capsys, "train")
        assert not (tmp_path / "k").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_unusable_devices_are_one_line(data_root, runs, tmp_path, capsys):
    for device in ("cuda", "foo"):
        assert main(["train", *tiny(data_root, tmp_path, "d", f"device={device}")]) in (1, 2)
        assert "device" in error_line(capsys, "train")
        assert not (tmp_path / "d" / "config.yaml").exists()
    img, mask = _support(tmp_path)
    for device in ("cuda", "foo"):
        assert main(["predict", "--checkpoint", str(runs / "frozen" / "best.pt"), "--support", str(img), str(mask),
                     "--query", str(img), "--out", str(tmp_path / "p"), "--device", device]) in (1, 2)
        assert "--device" in error_line(capsys, "predict")


def _support(tmp_path, size=40):
    img = tmp_path / "q.png"
    Image.fromarray(np.full((size, size, 3), 120, np.uint8)).save(img)
    mask = tmp_path / "m.png"
    m = np.zeros((size, size), np.uint8)
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    Image.fromarray(m).save(mask)
    return img, mask


def _edited_episodes(run, tmp_path, edit):
    import dataclasses

    from svfseg.data.episodes import EpisodeList

    eps = tmp_path / "eps.json"
    if not eps.exists():
        assert main(["episodes", "--config", str(run / "config.yaml"), "--count", "3", "--out", str(eps)]) == 0
    good = EpisodeList.load(eps)
    out = tmp_path / f"edited{len(list(tmp_path.glob('edited*')))}.json"
    dataclasses.replace(good, episodes=edit(good.episodes)).save(out)  # a fingerprint that fits the edit
    return out


def test_episode_files_with_a_base_class_too_many_supports_or_none_are_refused(data_root, runs, tmp_path, capsys):
    import dataclasses

    from svfseg.data.splits import class_split

    run = runs / "frozen"
    base = class_split("synthetic", 0).base[0]
    cases = {
        "base class": lambda eps: (dataclasses.replace(eps[0], class_id=base), *eps[1:]),
        "supports": lambda eps: (dataclasses.replace(eps[0], supports=eps[0].supports * 2), *eps[1:]),
        "no episodes": lambda eps: (),  # item 13: an empty file scored "n/a" with rc 0
    }
    for what, edit in cases.items():
        f = _edited_episodes(run, tmp_path, edit)
        assert main(["test", "--checkpoint", str(run / "best.pt"), "--episodes", str(f)]) == 1, what
        line = error_line(capsys, "test")
        assert str(f) in line and what in line, line


def test_predict_refuses_a_huge_image_and_a_huge_size_in_one_line(runs, tmp_path, capsys):
    img, mask = _support(tmp_path)
    # a JPEG whose header says 16000 x 12000 (192 MP): the frame header's size fields patched
    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(small, quality=90)
    data = bytearray(small.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = (12000).to_bytes(2, "big") + (16000).to_bytes(2, "big")
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(bytes(data))
    ck = str(runs / "frozen" / "best.pt")
    assert main(["predict", "--checkpoint", ck, "--support", str(img), str(mask), "--query", str(huge),
                 "--out", str(tmp_path / "p")]) == 1
    line = error_line(capsys, "predict")
    assert str(huge) in line and "megapixels" in line, line
    assert main(["predict", "--checkpoint", ck, "--support", str(img), str(mask), "--query", str(img),
                 "--out", str(tmp_path / "p"), "--size", "100000"]) == 1
    assert "--size" in error_line(capsys, "predict")


def test_compare_seeds_empty_or_repeated_are_one_line(data_root, tmp_path, capsys):
    for seeds, what in ((",", "at least one"), ("0,0", "repeats")):  # item 12 and item 13
        assert main(_compare(data_root, tmp_path / "cmp", "--test-episodes", "4")[:5] + ["--seeds", seeds]
                    + _compare(data_root, tmp_path / "cmp", "--test-episodes", "4")[7:]) in (1, 2)
        assert "--seeds" in (line := error_line(capsys, "compare")) and what in line, line
        assert not (tmp_path / "cmp" / "runs").exists()


# ---------------------------------------------------------------- item 13: silently accepted options


@pytest.mark.parametrize("override, key", [
    ("optim.lr_mult.hed=10", "optim.lr_mult.hed"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch"),
    ("optim.lr=.nan", "optim.lr"),
    ("model.regime=lora", "svf.train_bn"),  # with svf.train_bn=true below: lora ignores it
])
def test_config_values_that_were_ignored_are_refused(data_root, tmp_path, capsys, override, key):
    extra = ["svf.train_bn=true"] if key == "svf.train_bn" else []
    assert main(["train", *tiny(data_root, tmp_path, "c", override, *extra)]) == 2
    assert key in error_line(capsys, "train")
    assert not (tmp_path / "c").exists()


def test_options_that_exclude_each_other_are_refused(data_root, runs, tmp_path, capsys):
    run = _copy(runs / "frozen", tmp_path)
    assert main(["train", "--resume", str(run), "--config", str(run / "config.yaml")]) == 2
    assert "--resume" in (line := error_line(capsys, "train")) and "--config" in line
    assert main(["test", "--checkpoint", str(run / "best.pt"), "--protocol", "bam", "--episodes", "x.json"]) == 2
    assert "--protocol" in (line := error_line(capsys, "test")) and "--episodes" in line


def test_overlapping_folds_in_dataset_yaml_are_refused(tmp_path):
    from svfseg.data.io import DataError
    from svfseg.data.meta import parse_dataset_meta

    with pytest.raises(DataError, match=r"folds\[1\].*class 2 .*folds\[0\]"):
        parse_dataset_meta({"classes": ["a", "b", "c", "d"], "folds": [[1, 2], [2, 3]]}, tmp_path / "dataset.yaml")


# ---------------------------------------------------------------- item 14


@pytest.mark.parametrize("override, key", [
    ("name=../../x", "name"), ("name=/tmp/x", "name"),
    ("optim.momentum=-0.5", "optim.momentum"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("seed=-1", "seed"), ("data.workers=-1", "data.workers"), ("data.train_crop=1", "data.train_crop"),
])
def test_values_torch_or_numpy_refuse_leave_no_run_folder(data_root, tmp_path, capsys, override, key):
    out = tmp_path / "a" / "b"
    assert main(["train", *tiny(data_root, out, "v", override)]) == 2
    assert f"'{key}'" in error_line(capsys, "train")
    assert not (out / "v").exists() and not (tmp_path / "x").exists() and not out.exists()


def test_episodes_out_is_not_replaced_without_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "eps.json"
    out.write_text("mine")
    cfg = str(runs / "frozen" / "config.yaml")
    assert main(["episodes", "--config", cfg, "--count", "2", "--out", str(out)]) == 2
    assert "--overwrite" in error_line(capsys, "episodes") and out.read_text() == "mine"
    assert main(["episodes", "--config", cfg, "--count", "2", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["episodes"]


def test_the_first_log_row_after_a_resume_averages_the_whole_window(data_root, tmp_path):
    from svfseg.engine.runlog import read_csv

    args = ("train.epochs=2", "train.log_every=2")
    assert main(["train", *tiny(data_root, tmp_path, "whole", *args)]) == 0
    assert main(["train", *tiny(data_root, tmp_path, "cut", *args, "train.stop_after_steps=1")]) == 130
    assert main(["train", "--resume", str(tmp_path / "cut"), "train.stop_after_steps=null"]) == 0
    whole, cut = read_csv(tmp_path / "whole" / "train_log.csv"), read_csv(tmp_path / "cut" / "train_log.csv")
    assert [r["step"] for r in cut] == [r["step"] for r in whole] == ["2", "4"]
    for a, b in zip(whole, cut):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6), (a, b)


# ---------------------------------------------------------------- item 9: late failures


def test_test_out_that_cannot_be_written_fails_before_scoring(runs, tmp_path, capsys, monkeypatch):
    from svfseg.engine.tasks import fewshot

    run = runs / "frozen"
    eps = tmp_path / "eps.json"
    assert main(["episodes", "--config", str(run / "config.yaml"), "--count", "2", "--out", str(eps)]) == 0
    scored = []
    monkeypatch.setattr(fewshot, "evaluate", lambda *a, **k: scored.append(1) or pytest.fail("scored"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # root ignores permission bits: a file where the folder should be is unwritable
    assert main(["test", "--checkpoint", str(run / "best.pt"), "--episodes", str(eps),
                 "--out", str(blocker / "results")]) == 1
    assert "test --out" in error_line(capsys, "test") and not scored


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_the_first_step(data_root, tmp_path, capsys,
                                                                                monkeypatch):
    import collections

    from svfseg.engine import outdir

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    assert main(["train", *tiny(data_root, tmp_path, "small")]) == 1
    line = error_line(capsys, "train")
    assert "MB free" in line and "start again" in line, line
    assert not (tmp_path / "small" / "config.yaml").exists() and not (tmp_path / "small" / "train_log.csv").exists()


# ---------------------------------------------------------------- item 4: footprint across a resume


def test_footprint_and_seconds_cover_every_segment_of_a_resumed_run(data_root, tmp_path):
    args = ("model.regime=svf", "svf.stages=[layer2]", "train.epochs=2")
    assert main(["train", *tiny(data_root, tmp_path, "whole", *args)]) == 0
    assert main(["train", *tiny(data_root, tmp_path, "cut", *args, "train.stop_after_steps=1")]) == 130
    first = json.loads((tmp_path / "cut" / "train_summary.json").read_text())
    assert main(["train", "--resume", str(tmp_path / "cut"), "train.stop_after_steps=null"]) == 0
    whole = json.loads((tmp_path / "whole" / "train_summary.json").read_text())
    cut = json.loads((tmp_path / "cut" / "train_summary.json").read_text())
    # movement against the run's initial weights: what the uninterrupted run reports
    assert cut["footprint"]["movement_from_step"] == 0
    for stage, m in whole["footprint"]["movement"].items():
        assert cut["footprint"]["movement"][stage]["mean"] == pytest.approx(m["mean"], rel=1e-5), stage
    for stage, g in whole["footprint"]["gradient_scale_step1"].items():
        assert cut["footprint"]["gradient_scale_step1"][stage] == pytest.approx(g), stage
    # seconds and peak memory: both segments
    earlier = cut["seconds"] - cut["segment_seconds"]  # the first segment up to its checkpoint
    assert 0 < earlier <= first["seconds"], (earlier, first["seconds"])
    assert cut["footprint"]["peak_memory_bytes"] >= first["footprint"]["peak_memory_bytes"]
    assert cut["footprint"]["segments"] == 2


# ---------------------------------------------------------------- item 6: one image reader, one EXIF rule


def _with_orientation(arr, path, orientation):
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    return path


def test_every_reader_applies_exif_orientation_to_images_never_to_masks(tmp_path):
    from PIL import ImageOps

    from svfseg.data.io import image_size, read_image, read_label
    from svfseg.predict import read_rgb

    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    for o in range(1, 9):
        p = _with_orientation(arr, tmp_path / f"o{o}.png", o)
        with Image.open(p) as im:
            shown = np.array(ImageOps.exif_transpose(im).convert("RGB"))
        assert np.array_equal(read_image(p), shown), o
        assert np.array_equal(read_rgb(p), shown), o  # predict (and serve) read as training does
        assert image_size(p) == shown.shape[:2], o  # prepare / --check sizes
    label = _with_orientation(np.eye(20, 30, dtype=np.uint8), tmp_path / "label.png", 6)
    assert read_label(label).shape == (20, 30)  # masks never rotate


def test_prepare_check_reports_rotated_images_and_the_size_they_are_read_at(data_root, tmp_path, caplog):
    from svfseg.data.io import read_label, read_list, write_label

    root = shutil.copytree(data_root, tmp_path / "copy")
    pairs = read_list(root / "train.txt")
    # a square photo with a rotation tag: read rotated, reported, no problem
    img0, lbl0 = root / pairs[0][0], root / pairs[0][1]
    rgb0 = np.array(Image.open(img0).convert("RGB"))
    side = min(rgb0.shape[:2])
    _with_orientation(rgb0[:side, :side], img0.with_suffix(".png"), 8)
    img0.with_suffix(".png").replace(img0)  # the name stays (the content is a PNG; readers go by content)
    write_label(lbl0, read_label(lbl0)[:side, :side])
    # a non-square one whose label was drawn on the stored pixels: refused here, as train refuses it
    img1, lbl1 = root / pairs[1][0], root / pairs[1][1]
    rgb1 = np.array(Image.open(img1).convert("RGB"))
    h, w = rgb1.shape[:2]
    assert h != w
    _with_orientation(rgb1, img1.with_suffix(".png"), 6)
    img1.with_suffix(".png").replace(img1)
    caplog.set_level("INFO")
    assert main(["prepare", "synthetic", "--check", str(root), "--workers", "1"]) == 1
    text = caplog.text
    assert "2 image(s) carry an EXIF rotation" in text
    assert f"{lbl1}: expected the size of its image {img1.name} {h}x{w}, found {w}x{h} (width x height)" in text
    assert "3 problem(s)" not in text and f"{lbl0}:" not in text
    assert pairs[0][0] in text.split("EXIF rotation, e.g.")[1].splitlines()[0]  # the square one is named


# ---------------------------------------------------------------- item 8: 16-bit and palette images


def test_16_bit_and_palette_images_are_read_with_their_values(runs, tmp_path):
    from svfseg.predict import read_rgb

    g16 = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = read_rgb(tmp_path / "g16.png")
    assert rgb.shape == (40, 40, 3) and np.abs(rgb[..., 0].astype(float) - g16 / 257).max() <= 1  # not all white
    pal = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8), (40, 1)), mode="L").convert("P")
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_rgb(tmp_path / "pal.png"), np.array(pal.convert("RGB")))
    img, mask = _support(tmp_path)
    assert main(["predict", "--checkpoint", str(runs / "frozen" / "best.pt"), "--support", str(img), str(mask),
                 "--query", str(tmp_path / "g16.png"), "--out", str(tmp_path / "p")]) == 0


# ---------------------------------------------------------------- item 11: damaged but complete files


def test_check_finds_a_zeroed_block_in_a_complete_jpeg(data_root, tmp_path, caplog):
    import cv2

    from svfseg.data.io import read_list

    root = shutil.copytree(data_root, tmp_path / "copy")
    rel = read_list(root / "train.txt")[0][0]
    # a photo-sized JPEG (a 64 px one has too little data for the decoder to notice), a third zeroed
    rgb = cv2.resize(np.array(Image.open(root / rel).convert("RGB")), (256, 256))
    rgb = (rgb.astype(int) + np.random.default_rng(0).integers(0, 40, rgb.shape)).clip(0, 255).astype(np.uint8)
    ok, jpg = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 92])
    data = bytearray(jpg.tobytes())
    n = len(data)
    data[n // 3: 2 * n // 3] = bytes(2 * n // 3 - n // 3)
    (root / rel).write_bytes(bytes(data))
    label = root / read_list(root / "train.txt")[0][1]
    Image.fromarray(cv2.resize(np.array(Image.open(label)), (256, 256), interpolation=cv2.INTER_NEAREST)).save(label)
    caplog.set_level("INFO")
    assert main(["prepare", "synthetic", "--check", str(root), "--workers", "1"]) == 1
    assert f"{root / rel}: expected a decodable image, found damaged data" in caplog.text


def test_the_class_index_cache_sees_a_content_change_that_keeps_size_and_mtime(data_root, tmp_path):
    import os

    from svfseg.data.episodes import EpisodeList
    from svfseg.data.index import load_class_index
    from svfseg.data.io import DataError, read_list

    from svfseg.data.splits import num_classes

    root = shutil.copytree(data_root, tmp_path / "copy")
    n = num_classes("synthetic")
    before = load_class_index(root, "val", n, progress=False)
    img = root / read_list(root / "val.txt")[0][0]
    st = img.stat()
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    after = load_class_index(root, "val", n, progress=False)
    assert after.fingerprint != before.fingerprint
    old = EpisodeList(benchmark="synthetic", split="val", fold=0, shot=1, seed=0, convention="interleaved",
                      min_pixels=1, dataset_fingerprint=before.fingerprint, episodes=())
    with pytest.raises(DataError):
        old.check_dataset(after.fingerprint, where="an episode file made before the change")


# ---------------------------------------------------------------- item 10: report groups by cell


def _result(tmp_path, name, seed, *, steps=100, root="data/a", data_fp="d1", count=1000):
    run = tmp_path / name
    (run / "test").mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed: {seed}\nname: {name}\ndata:\n  root: {root}\n"
                                     f"train:\n  epochs: 1\n  steps_per_epoch: {steps}\n")
    (run / "test" / "results.json").write_text(json.dumps({
        "checkpoint": str(run / "best.pt"), "benchmark": "pascal", "backbone": "resnet50_deep", "model": "pfenet",
        "regime": "svf", "shot": 1, "fold": 0, "protocol": "hsnet", "train_seed": seed,
        "runs": [{"episodes": count, "dataset_fingerprint": data_fp}],
        "summary": {"miou": {"mean": 0.5 + 0.1 * seed}}}))
    return run


def test_report_never_averages_unrelated_runs_as_seeds(tmp_path, capsys):
    same = [_result(tmp_path, f"s{s}", s) for s in (0, 1)]  # two seeds of one cell: averaged
    budget = _result(tmp_path, "longer", 2, steps=400)  # another budget
    data = _result(tmp_path, "otherdata", 3, root="data/b", data_fp="d2")  # another data root
    episodes = _result(tmp_path, "fewer", 4, count=300)  # another episode set
    assert main(["report", *map(str, [*same, budget, data, episodes])]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| pascal")]
    assert len(rows) == 4, text
    assert "| PFENet + SVF [a] | 55.00 ± 7.07 / 69.27 |" in text  # the two seeds of one cell (sample std, n-1)
    assert "train.steps_per_epoch 100 vs 400" in text
    assert "dataset fingerprint d1 vs d2" in text and "episodes 1000 vs 300" in text


def test_a_cell_recorded_before_a_new_config_key_existed_still_matches():
    from svfseg.compare import cell_settings, settings_differences
    from svfseg.config import load_config

    want = cell_settings(load_config(None, ["name=x"]), None)
    older = {"config": {k: v for k, v in want["config"].items() if k != "model.init_head"}}
    assert settings_differences(older, want) == []
    changed = {"config": {**older["config"], "train.epochs": 7}}
    assert settings_differences(changed, want) == [f"train.epochs: was 7, now {want['config']['train.epochs']}"]


def test_overwrite_remakes_the_validation_episodes_of_the_earlier_run(data_root, tmp_path):
    """`train --overwrite` with another train.val_episodes validates on the new count, not the old file's."""
    import json

    run = tmp_path / "ow"
    assert main(["train", *tiny_run_args(data_root, tmp_path, "ow", "train.val_every=1", "train.val_episodes=2")]) == 0
    assert main(["train", "--overwrite", *tiny_run_args(data_root, tmp_path, "ow", "train.val_every=1", "train.val_episodes=3")]) == 0
    assert len(json.loads((run / "val_episodes_test_fold.json").read_text())["episodes"]) == 3
    history = json.loads((run / "train_summary.json").read_text())["history"]
    assert {h["episodes"] for h in history} == {3}


def test_overwrite_keeps_the_earlier_run_when_the_new_validation_set_is_refused(data_root, tmp_path, capsys):
    """The validation episodes are checked before the earlier run's files are deleted (a file of another fold)."""
    run = tmp_path / "keep"
    args = tiny_run_args(data_root, tmp_path, "keep", "train.val_every=1", "train.val_episodes=2")
    assert main(["train", *args]) == 0
    before = sorted(p.name for p in run.iterdir())
    other_fold = tmp_path / "fold1.json"
    assert main(["episodes", "--config", args[1], "--out", str(other_fold), "--count", "2", f"data.root={data_root}",
                 "fold=1", f"data.test_size={TINY_SIZE}"]) == 0
    capsys.readouterr()
    assert main(["train", "--overwrite", *args, f"train.val_episodes_file={other_fold}"]) == 1
    assert "episode list made for" in error_line(capsys, "train")
    assert sorted(p.name for p in run.iterdir()) == before  # nothing of the earlier run was deleted
