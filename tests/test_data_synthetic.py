"""synthetic-5i: determinism, caching, label format, readers on it, and the colour-only check."""
import json

import numpy as np
import pytest

from svfseg.data import DataError, build_dataset, generate_synthetic
from svfseg.data.splits import SYNTHETIC_CLASSES
from svfseg.data.synthetic import CLASS_NAMES, HUE_CENTRES, MARKER, render_image, scaled_min_pixels


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".svfseg_cache" not in p.parts}


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=3, n_train=60, n_val=10, size=64, workers=1)
    b = generate_synthetic(tmp_path / "b", seed=3, n_train=60, n_val=10, size=64, workers=2)
    c = generate_synthetic(tmp_path / "c", seed=4, n_train=60, n_val=10, size=64, workers=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 2 * 70 + 3 and fa == fb
    assert fa["JPEGImages/syn_train_00000.jpg"] != fc["JPEGImages/syn_train_00000.jpg"]
    assert json.loads(fa[MARKER])["fingerprint"] != json.loads(fc[MARKER])["fingerprint"]


def test_cached_reuse_and_regeneration(tmp_path):
    root = generate_synthetic(tmp_path / "s", n_train=4, n_val=3, size=48, workers=1)
    stamp = (root / "JPEGImages" / "syn_val_00000.jpg").stat().st_mtime_ns
    assert generate_synthetic(root, n_train=4, n_val=3, size=48, workers=1) == root
    assert (root / "JPEGImages" / "syn_val_00000.jpg").stat().st_mtime_ns == stamp  # reused, not rewritten
    generate_synthetic(root, n_train=5, n_val=3, size=48, workers=1)  # other params: regenerated in place
    assert len((root / "train.txt").read_text().splitlines()) == 5
    assert json.loads((root / MARKER).read_text())["min_pixels"] == scaled_min_pixels(48)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not overwriting"):
        generate_synthetic(tmp_path / "foreign", n_train=2, n_val=2, size=48)


def test_render_format():
    assert CLASS_NAMES == SYNTHETIC_CLASSES and scaled_min_pixels(160) == 234 and scaled_min_pixels(473) == 2048
    n_classes, sizes = [], []
    for i in range(40):
        img, lbl = render_image(0, "train", i, 96)
        assert img.dtype == np.uint8 and img.shape[:2] == lbl.shape and max(lbl.shape) == 96
        assert min(lbl.shape) >= 72
        vals = set(np.unique(lbl).tolist())
        assert vals <= set(range(21)) | {255} and 255 in vals and 0 in vals
        cls = vals - {0, 255}
        assert len(cls) in (1, 2, 3)
        n_classes.append(len(cls))
        sizes += [int((lbl == c).sum()) for c in cls]
        # the 255 band separates objects from background: no object pixel touches a background pixel
        fg = (lbl > 0) & (lbl < 255)
        assert not (fg[:, 1:] & (lbl[:, :-1] == 0)).any() and not (fg[1:] & (lbl[:-1] == 0)).any()
    assert len(set(n_classes)) == 3  # 1, 2 and 3 objects all occur
    assert np.median(sizes) > 4 * scaled_min_pixels(96)  # most objects pass the small-object rule easily
    img2, lbl2 = render_image(0, "train", 0, 96)
    assert np.array_equal(img2, render_image(0, "train", 0, 96)[0])
    assert not np.array_equal(img2, render_image(0, "val", 0, 96)[0])


def test_readers_run_on_synthetic(tmp_path):
    root = generate_synthetic(tmp_path / "s", n_train=60, n_val=60, size=96, workers=1)
    tr = build_dataset(root=root, benchmark="synthetic", fold=0, split="train", shot=1, train_crop=96)
    va = build_dataset(root=root, benchmark="synthetic", fold=3, split="val", shot=1, test_size=96,
                       num_episodes=20)
    assert 0 < len(tr) < 60 and len(va) == 20
    it = tr[0]
    assert it["class_id"] in range(6, 21) and it["query_img"].shape == (3, 96, 96)
    assert all(16 <= va[i]["class_id"] <= 20 for i in range(5))


# ---- colour-only check ------------------------------------------------------------------------------
# A per-pixel colour classifier over the 20 foreground classes (chance 5%) is trained on the
# pixels of some images and tested on others. If classes had their own colours it would be
# near-perfect (the control below reaches > 90% on a colour-coded copy of the same pixels).
# Bound: colour must explain at most a quarter of the foreground pixels (< 25% accuracy, i.e.
# at most 5x chance). A few-shot model has to rely on shape and texture to do better.

def _pixels(split, n, size=96, per_img=120, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        img, lbl = render_image(0, split, i, size)
        r, c = np.nonzero((lbl > 0) & (lbl < 255))
        sel = rng.choice(len(r), min(per_img, len(r)), replace=False)
        xs.append(img[r[sel], c[sel]] / 255.0)
        ys.append(lbl[r[sel], c[sel]].astype(int) - 1)
    return np.concatenate(xs), np.concatenate(ys)


def _gaussian_accuracy(xtr, ytr, xte, yte):
    """Quadratic discriminant on RGB: one full-covariance Gaussian per class (closed form, no iterations)."""
    scores = []
    for c in range(20):
        x = xtr[ytr == c]
        mu, cov = x.mean(0), np.cov(x.T) + 1e-4 * np.eye(3)
        d = xte - mu
        scores.append(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) - 0.5 * np.linalg.slogdet(cov)[1]
                      + np.log(len(x) / len(xtr)))
    return float((np.argmax(scores, 0) == yte).mean())


def _nearest_mean_accuracy(xtr, ytr, xte, yte):
    means = np.stack([xtr[ytr == c].mean(0) for c in range(20)])
    return float((((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1) == yte).mean())


@pytest.fixture(scope="module")
def pixels():
    return _pixels("train", 150), _pixels("val", 60)


def test_colour_alone_does_poorly(pixels):
    (xtr, ytr), (xte, yte) = pixels
    assert len(np.unique(ytr)) == 20
    assert _nearest_mean_accuracy(xtr, ytr, xte, yte) < 0.2
    assert _gaussian_accuracy(xtr, ytr, xte, yte) < 0.25


def test_colour_probe_detects_colour_coded_classes(pixels):
    """Control: the same probe on pixels recoloured by class hue succeeds, so the bound above can fail."""
    import colorsys

    (xtr, ytr), (xte, yte) = pixels
    rng = np.random.default_rng(0)

    def recolour(y):
        base = np.array([colorsys.hsv_to_rgb(HUE_CENTRES[c], 0.8, 0.8) for c in range(20)])
        return np.clip(base[y] + rng.normal(0, 0.02, (len(y), 3)), 0, 1)

    assert _gaussian_accuracy(recolour(ytr), ytr, recolour(yte), yte) > 0.9
    assert _nearest_mean_accuracy(recolour(ytr), ytr, recolour(yte), yte) > 0.9
