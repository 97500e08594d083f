"""Episode pools (dagger / pfenet), seeded episodes, episode files, and the dataset items."""
import numpy as np
import pytest
import torch
from PIL import Image

from svfseg.data import DataError, EpisodeList, build_dataset, collate_episodes, load_class_index, make_episodes
from svfseg.data.episodes import PROTOCOLS, make_pool
from svfseg.data.io import write_label

MIN_PX = 50


def _write(root, name, blocks, size=(48, 40), seed=0):
    """Image + label with one square block per (class, side) in ``blocks``."""
    h, w = size
    lbl = np.zeros((h, w), np.uint8)
    y = 0
    for c, side in blocks:
        lbl[y:y + side, :side] = c
        y += side
    lbl[-1, :] = 255
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    write_label(root / "SegmentationClassAug" / f"{name}.png", lbl)
    return f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n"


def make_root(root, *, extra_train=(), val_per_class=3, changed=False):
    """Tiny Pascal root: every class in 4 train images, ``val_per_class`` val images, plus ``extra_train``."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    lines = {"train": [], "val": []}
    for i in range(40):  # two classes of the same fold group per image, each class in 4 images
        a = i % 20 + 1
        b = (a - 1) // 5 * 5 + a % 5 + 1
        lines["train"].append(_write(root, f"tr{i:03d}", [(a, 10), (b, 10)], seed=i))
    for name, blocks in extra_train:
        lines["train"].append(_write(root, name, blocks))
    k = 0
    for c in range(1, 21):
        for j in range(val_per_class):
            side = 9 if (changed and k == 0) else 10
            lines["val"].append(_write(root, f"va{k:03d}", [(c, side), ((c % 20) + 1, 3)], seed=100 + k))
            k += 1
    for split, ls in lines.items():
        (root / f"{split}.txt").write_text("".join(ls))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    extra = [("base_only", [(6, 10)]), ("with_novel", [(6, 10), (1, 10)]), ("tiny_novel", [(7, 10), (2, 1)]),
             ("small_base", [(8, 5)])]
    return make_root(tmp_path_factory.mktemp("pascal"), extra_train=extra)


def _names(pool):
    return {pool.index.records[q].name for q in pool.queries}


def test_dagger_and_pfenet_pools(root):
    idx = load_class_index(root, "train", 20)
    base, novel = tuple(range(6, 21)), (1, 2, 3, 4, 5)
    dagger = make_pool(idx, base, shot=1, min_pixels=MIN_PX, exclude_any=novel)
    pfenet = make_pool(idx, base, shot=1, min_pixels=MIN_PX)
    assert "base_only" in _names(dagger) and "base_only" in _names(pfenet)
    # any novel pixel (even 1x1, below the size rule) drops the image under dagger
    assert {"with_novel", "tiny_novel"} & _names(dagger) == set()
    assert {"with_novel", "tiny_novel"} <= _names(pfenet)
    assert "small_base" not in _names(pfenet)  # 25 px < MIN_PX: not a query for its class
    assert _names(dagger) < _names(pfenet)
    for qp, q in enumerate(pfenet.queries):
        assert set(pfenet.query_classes[qp]) <= set(base)
        for c in pfenet.query_classes[qp]:
            assert idx.records[q].counts[c] >= MIN_PX


def test_val_episodes_deterministic_and_valid(root):
    kw = dict(root=root, benchmark="pascal", fold=1, split="val", shot=2, min_pixels=MIN_PX, num_episodes=40)
    a, b = build_dataset(seed=5, **kw), build_dataset(seed=5, **kw)
    c = build_dataset(seed=6, **kw)
    assert a.episodes.episodes == b.episodes.episodes and a.episodes.fingerprint == b.episodes.fingerprint
    assert a.episodes.episodes != c.episodes.episodes
    idx = load_class_index(root, "val", 20)
    pos = idx.position()
    for ep in a.episodes:
        assert ep.class_id in (6, 7, 8, 9, 10)
        assert ep.query not in ep.supports and len(set(ep.supports)) == 2
        for s in ep.supports:
            assert idx.records[pos[s]].counts.get(ep.class_id, 0) >= MIN_PX
        # upstream rule (default): the query may be about a class of any size it shows
        assert idx.records[pos[ep.query]].counts.get(ep.class_id, 0) > 0
    # the 3x3 (9 px) second class of the val images is asked about too
    assert any(idx.records[pos[ep.query]].counts[ep.class_id] < MIN_PX for ep in a.episodes)
    legacy = build_dataset(seed=5, query_rule="min_pixels", **kw)
    assert all(idx.records[pos[ep.query]].counts[ep.class_id] >= MIN_PX for ep in legacy.episodes)
    # longer lists extend shorter ones
    short = build_dataset(seed=5, **{**kw, "num_episodes": 10})
    assert short.episodes.episodes == a.episodes.episodes[:10]


def test_val_items(root):
    ds = build_dataset(root=root, benchmark="pascal", fold=0, split="val", shot=2, min_pixels=MIN_PX,
                       num_episodes=6, test_size=64)
    it = ds[0]
    assert it["query_img"].shape == (3, 64, 64) and it["query_img"].dtype == torch.float32
    assert it["query_mask"].shape == (64, 64) and it["query_mask"].dtype == torch.long
    assert it["support_imgs"].shape == (2, 3, 64, 64) and it["support_masks"].shape == (2, 64, 64)
    assert it["query_label_orig"].shape == (48, 40)
    assert it["query_valid_hw"] == (64, 53)
    for m in (it["query_mask"], it["support_masks"], it["query_label_orig"]):
        assert set(torch.unique(m).tolist()) <= {0, 1, 255}
    assert (it["support_masks"] == 1).flatten(1).sum(1).min() > 0  # supports always show the class
    assert (it["query_mask"][:, 53:] == 255).all()  # padding is ignored
    assert isinstance(it["class_id"], int) and it["query_name"].startswith("va")
    batch = collate_episodes([ds[0], ds[1]])
    assert batch["query_img"].shape == (2, 3, 64, 64) and batch["query_valid_hw"].shape == (2, 2)
    assert len(batch["query_label_orig"]) == 2


def test_train_items_seeded_by_seed_epoch_index(root):
    kw = dict(root=root, benchmark="pascal", fold=0, split="train", shot=1, min_pixels=MIN_PX, train_crop=32)
    a, b = build_dataset(seed=1, **kw), build_dataset(seed=1, **kw)
    assert len(a) == len(a.pool.queries)
    x, y = a[3], b[3]
    assert torch.equal(x["query_img"], y["query_img"]) and x["support_names"] == y["support_names"]
    assert x["query_img"].shape == (3, 32, 32) and x["support_masks"].shape == (1, 32, 32)
    assert x["class_id"] in range(6, 21)
    a.set_epoch(1)
    assert not torch.equal(a[3]["query_img"], x["query_img"])
    a.set_epoch(0)
    assert torch.equal(a[3]["query_img"], x["query_img"])  # item order/workers do not matter
    names = {a[i]["query_name"] for i in range(len(a))}
    assert "with_novel" not in names and "tiny_novel" not in names
    for i in range(len(a)):
        assert a[i]["query_name"] not in a[i]["support_names"]
    pf = build_dataset(seed=1, protocol="pfenet", **kw)
    assert len(pf) == len(a) + 2


def test_episode_file_roundtrip_and_mismatch(root, tmp_path):
    ds = build_dataset(root=root, benchmark="pascal", fold=2, split="val", shot=1, min_pixels=MIN_PX, num_episodes=12)
    path = ds.episodes.save(tmp_path / "eps.json")
    loaded = EpisodeList.load(path)
    assert loaded == ds.episodes and loaded.fingerprint == ds.episodes.fingerprint
    again = build_dataset(root=root, benchmark="pascal", fold=2, split="val", shot=1, min_pixels=MIN_PX,
                          episodes=path, seed=99)
    assert again.episodes.episodes == ds.episodes.episodes
    with pytest.raises(DataError, match="asked for"):
        build_dataset(root=root, benchmark="pascal", fold=1, split="val", shot=1, min_pixels=MIN_PX, episodes=path)
    # a dataset whose labels differ (one val mask changed) refuses the file
    other = make_root(tmp_path / "other", changed=True)
    with pytest.raises(DataError, match="episodes were made from dataset"):
        build_dataset(root=other, benchmark="pascal", fold=2, split="val", shot=1, min_pixels=MIN_PX, episodes=path)
    # an edited file is detected
    text = path.read_text().replace('"seed": 0', '"seed": 1')
    (tmp_path / "edited.json").write_text(text)
    with pytest.raises(DataError, match="fingerprint mismatch"):
        EpisodeList.load(tmp_path / "edited.json")


def test_make_episodes_is_pure(root):
    idx = load_class_index(root, "val", 20)
    pool = make_pool(idx, (11, 12, 13, 14, 15), shot=1, min_pixels=MIN_PX)
    e1 = make_episodes(pool, benchmark="pascal", fold=2, shot=1, seed=3, count=25)
    np.random.seed(0)  # the global RNG must not matter
    e2 = make_episodes(pool, benchmark="pascal", fold=2, shot=1, seed=3, count=25)
    assert e1 == e2
    queries = [e.query for e in e1]
    assert len(set(queries[:len(pool)])) == len(pool)  # each pass visits every query once


def test_protocol_presets():
    assert PROTOCOLS["pfenet"].runs("pascal") == [(321, 5000)]
    assert PROTOCOLS["pfenet"].runs("coco") == [(321, 20000)]
    assert len(PROTOCOLS["bam"].runs("pascal")) == 5 and {n for _, n in PROTOCOLS["bam"].runs("coco")} == {1000}
    # BAM's test.py: np.random.seed(123); seed_array = np.random.randint(0, 1000, 5)
    assert [s for s, _ in PROTOCOLS["bam"].runs("pascal")] == [510, 365, 382, 322, 988]
    assert list(np.random.RandomState(123).randint(0, 1000, 5)) == [510, 365, 382, 322, 988]
    assert PROTOCOLS["hsnet"].runs("pascal") == [(0, 1000)]


def test_bad_arguments_and_empty_class(root, tmp_path):
    with pytest.raises(ValueError, match="split"):
        build_dataset(root=root, benchmark="pascal", fold=0, split="test", shot=1)
    with pytest.raises(ValueError, match="split='val'"):
        build_dataset(root=root, benchmark="pascal", fold=0, split="train", shot=1, episodes="eps.json")
    with pytest.raises(ValueError, match="protocol"):
        build_dataset(root=root, benchmark="pascal", fold=0, split="train", shot=1, protocol="x")
    with pytest.raises(DataError, match="expected a dataset root"):
        build_dataset(root=tmp_path / "nope", benchmark="pascal", fold=0, split="val", shot=1)
    # 3 val images per class: 5-shot episodes cannot be made -> an error naming the classes
    with pytest.raises(DataError, match="need >= 6 images per class"):
        build_dataset(root=root, benchmark="pascal", fold=0, split="val", shot=5, min_pixels=MIN_PX)
    # the default 2,048-px rule empties every class of this 48x40 dataset
    with pytest.raises(DataError, match=">= 2048 px"):
        build_dataset(root=root, benchmark="pascal", fold=0, split="val", shot=1)
