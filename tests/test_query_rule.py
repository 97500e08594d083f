"""The query-class rule: upstream's "any size" rule vs the size rule, and its record in episode files."""
import json

import numpy as np
import pytest

from svfseg.data import EpisodeList, make_episodes, make_pool
from svfseg.data.episodes import DEFAULT_MIN_PIXELS
from svfseg.data.index import ClassIndex, ImageRecord


def _index(counts_per_image):
    recs = tuple(ImageRecord(f"JPEGImages/{i}.jpg", f"L/{i}.png", (100, 100), counts)
                 for i, counts in enumerate(counts_per_image))
    return ClassIndex(root=".", split="val", num_classes=20, records=recs, fingerprint="f" * 16)


# image 0 shows class 1 at 3,000 px and class 2 at 1,000 px (below 2*32*32 = 2,048);
# images 1-2 show class 1 large, images 3-4 class 2 large; image 5 shows only a small class 1.
IMAGES = [{1: 3000, 2: 1000}, {1: 4000}, {1: 2500}, {2: 5000}, {2: 2100}, {1: 900}]


def test_small_class_is_an_eligible_query_class_upstream():
    pool = make_pool(_index(IMAGES), (1, 2), shot=1)
    assert pool.min_pixels == DEFAULT_MIN_PIXELS == 2048 and pool.query_rule == "any"
    qc = dict(zip(pool.queries, pool.query_classes))
    assert qc[0] == (1, 2)  # the 1,000-px class may be the episode's class (PFENet/BAM)
    assert 5 not in qc  # no class reaches 2,048 px: the image is not in the list at all
    # supports keep the size rule: the 1,000-px image never supports class 2
    assert pool.class_images[2].tolist() == [3, 4] and pool.class_images[1].tolist() == [0, 1, 2]


def test_min_pixels_rule_keeps_the_old_behaviour():
    pool = make_pool(_index(IMAGES), (1, 2), shot=1, query_rule="min_pixels")
    assert dict(zip(pool.queries, pool.query_classes))[0] == (1,)
    with pytest.raises(ValueError, match="query_rule"):
        make_pool(_index(IMAGES), (1, 2), shot=1, query_rule="all")


def test_episode_files_record_the_rule(tmp_path):
    pool = make_pool(_index(IMAGES), (1, 2), shot=1)
    eps = make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=0, count=40)
    assert eps.query_rule == "any"
    assert any(e.query == "JPEGImages/0.jpg" and e.class_id == 2 for e in eps)
    path = eps.save(tmp_path / "eps.json")
    blob = json.loads(path.read_text())
    assert blob["query_rule"] == "any"
    assert EpisodeList.load(path) == eps
    # a file written before the rule was recorded loads as the rule that made it
    legacy = make_episodes(make_pool(_index(IMAGES), (1, 2), shot=1, query_rule="min_pixels"),
                           benchmark="pascal", fold=0, shot=1, seed=0, count=10)
    old = legacy.save(tmp_path / "old.json")
    blob = json.loads(old.read_text())
    assert "query_rule" not in blob  # the legacy rule's payload (and fingerprint) are as before
    blob["version"] = 1
    old.write_text(json.dumps(blob))
    loaded = EpisodeList.load(old)
    assert loaded.query_rule == "min_pixels" and loaded == legacy
    # the rule is part of the fingerprint
    assert eps.fingerprint != EpisodeList(**{**eps.__dict__, "query_rule": "min_pixels"}).fingerprint


def test_upstream_rule_draws_small_classes_uniformly():
    pool = make_pool(_index(IMAGES), (1, 2), shot=1)
    eps = make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=1, count=2000)
    classes = np.array([e.class_id for e in eps if e.query == "JPEGImages/0.jpg"])
    assert 0.4 < (classes == 2).mean() < 0.6


def _hand_built_root(root):
    """Pascal root, val split only: query q shows class 1 at 3,200 px and class 2 at 960 px (< 2,048);
    every fold-0 novel class also fills two other images at 2,400 px."""
    from PIL import Image

    from svfseg.data.io import write_label

    (root / "JPEGImages").mkdir()
    (root / "SegmentationClassAug").mkdir()
    lines = []

    def add(name, blocks):
        lbl = np.zeros((80, 80), np.uint8)
        y = 0
        for c, rows in blocks:  # full-width bands: `rows` x 80 px of class c
            lbl[y:y + rows] = c
            y += rows
        Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        write_label(root / "SegmentationClassAug" / f"{name}.png", lbl)
        lines.append(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n")

    add("q", [(1, 40), (2, 12)])
    for c in range(1, 6):
        add(f"s{c}a", [(c, 30)])
        add(f"s{c}b", [(c, 30)])
    (root / "val.txt").write_text("".join(lines))
    return root


def test_hand_built_label_small_class_is_asked_about(tmp_path):
    """End to end on label PNGs with the real 2,048-px rule: a 960-px class becomes a query class."""
    from svfseg.data import build_dataset

    root = _hand_built_root(tmp_path)
    kw = dict(root=root, benchmark="pascal", fold=0, split="val", shot=1, num_episodes=200)
    ds = build_dataset(**kw)
    asked = {e.class_id for e in ds.episodes if e.query == "JPEGImages/q.jpg"}
    assert asked == {1, 2}
    assert all("JPEGImages/q.jpg" not in e.supports for e in ds.episodes if e.class_id == 2)
    legacy = build_dataset(query_rule="min_pixels", **kw)
    assert {e.class_id for e in legacy.episodes if e.query == "JPEGImages/q.jpg"} == {1}


def test_config_key_reaches_the_episodes(tmp_path):
    from svfseg.config import ConfigError, load_config
    from svfseg.engine.data import eval_dataset
    from svfseg.engine.resolved import resolve_run

    root = _hand_built_root(tmp_path)
    base = [f"data.root={root}", "data.benchmark=pascal"]
    assert load_config(None, base).data.query_rule == "any"
    assert eval_dataset(resolve_run(load_config(None, base)), count=20).episodes.query_rule == "any"
    ds = eval_dataset(resolve_run(load_config(None, base + ["data.query_rule=min_pixels"])), count=20)
    assert ds.episodes.query_rule == "min_pixels" and ds.pool.query_rule == "min_pixels"
    with pytest.raises(ConfigError, match="'data.query_rule' must be one of"):
        load_config(None, ["data.query_rule=all"])
