"""`svfseg prepare coco --val-list/--train-list`: upstream's list files, their order kept and recorded."""
import json

import numpy as np
import pytest
from PIL import Image

from svfseg.cli import main
from svfseg.data import DataError, EpisodeList, build_dataset, load_class_index, make_episodes
from svfseg.data.episodes import make_pool
from svfseg.data.io import LIST_SOURCES, list_source, read_list
from test_data_episodes import MIN_PX, make_root
from test_data_prepare import COCO_IDS

H, W = 32, 40
#: Upstream's order: not sorted by file name (BAM/PFENet lists/coco/val_data_list.txt starts 553141, 020925, ...).
UPSTREAM_ORDER = [553141, 20925, 470885, 1000]


def make_coco(tmp, n_val=5):
    """COCO 2014 folders: every image holds one person (class 1) box of its own size."""
    coco = tmp / "coco"
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_IDS]
    for split, ids in (("train", [1, 2]), ("val", sorted(UPSTREAM_ORDER + [7])[:n_val])):
        images, anns = [], []
        for k, i in enumerate(ids):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            (coco / f"{split}2014").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W, 3), k * 40, np.uint8)).save(coco / f"{split}2014" / name)
            images.append({"id": i, "file_name": name, "height": H, "width": W})
            side = 10 + k
            anns.append({"id": k + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "area": side * side,
                         "segmentation": [[2, 2, 2 + side, 2, 2 + side, 2 + side, 2, 2 + side]]})
        (coco / "annotations").mkdir(exist_ok=True)
        (coco / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return coco


def upstream_list(path, ids, split="val"):
    # PFENet/BAM lists/coco/*_data_list.txt: "<folder>/<image> <label>" relative to their data root
    path.write_text("".join(f"{split}2014/COCO_{split}2014_{i:012d}.jpg annotations/{split}2014/"
                            f"COCO_{split}2014_{i:012d}.png\n" for i in ids))
    return path


def test_prepare_coco_keeps_the_val_lists_order_and_records_it(tmp_path):
    coco = make_coco(tmp_path)
    lst = upstream_list(tmp_path / "val_data_list.txt", UPSTREAM_ORDER)
    out = tmp_path / "coco20i"
    assert main(["prepare", "coco", "--coco", str(coco), "--val-list", str(lst), "--out", str(out),
                 "--workers", "1"]) == 0
    names = [img for img, _ in read_list(out / "val.txt")]
    assert names == [f"val2014/COCO_val2014_{i:012d}.jpg" for i in UPSTREAM_ORDER]  # not sorted, 7 left out
    assert len(read_list(out / "train.txt")) == 2  # no train list: every train image, sorted
    record = json.loads((out / LIST_SOURCES).read_text())
    assert set(record) == {"val"} and record["val"]["file"] == "val_data_list.txt" and record["val"]["images"] == 4
    assert list_source(out, "val").startswith("val_data_list.txt (sha256 ") and list_source(out, "train") == ""

    # the class index, and so every "list"-order protocol (pfenet, bam), walks the queries in that order
    index = load_class_index(out, "val", 80)
    pool = make_pool(index, (1,), shot=1, min_pixels=1)
    eps = make_episodes(pool, benchmark="coco", fold=0, shot=1, seed=510, count=6, order="list",
                        query_list=list_source(out, "val"))
    order = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in UPSTREAM_ORDER]
    assert [e.query for e in eps.episodes] == order + order[:2]
    saved = EpisodeList.load(eps.save(tmp_path / "eps.json"))
    assert saved.query_list == eps.query_list and saved.fingerprint == eps.fingerprint
    assert json.loads((tmp_path / "eps.json").read_text())["query_list"].startswith("val_data_list.txt")


def test_an_episode_file_of_a_root_without_given_lists_is_unchanged(tmp_path):
    root = make_root(tmp_path / "pascal")
    ds = build_dataset(root=root, benchmark="pascal", fold=0, split="val", shot=1, num_episodes=3,
                       min_pixels=MIN_PX, order="list")
    assert ds.episodes.query_list == ""
    assert "query_list" not in json.loads(ds.episodes.save(tmp_path / "a.json").read_text())
    # a root prepared from a given list: build_episodic records it in the episodes it makes
    (root / LIST_SOURCES).write_text(json.dumps({"val": {"file": "val.txt", "sha256": "ab" * 32, "images": 60}}))
    ds = build_dataset(root=root, benchmark="pascal", fold=0, split="val", shot=1, num_episodes=3,
                       min_pixels=MIN_PX, order="list")
    assert ds.episodes.query_list == "val.txt (sha256 abababababab, 60 images)"


def test_a_list_naming_an_unknown_image_is_refused(tmp_path):
    coco = make_coco(tmp_path)
    lst = upstream_list(tmp_path / "train_data_list.txt", [1, 99], split="train")
    from svfseg.data.prepare import prepare_coco

    with pytest.raises(DataError, match=r"entry 2: expected an image of instances_train2014.json, found "
                                        r"'train2014/COCO_train2014_000000000099.jpg'"):
        prepare_coco(coco, tmp_path / "out", train_list=lst, workers=1)
    assert not (tmp_path / "out").exists()
