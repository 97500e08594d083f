"""`svfseg prepare` on tiny VOC/SBD/COCO trees in their real formats, and the --check pass."""
import argparse
import json
import os
import stat

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image
from pycocotools import mask as mask_utils

from svfseg.data import DataError, load_class_index
from svfseg.data.check import check_dataset
from svfseg.data.index import index_cache_file
from svfseg.data.io import read_label, read_list, write_label
from svfseg.data.prepare import add_prepare_arguments, prepare_coco, prepare_pascal, run_prepare

H, W = 48, 64


def _jpeg(path, seed=0, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def _voc_palette():
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _seg(cls, seed):
    seg = np.zeros((H, W), np.uint8)
    y = 4 + seed % 10
    seg[y:y + 20, 10:40] = cls
    return seg


def make_voc_sbd(tmp):
    """VOC2012 (palette PNGs with 255 borders) + SBD (.mat with the GTcls struct) with known overlaps."""
    voc, sbd = tmp / "VOCdevkit" / "VOC2012", tmp / "SBD" / "dataset"
    ids = {"a": 1, "b": 6, "c": 2, "d": 7, "e": 11, "f": 12, "g": 3}
    for k, (i, c) in enumerate(ids.items()):
        _jpeg(voc / "JPEGImages" / f"2008_00{i}.jpg", seed=k)
    (voc / "SegmentationClass").mkdir(parents=True)
    for i in "abcd":  # VOC-annotated images: palette PNG with a 255 boundary band
        seg = _seg(ids[i], ord(i))
        seg[3, :] = 255
        im = Image.fromarray(seg, mode="P")
        im.putpalette(_voc_palette())
        im.save(voc / "SegmentationClass" / f"2008_00{i}.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2008_00a\n2008_00b\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_00c\n2008_00d\n")
    (sbd / "cls").mkdir(parents=True)
    for i in "acefg":
        seg = _seg(ids[i] + (5 if i == "a" else 0), ord(i))  # SBD's 'a' differs: VOC must win
        bounds = np.empty((20, 1), dtype=object)
        for c in range(20):
            bounds[c, 0] = scipy.sparse.csc_matrix((seg == c + 1).astype(np.uint8))
        present = np.unique(seg[seg > 0]).astype(np.uint8)
        scipy.io.savemat(sbd / "cls" / f"2008_00{i}.mat",
                         {"GTcls": {"Segmentation": seg, "Boundaries": bounds, "CategoriesPresent": present}})
    (sbd / "train.txt").write_text("2008_00a\n2008_00c\n2008_00e\n2008_00f\n")
    (sbd / "val.txt").write_text("2008_00g\n")
    return voc.parent, sbd.parent, ids


def test_prepare_pascal(tmp_path, caplog):
    voc, sbd, ids = make_voc_sbd(tmp_path)
    out = prepare_pascal(voc, sbd, tmp_path / "pascal", workers=1)
    train = [a for a, _ in read_list(out / "train.txt")]
    val = [a for a, _ in read_list(out / "val.txt")]
    assert train == [f"JPEGImages/2008_00{i}.jpg" for i in "abef"]  # SBD 'c' is VOC val: excluded
    assert val == ["JPEGImages/2008_00c.jpg", "JPEGImages/2008_00d.jpg"]
    a = read_label(out / "SegmentationClassAug" / "2008_00a.png")
    assert set(np.unique(a).tolist()) == {0, 1, 255}  # the VOC palette indices, not SBD's class 6
    e = read_label(out / "SegmentationClassAug" / "2008_00e.png")
    assert set(np.unique(e).tolist()) == {0, 11}
    assert (out / "JPEGImages").is_symlink() and (out / "JPEGImages" / "2008_00e.jpg").is_file()
    assert "standard list has 1449" in caplog.text  # count warning
    idx = load_class_index(out, "train", 20)
    assert idx.records[0].counts == {1: 600} and index_cache_file(out, "train").is_file()
    assert not (out / ".svfseg_cache").exists()  # caches live in $SVFSEG_CACHE, not in the data
    problems = check_dataset(out, "pascal", min_pixels=1, workers=1)
    assert problems and all("episodes need" in p for p in problems)  # only the tiny size's empty classes
    aug = prepare_pascal(voc, sbd, tmp_path / "aug", sbd_val=True, copy_images=True, workers=1)
    assert "JPEGImages/2008_00g.jpg" in [a for a, _ in read_list(aug / "train.txt")]
    assert not (aug / "JPEGImages").is_symlink() and len(list((aug / "JPEGImages").iterdir())) == 7


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_prepared_root_mode_follows_the_umask(tmp_path, umask, mode):
    voc, sbd, _ = make_voc_sbd(tmp_path)
    before = os.umask(umask)
    try:
        out = prepare_pascal(voc, sbd, tmp_path / "pascal", workers=1)
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == mode  # not mkdtemp's 0700: a shared root stays readable
    assert stat.S_IMODE((out / "SegmentationClassAug").stat().st_mode) == mode


def test_prepare_pascal_given_lists_and_atomicity(tmp_path):
    voc, sbd, _ = make_voc_sbd(tmp_path)
    lst = tmp_path / "train_pfenet.txt"
    lst.write_text("JPEGImages/2008_00b.jpg SegmentationClassAug/2008_00b.png\n"
                   "JPEGImages/2008_00g.jpg SegmentationClassAug/2008_00g.png\n")
    out = prepare_pascal(voc, sbd, tmp_path / "given", train_list=lst, workers=1)
    assert (out / "train.txt").read_text() == lst.read_text()
    bad = tmp_path / "bad.txt"
    bad.write_text("2008_00b.jpg 2008_00b.png\n")
    with pytest.raises(DataError, match="PFENet/BAM"):
        prepare_pascal(voc, sbd, tmp_path / "x", train_list=bad, workers=1)
    (sbd / "dataset" / "cls" / "2008_00f.mat").unlink()  # an SBD-only image without its mask
    with pytest.raises(DataError, match="2008_00f"):
        prepare_pascal(voc, sbd, tmp_path / "half", workers=1)
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]  # no temp folder left
    with pytest.raises(DataError, match="already exists"):
        prepare_pascal(voc, sbd, out, workers=1)


COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def _poly(y0, x0, y1, x1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask):
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def make_coco(tmp):
    coco = tmp / "coco"
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_IDS]
    for split in ("train", "val"):
        images, anns = [], []
        for k in range(2):
            name = f"COCO_{split}2014_{k + 1:012d}.jpg"
            _jpeg(coco / f"{split}2014" / name, seed=k)
            images.append({"id": k + 1, "file_name": name, "height": H, "width": W})
        big = np.zeros((H, W), np.uint8)
        big[5:40, 5:60] = 1
        anns += [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1925.0,
             "segmentation": _poly(5, 5, 40, 60)},
            {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 100.0,
             "segmentation": _poly(10, 10, 20, 20)},
            {"id": 3, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 40.0,
             "segmentation": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in
                              mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 10), np.uint8),
                                                                         ((42, 2), (50, 4))))).items()}},
            {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 300.0,
             "segmentation": _uncompressed_rle(np.pad(np.ones((10, 30), np.uint8), ((35, 3), (0, 34))))},
        ]  # image 2 has no annotation: all background
        blob = {"images": images, "annotations": anns, "categories": cats}
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        (coco / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(blob))
    return coco


def test_prepare_coco(tmp_path):
    out = prepare_coco(make_coco(tmp_path), tmp_path / "coco20i", workers=1)
    pairs = read_list(out / "train.txt")
    assert pairs[0] == ("train2014/COCO_train2014_000000000001.jpg",
                        "SegmentationClassAug/COCO_train2014_000000000001.png")
    m = read_label(out / pairs[0][1])
    assert m.shape == (H, W)
    assert m[7, 30] == 1  # person (large, painted first)
    assert m[15, 15] == 17  # the small dog (COCO id 18 -> 17) stays on top of the person
    assert m[43, 55] == 80  # COCO id 90 -> 80 from a compressed RLE
    assert m[42, 2] == 255  # crowd region outside any instance -> ignore
    assert m[37, 10] == 1  # crowd over a regular instance: the instance wins
    assert not read_label(out / pairs[1][1]).any()  # unannotated image: background
    assert (out / "val2014").is_symlink() and (out / "train2014" / "COCO_train2014_000000000002.jpg").is_file()
    assert load_class_index(out, "val", 80).records[0].counts[17] == 100


def _broken_root(tmp):
    root = tmp / "broken"
    (root / "SegmentationClassAug").mkdir(parents=True)
    lines = []
    for i in range(4):
        _jpeg(root / "JPEGImages" / f"ok{i}.jpg", seed=i)
        write_label(root / "SegmentationClassAug" / f"ok{i}.png", _seg(6, i))
        lines.append(f"JPEGImages/ok{i}.jpg SegmentationClassAug/ok{i}.png")
    lines.append("JPEGImages/missing.jpg SegmentationClassAug/ok0.png")
    _jpeg(root / "JPEGImages" / "trunc.jpg", seed=9)
    data = (root / "JPEGImages" / "trunc.jpg").read_bytes()
    (root / "JPEGImages" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    write_label(root / "SegmentationClassAug" / "trunc.png", _seg(6, 0))
    lines.append("JPEGImages/trunc.jpg SegmentationClassAug/trunc.png")
    _jpeg(root / "JPEGImages" / "small.jpg", size=(H - 8, W))
    write_label(root / "SegmentationClassAug" / "small.png", _seg(6, 0))
    lines.append("JPEGImages/small.jpg SegmentationClassAug/small.png")
    write_label(root / "SegmentationClassAug" / "range.png", _seg(30, 0))
    _jpeg(root / "JPEGImages" / "range.jpg")
    lines.append("JPEGImages/range.jpg SegmentationClassAug/range.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "SegmentationClassAug" / "rgb.png")
    _jpeg(root / "JPEGImages" / "rgb.jpg")
    lines.append("JPEGImages/rgb.jpg SegmentationClassAug/rgb.png")
    lines.append("JPEGImages/ok2.jpg")  # wrong format
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("JPEGImages/ok0.jpg SegmentationClassAug/ok0.png\n"
                                  "JPEGImages/ok1.jpg SegmentationClassAug/ok1.png\n")
    return root


def test_check_reports_every_problem(tmp_path):
    root = _broken_root(tmp_path)
    problems = check_dataset(root, "pascal", min_pixels=100, workers=1)
    text = "\n".join(problems)
    expected = [
        "missing.jpg: expected an image, found no file",
        "trunc.jpg: expected a complete image, found a truncated JPEG",
        "small.png: expected the size of its image small.jpg 64x40, found 64x48 (width x height)",
        "range.png: expected class ids 0..20 or 255, found [30]",
        "rgb.png: expected a single-channel class-id PNG (mode L or P), found mode RGB",
        "train.txt:10: expected '<image> <label>' (2 fields), found 1",
        "val fold 0: novel class in val 1 has 0 image(s)",
        "train fold 0: base class in the † training pool 7 has 0 image(s)",
    ]
    for e in expected:
        assert e in text, e
    # the readers refuse the same root before training starts, naming the files
    with pytest.raises(DataError, match="train.txt:10"):
        load_class_index(root, "train", 20)
    (root / "train.txt").write_text("\n".join((root / "train.txt").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match=r"problem\(s\)[\s\S]*range.png[\s\S]*rgb.png"):
        load_class_index(root, "train", 20)
    # the hint is a command that runs: `svfseg prepare` needs its benchmark argument
    with pytest.raises(DataError, match=f"run `svfseg prepare pascal --check {root}` for the full list"):
        load_class_index(root, "train", 20, benchmark="pascal")
    with pytest.raises(DataError, match=r"svfseg prepare \{pascal,coco,synthetic,custom\} --check"):
        load_class_index(root, "train", 20)


def test_cli_entry(tmp_path, capsys):
    voc, sbd, _ = make_voc_sbd(tmp_path)
    parser = add_prepare_arguments(argparse.ArgumentParser(prog="svfseg prepare"))
    out = tmp_path / "p"
    assert run_prepare(parser.parse_args(["pascal", "--voc", str(voc), "--sbd", str(sbd), "--out", str(out),
                                          "--workers", "1"])) == 0
    assert (out / "val.txt").is_file()
    assert run_prepare(parser.parse_args(["pascal", "--voc", str(voc), "--out", str(out)])) == 1  # exists
    assert run_prepare(parser.parse_args(["pascal", "--voc", str(voc)])) == 2  # no --out
    assert run_prepare(parser.parse_args(["coco", "--out", str(tmp_path / "c")])) == 2  # no --coco
    assert run_prepare(parser.parse_args(["pascal", "--check", str(_broken_root(tmp_path)), "--workers", "1"])) == 1
    syn = tmp_path / "syn"
    args = ["synthetic", "--out", str(syn), "--n-train", "40", "--n-val", "40", "--size", "64", "--workers", "1"]
    assert run_prepare(parser.parse_args(args)) == 0
    assert index_cache_file(syn, "val").is_file() and not (syn / ".svfseg_cache").exists()
    assert run_prepare(parser.parse_args(["synthetic", "--check", str(syn), "--workers", "1"])) in (0, 1)
