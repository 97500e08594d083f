"""Paired transforms: image and mask stay aligned, padding is mean/255, crops keep the foreground, seeding."""
import cv2
import numpy as np
import pytest

from svfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, normalize
from svfseg.data.transforms import TestTransform as EvalTransform  # not collected as a test class


def pattern(h=120, w=90, seed=0):
    """Label of random big blocks (0/1); the image encodes the label (1 -> bright, 0 -> dark)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 2, (h // 15 + 1, w // 15 + 1)).astype(np.uint8)
    label = np.kron(coarse, np.ones((15, 15), np.uint8))[:h, :w]
    image = np.repeat((label * 200 + 20)[..., None], 3, 2).astype(np.uint8)
    return image, label


def unnorm(img):
    return (img.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN)[..., 0] * 255


@pytest.mark.parametrize("seed", range(6))
def test_train_chain_keeps_alignment(seed):
    image, label = pattern(seed=seed)
    t = TrainTransform(crop=80, scale=(0.8, 1.25), p_rotate=1.0, p_blur=0.5, p_flip=0.5)
    img, lbl = t(image, label, np.random.default_rng(seed))
    assert img.shape == (3, 80, 80) and img.dtype == np.float32 and lbl.shape == (80, 80) and lbl.dtype == np.int64
    v = unnorm(img)
    fg, bg = v[lbl == 1], v[lbl == 0]
    # interpolation/blur only touch block edges: nearly every pixel agrees with its label
    assert (fg > 120).mean() > 0.93 and (bg < 120).mean() > 0.93
    # only rotation/padding makes 255 here: away from content (blur, interpolation) the image is the mean
    pad = cv2.erode((lbl == 255).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    if pad.any():
        assert np.abs(img[:, pad]).max() < 1e-4


def test_flip_and_rotation_move_image_and_mask_together():
    image, label = pattern(60, 60, seed=3)
    t = TrainTransform(crop=60, scale=(1.0, 1.0), p_rotate=0.0, p_blur=0.0, p_flip=1.0)
    img, lbl = t(image, label, np.random.default_rng(0))
    assert np.array_equal(lbl, label[:, ::-1])
    assert np.allclose(unnorm(img), image[:, ::-1, 0], atol=1e-3)


def test_seeded_and_no_global_rng():
    image, label = pattern(seed=1)
    t = TrainTransform(crop=64)
    np.random.seed(1)
    a = t(image, label, np.random.default_rng(7))
    np.random.seed(2)
    b = t(image, label, np.random.default_rng(7))
    c = t(image, label, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_crop_keeps_the_foreground():
    label = np.zeros((600, 600), np.uint8)
    label[300:340, 300:340] = 1  # a 200 crop keeps this object with probability ~0.16 per blind try
    image = np.repeat((label * 200 + 20)[..., None], 3, 2).astype(np.uint8)

    def success_rate(tries):
        t = TrainTransform(crop=200, scale=(1.0, 1.0), p_rotate=0.0, crop_tries=tries)
        kept = [(t(image, label, np.random.default_rng(s))[1] == 1).sum() for s in range(30)]
        return np.mean([k >= 0.85 * 1600 for k in kept])

    assert success_rate(30) >= 0.9
    assert success_rate(1) <= 0.5


def test_small_image_is_padded_centred():
    image, label = pattern(40, 30)
    img, lbl = TrainTransform(crop=64, scale=(1, 1), p_rotate=0, p_blur=0, p_flip=0)(image, label,
                                                                                     np.random.default_rng(0))
    assert (lbl[:12] == 255).all() and (lbl[-12:] == 255).all() and (lbl[:, :17] == 255).all()
    assert np.array_equal(lbl[12:52, 17:47], label)
    assert np.abs(img[:, :12]).max() == 0.0


def test_test_chain_resize_pad_and_valid_extent():
    image, label = pattern(100, 50)
    img, lbl, valid = EvalTransform(size=64)(image, label)
    assert valid == (64, 32) and img.shape == (3, 64, 64) and lbl.shape == (64, 64)
    assert (lbl[:, 32:] == 255).all() and np.abs(img[:, :, 32:]).max() == 0.0
    v = unnorm(img)[:, :32]
    inner = lbl[:, :32]
    assert (v[inner == 1] > 120).mean() > 0.95 and (v[inner == 0] < 120).mean() > 0.95
    img2, lbl2, valid2 = EvalTransform(size=64)(*pattern(30, 60))  # upscaling too
    assert valid2 == (32, 64) and (lbl2[32:] == 255).all()


def test_normalize_matches_imagenet():
    x = np.full((2, 2, 3), 255, np.uint8)
    assert np.allclose(normalize(x)[0, 0], (1 - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-6)


def test_size_mismatch_is_an_error():
    image, label = pattern(40, 30)
    with pytest.raises(ValueError, match="sizes differ"):
        EvalTransform(size=64)(image, label[:-1])
    with pytest.raises(ValueError, match="sizes differ"):
        TrainTransform(crop=32)(image, label[:, :-1], np.random.default_rng(0))
