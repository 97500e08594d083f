"""Paired image/mask transforms (training and test chains), seeded by a numpy Generator.

Backend: OpenCV. Measured on this project's 2-core CPU for a 500x375 RGB image through the
resize + rotate + 5x5 blur steps, cv2 took about a third of Pillow's time (Pillow also lacks a
fixed 5x5 Gaussian kernel); see benchmarks/bench_data.py for the chain's throughput.

The image is normalised (ImageNet mean/std) first, so every padding of the image is exactly 0
after normalisation, i.e. the mean colour; label padding is 255 (ignored).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from svfseg.labels import IGNORE_LABEL

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "to_chw", "TrainTransform", "TestTransform",
           "resize_longer", "upstream_test_size"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_SHIFT = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 ImageNet-normalised (H, W, 3)."""
    out = image.astype(np.float32)
    out *= _SCALE
    out += _SHIFT
    return out


def to_chw(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (H, W, 3) + uint8 (H, W) -> contiguous float32 (3, H, W) and int64 (H, W) arrays.

    Arrays, not tensors: the dataset stacks them in numpy and wraps the result once with
    ``torch.from_numpy`` (many tiny torch ops are slow in loader workers on a busy CPU).
    """
    return np.ascontiguousarray(image.transpose(2, 0, 1)), label.astype(np.int64)


def _resize(image, label, h, w):
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def resize_longer(image: np.ndarray, label: np.ndarray, size: int):
    """Resize so the longer side is ``size`` (aspect kept); image bilinear, label nearest."""
    h, w = label.shape
    s = size / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    return _resize(image, label, nh, nw)


def _pad_to(image, label, h, w, *, centred: bool):
    """Pad up to (h, w): image with 0 (= mean after normalisation), label with 255."""
    ph, pw = max(h - label.shape[0], 0), max(w - label.shape[1], 0)
    if ph == 0 and pw == 0:
        return image, label
    top, left = (ph // 2, pw // 2) if centred else (0, 0)
    border = (top, ph - top, left, pw - left)
    image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
    label = cv2.copyMakeBorder(label, *border, cv2.BORDER_CONSTANT, value=IGNORE_LABEL)
    return image, label


@dataclass(frozen=True)
class TrainTransform:
    """RandScale -> RandRotate -> GaussianBlur -> HFlip -> foreground-keeping crop -> tensors.

    Expects a binarised label (1 = episode class, 0 = rest, 255 = ignore): the crop retries up
    to ``crop_tries`` times to keep ``>= fg_keep`` of the label-1 pixels (else keeps the best try).

    Args:
        crop: output side (square).
        scale: RandScale range of the isotropic scale factor.
        rotate: RandRotate angle range in degrees; ``p_rotate`` its probability.
        blur_kernel: GaussianBlur kernel size; ``p_blur`` its probability.
        p_flip: horizontal flip probability.
    """

    crop: int = 473
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: tuple[float, float] = (-10.0, 10.0)
    p_rotate: float = 0.5
    blur_kernel: int = 5
    p_blur: float = 0.5
    p_flip: float = 0.5
    fg_keep: float = 0.85
    crop_tries: int = 30

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (H, W, 3) + uint8 label (H, W) -> (float32 (3, crop, crop), int64 (crop, crop))."""
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
        img = normalize(image)
        lbl = label
        s = rng.uniform(*self.scale)
        h, w = lbl.shape
        img, lbl = _resize(img, lbl, max(1, int(round(h * s))), max(1, int(round(w * s))))
        if rng.random() < self.p_rotate:
            angle = rng.uniform(*self.rotate)
            h, w = lbl.shape
            m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
            img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0))
            lbl = cv2.warpAffine(lbl, m, (w, h), flags=cv2.INTER_NEAREST,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_LABEL)
        if rng.random() < self.p_blur:
            img = cv2.GaussianBlur(img, (self.blur_kernel, self.blur_kernel), 0)
        if rng.random() < self.p_flip:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        img, lbl = self._crop(img, lbl, rng)
        return to_chw(img, lbl)

    def _crop(self, img, lbl, rng):
        img, lbl = _pad_to(img, lbl, self.crop, self.crop, centred=True)
        h, w = lbl.shape
        fg = lbl == 1
        total = int(fg.sum())
        best, best_fg = (0, 0), -1
        for _ in range(max(1, self.crop_tries)):
            y = int(rng.integers(h - self.crop + 1))
            x = int(rng.integers(w - self.crop + 1))
            if total == 0:
                best = (y, x)
                break
            kept = int(fg[y:y + self.crop, x:x + self.crop].sum())
            if kept > best_fg:
                best, best_fg = (y, x), kept
            if kept >= self.fg_keep * total:
                break
        y, x = best
        return img[y:y + self.crop, x:x + self.crop], lbl[y:y + self.crop, x:x + self.crop]


def upstream_test_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The resized (h, w) of PFENet/BAM/SVF's test ``Resize`` (their util/transform.py ``find_new_hw``).

    The longer side becomes ``size``, the shorter one ``int(side * size / longer)`` (truncated,
    not rounded), then both are floored to a multiple of 8 (at least 8 here, where upstream
    would reach 0 for images under 8 px). A square keeps ``size`` on the height only, as upstream.
    """
    if h >= w:
        ratio = size * 1.0 / h
        nh, nw = size, int(w * ratio)
    else:
        ratio = size * 1.0 / w
        nh, nw = int(h * ratio), size
    return max(8, nh // 8 * 8), max(8, nw // 8 * 8)


@dataclass(frozen=True)
class TestTransform:
    """Longer side to ``size`` (473 Pascal, 641 COCO), pad bottom/right to size x size.

    Returns the tensors and the un-padded (h, w) of the resized content (top-left aligned), so
    logits can be cropped to it and resized to the original label size.
    """

    size: int = 473
    #: PFENet/BAM's geometry: the short side truncated, both sides floored to a multiple of 8
    #: (:func:`upstream_test_size`), and the padding a raw 0 pixel (black after normalisation)
    #: instead of the mean colour.
    upstream: bool = False

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """uint8 RGB + uint8 label -> (image (3,S,S), label (S,S), (h, w) valid extent)."""
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
        if self.upstream:
            nh, nw = upstream_test_size(*label.shape, self.size)
            img, lbl = _resize(normalize(image), label, nh, nw)  # one resize, as upstream
        else:
            img, lbl = resize_longer(normalize(image), label, self.size)
        valid = (int(lbl.shape[0]), int(lbl.shape[1]))
        img, lbl = _pad_to(img, lbl, self.size, self.size, centred=False)
        if self.upstream:
            img[valid[0]:, :] = _SHIFT
            img[:, valid[1]:] = _SHIFT
        c_img, c_lbl = to_chw(img, lbl)
        return c_img, c_lbl, valid
