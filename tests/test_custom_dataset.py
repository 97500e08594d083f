"""A user's own dataset end to end: images + masks folders -> prepare custom -> train, episodes, test, predict, report."""
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svfseg.cli import main
from svfseg.data import DataError, build_dataset, load_class_index
from svfseg.data.index import CACHE_DIR, index_cache_file
from svfseg.data.meta import load_dataset_meta, parse_dataset_meta
from svfseg.data.splits import CustomClasses, class_split, consecutive_folds, num_folds

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
SIZE = 48
NAMES = ["cat", "dog", "bird", "fish"]


def _folders(base: Path, per_class: int = 8) -> tuple[Path, Path]:
    """Images with one disc of one class each (radius 6..15 px: 113..707 px), masks with its id and a 255 rim."""
    images, masks = base / "images", base / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for c in range(1, len(NAMES) + 1):
        for k in range(per_class):
            r = 6 + (k * 9) // (per_class - 1)
            cy, cx = rng.integers(r, SIZE - r, size=2)
            d = np.hypot(yy - cy, xx - cx)
            label = np.where(d <= r, c, 0).astype(np.uint8)
            label[(d > r) & (d <= r + 1)] = 255
            img = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
            img[d <= r] = np.array([60 * c, 255 - 50 * c, 40 + 40 * c], np.uint8)
            name = f"{NAMES[c - 1]}_{k:02d}"
            Image.fromarray(img).save(images / f"{name}.png")
            Image.fromarray(label, mode="L").save(masks / f"{name}.png")
    return images, masks


def _tiny(root, out, name, *extra):
    return ["--config", str(RECIPE), "data.benchmark=custom", f"data.root={root}", f"output_dir={out}",
            f"name={name}", f"data.train_crop={SIZE}", f"data.test_size={SIZE}", "data.workers=0", "train.epochs=1",
            "train.steps_per_epoch=1", "train.batch_size=2", "train.val_episodes=2", "train.progress=false",
            "train.val_every=1", "train.select_on=test_fold", "svf.stages=[layer2]", *extra]


@pytest.fixture(scope="module")
def custom_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("own")
    images, masks = _folders(base)
    (base / "names.txt").write_text("\n".join(NAMES) + "\n")
    root = base / "mine"
    assert main(["prepare", "custom", "--images", str(images), "--masks", str(masks), "--out", str(root),
                 "--class-names", str(base / "names.txt"), "--val-fraction", "0.5", "--workers", "1"]) == 0
    return root


def test_prepare_custom_writes_layout_lists_and_metadata(custom_root):
    meta = load_dataset_meta(custom_root)
    assert meta.classes.names == tuple(NAMES) and meta.classes.folds == ((1,), (2,), (3,), (4,))
    assert meta.image_size == SIZE
    train = (custom_root / "train.txt").read_text().split()
    val = (custom_root / "val.txt").read_text().split()
    assert len(train) == len(val) == 32  # 16 lines of two paths each
    assert not set(train) & set(val) and train[0].startswith("JPEGImages/")
    assert main(["prepare", "custom", "--check", str(custom_root), "--workers", "1"]) == 0
    assert not (custom_root / CACHE_DIR).exists()


def test_prepare_custom_refuses_bad_folders(tmp_path, caplog):
    images, masks = _folders(tmp_path, per_class=2)
    (masks / "cat_00.png").unlink()
    assert main(["prepare", "custom", "--images", str(images), "--masks", str(masks), "--out",
                 str(tmp_path / "a"), "--workers", "1"]) == 1
    assert "1 image(s) without a mask" in caplog.text and not (tmp_path / "a").exists()
    caplog.clear()
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8), mode="L").save(masks / "cat_00.png")
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    assert main(["prepare", "custom", "--images", str(images), "--masks", str(masks), "--out",
                 str(tmp_path / "a"), "--class-names", str(tmp_path / "names.txt")]) == 1
    assert "expected class ids 0..4 or 255" in caplog.text
    caplog.clear()
    (masks / "cat_00.png").unlink()
    (images / "cat_00.png").unlink()
    # two images per class and half of them in val: the checks find folds that cannot make episodes
    assert main(["prepare", "custom", "--images", str(images), "--masks", str(masks), "--out",
                 str(tmp_path / "a"), "--workers", "1"]) == 1
    assert "episodes need at least 2" in caplog.text and not (tmp_path / "a").exists()


def test_dataset_yaml_and_custom_splits(tmp_path):
    assert consecutive_folds(5, 2) == ((1, 2, 3), (4, 5))
    meta = parse_dataset_meta({"classes": ["a", "b", "c"], "folds": [[1], ["b", "c"]]}, tmp_path / "dataset.yaml")
    assert meta.classes.folds == ((1,), (2, 3)) and num_folds("custom", meta.classes) == 2
    assert class_split("custom", 1, meta=meta.classes).base == (1,)
    with pytest.raises(ValueError, match="0..1"):
        class_split("custom", 2, meta=meta.classes)
    with pytest.raises(ValueError, match="dataset.yaml"):
        class_split("custom", 0)
    for blob, msg in (({"classes": ["a"]}, "at least 2"), ({"classes": ["a", "b"], "folds": [[1, 2]]}, "no base"),
                      ({"classes": ["a", "b"], "folds": [[3]]}, r"folds\[0\]"),
                      ({"classes": ["a", "b"], "colors": 1}, "unknown key"),
                      ({"classes": ["a", "b"], "image_size": -1}, "image_size")):
        with pytest.raises(DataError, match=msg):
            parse_dataset_meta(blob, tmp_path / "dataset.yaml")
    with pytest.raises(DataError, match="dataset.yaml: expected the dataset description"):
        load_dataset_meta(tmp_path)
    assert class_split("pascal", 1) == class_split("pascal", 1, meta=CustomClasses(("x",), ((1,),)))


def test_min_pixels_changes_the_pools(custom_root, caplog):
    caplog.set_level("INFO")
    kw = dict(root=custom_root, benchmark="custom", fold=0, split="train", shot=1)
    default = build_dataset(**kw)
    assert "min_pixels=21 (default for custom)" in caplog.text  # 2,048 x (48 / 473)^2
    small = build_dataset(**kw, min_pixels=250)
    assert "min_pixels=250 (data.min_pixels)" in caplog.text
    # Every disc passes 21 px; only the larger ones pass 250 px (radius >= 9).
    records = load_class_index(custom_root, "train", 4).records
    assert len(default) == sum(1 not in r.counts for r in records)  # every image without the novel class
    assert len(small) == sum(1 not in r.counts and max(r.counts.values()) >= 250 for r in records) < len(default)
    with pytest.raises(DataError, match=r"data.min_pixels=N, now 2000"):
        build_dataset(**kw, min_pixels=2000)


def _tree(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


def test_read_only_root_with_cache_elsewhere(custom_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SVFSEG_CACHE", str(tmp_path / "cache"))
    modes = {p: p.stat().st_mode for p in [custom_root, *custom_root.rglob("*")] if not p.is_symlink()}
    before = _tree(custom_root)
    try:
        # Read-only for a normal user; a root user can still write, so the tree is compared as well.
        for p in modes:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        idx = load_class_index(custom_root, "val", 4)
        assert index_cache_file(custom_root, "val").is_file()
        assert str(tmp_path / "cache") in str(index_cache_file(custom_root, "val"))
        assert load_class_index(custom_root, "val", 4).fingerprint == idx.fingerprint  # from the cache
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert _tree(custom_root) == before  # nothing written into the data
    # A cache an older svfseg wrote in the root is still read (and nothing new is written).
    monkeypatch.setenv("SVFSEG_CACHE", str(tmp_path / "cache2"))
    (custom_root / CACHE_DIR).mkdir()
    try:
        src = tmp_path / "cache" / index_cache_file(custom_root, "val").relative_to(tmp_path / "cache2")
        (custom_root / CACHE_DIR / "index-val.json").write_text(src.read_text())
        assert load_class_index(custom_root, "val", 4).fingerprint == idx.fingerprint
        assert not index_cache_file(custom_root, "val").exists()
    finally:
        for f in (custom_root / CACHE_DIR).iterdir():
            f.unlink()
        (custom_root / CACHE_DIR).rmdir()


def test_failed_data_check_leaves_no_run_folder(custom_root, tmp_path, capsys):
    assert main(["train", *_tiny(custom_root, tmp_path, "bad", "data.min_pixels=100000")]) == 1
    assert "data.min_pixels" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_train_episodes_test_predict_report(custom_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        assert main(["train", *_tiny(custom_root, runs, f"s{seed}", f"seed={seed}"), "--threads", "1"]) == 0
    meta = json.loads((runs / "s1" / "meta.json").read_text())
    assert meta["threads"] == 1 and "threads: 1" in (runs / "s1" / "config.yaml").read_text()

    capsys.readouterr()
    ep = tmp_path / "f0.json"
    assert main(["episodes", "--config", str(RECIPE), *_tiny(custom_root, runs, "s1")[2:], "--count", "6",
                 "--seed", "3", "--out", str(ep)]) == 0
    out = capsys.readouterr().out
    saved = json.loads(ep.read_text())
    assert f"fingerprint {saved['fingerprint']}" in out and "episode seed 3" in out and "1 cat: 6" in out
    assert saved["benchmark"] == "custom" and len(saved["episodes"]) == 6

    for seed in (1, 2):
        assert main(["test", "--checkpoint", str(runs / f"s{seed}" / "best.pt"), "--episodes", str(ep),
                     "--out", str(tmp_path / f"t{seed}")]) == 0
    md = capsys.readouterr().out
    assert "| 1 | cat |" in md
    res = json.loads((tmp_path / "t1" / "results.json").read_text())
    assert res["class_names"] == {"1": "cat"} and res["train_seed"] == 1 and res["num_folds"] == 4
    assert res["runs"][0]["episode_fingerprint"] == saved["fingerprint"]
    assert main(["test", "--checkpoint", str(runs / "s1" / "best.pt"), "--protocol", "hsnet",
                 "eval.num_episodes=2", "--out", str(tmp_path / "t3")]) == 0
    assert "| episode seed 0 | 2 |" in capsys.readouterr().out

    img = custom_root / "JPEGImages" / "cat_03.png"
    label = np.array(Image.open(custom_root / "SegmentationClassAug" / "cat_03.png"))
    Image.fromarray(np.where(label == 1, 255, 0).astype(np.uint8)).save(tmp_path / "support.png")
    assert main(["predict", "--checkpoint", str(runs / "s1" / "best.pt"), "--support", str(img),
                 str(tmp_path / "support.png"), "--query", str(custom_root / "JPEGImages" / "cat_05.png"),
                 "--out", str(tmp_path / "pred"), "--threads", "1"]) == 0
    assert np.array(Image.open(tmp_path / "pred" / "cat_05_mask.png")).shape == (SIZE, SIZE)

    capsys.readouterr()
    assert main(["report", str(tmp_path / "t1"), str(tmp_path / "t2")]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| custom"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    m = [100 * json.loads((tmp_path / t / "results.json").read_text())["summary"]["miou"]["mean"]
         for t in ("t1", "t2")]
    assert cells[3] == f"{(m[0] + m[1]) / 2:.2f} ± {abs(m[0] - m[1]) / 2:.2f}"  # two training seeds
    assert cells[-2] == "2" and cells[7] == "(1/4 folds)"  # seeds, then the statistic
