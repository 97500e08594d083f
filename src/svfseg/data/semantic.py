"""Base-class semantic segmentation data for BAM's stage 1: labels 0..num_base, novel pixels -> background."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from svfseg.data.episodes import TRAIN_PROTOCOLS
from svfseg.data.index import ClassIndex, load_class_index
from svfseg.data.io import IGNORE, DataError
from svfseg.data.pascal import load_pair
from svfseg.data.splits import class_split, num_classes
from svfseg.data.transforms import TestTransform, TrainTransform

__all__ = ["base_label_lut", "remap_label", "SemanticBaseDataset", "collate_semantic", "build_semantic_dataset",
           "generalized_episodes", "GeneralizedEpisodes", "build_generalized_dataset"]

log = logging.getLogger(__name__)


def base_label_lut(base_classes: Sequence[int], num_benchmark_classes: int) -> np.ndarray:
    """Look-up table (256,) uint8: base class ``sorted(base)[i]`` -> ``i + 1``; 255 -> 255; others -> 0.

    Channel order is BAM's: base classes in increasing benchmark id, background 0.

    Args:
        base_classes: Benchmark ids of the base classes (1-based).
        num_benchmark_classes: Largest valid benchmark id (20 Pascal, 80 COCO).
    """
    base = sorted(int(c) for c in base_classes)
    if not base or base[0] < 1 or base[-1] > num_benchmark_classes or len(set(base)) != len(base):
        raise ValueError(f"base_classes must be distinct ids in 1..{num_benchmark_classes}, got {list(base_classes)}")
    lut = np.zeros(256, dtype=np.uint8)
    lut[base] = np.arange(1, len(base) + 1, dtype=np.uint8)
    lut[IGNORE] = IGNORE
    return lut


def remap_label(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Apply :func:`base_label_lut` to a class-id label (H, W) uint8."""
    return lut[label]


class SemanticBaseDataset(Dataset):
    """Images with multi-class labels over background + the base classes of a fold.

    Reads the prepared Pascal-layout root (list file, class-id PNGs, the cached class index).
    Novel-class pixels become background (0), base class ``c`` becomes its channel
    ``1 + rank of c among the base classes``, 255 stays ignored.

    Training items (``train=True``) go through :class:`TrainTransform` with a plain random crop
    (BAM's base stage does not keep a foreground class in the crop), seeded by
    ``(seed, epoch, index)``; call :meth:`set_epoch`. Eval items go through
    :class:`TestTransform` and also carry ``label_orig`` (the remapped label at the original
    size) and ``valid_hw`` (the un-padded extent of the resized image).

    Items: ``image`` float (3, H, W), ``label`` long (H, W) in {0..num_base, 255}, ``name`` str.

    Args:
        index: Class index of the split (``load_class_index``).
        base_classes: Benchmark ids of the base classes.
        train: Training chain (random) or test chain (deterministic).
        keep: Positions in ``index.records`` to use (default all).
        seed: Seed of the training augmentation.
        transform: A :class:`TrainTransform` (train) or :class:`TestTransform` (eval).
    """

    def __init__(self, index: ClassIndex, base_classes: Sequence[int], *, train: bool,
                 keep: Sequence[int] | None = None, seed: int = 0,
                 transform: TrainTransform | TestTransform | None = None):
        self.index = index
        self.root = Path(index.root)
        self.base_classes = tuple(sorted(int(c) for c in base_classes))
        self.lut = base_label_lut(self.base_classes, index.num_classes)
        self.train = bool(train)
        self.positions = tuple(range(len(index.records))) if keep is None else tuple(int(i) for i in keep)
        if not self.positions:
            raise DataError(f"{self.root} ({index.split}): no image left for base-class segmentation")
        self.seed = int(seed)
        self.epoch = 0
        if transform is None:
            transform = TrainTransform(fg_keep=0.0, crop_tries=1) if train else TestTransform()
        if train != isinstance(transform, TrainTransform):
            want = "TrainTransform" if train else "TestTransform"
            raise TypeError(f"SemanticBaseDataset(train={train}) needs a {want}, "
                            f"got {type(transform).__name__}")
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Output classes of the segmenter: background + base classes."""
        return len(self.base_classes) + 1

    def __len__(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation the next items use."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range 0..{len(self) - 1}")
        r = self.index.records[self.positions[i]]
        img, lbl = load_pair(self.root, r.image, r.label)
        lbl = remap_label(lbl, self.lut)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image, label = self.transform(img, lbl, rng)
            return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "name": r.name}
        image, label, valid = self.transform(img, lbl)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "name": r.name,
                "label_orig": torch.from_numpy(lbl.astype(np.int64)), "valid_hw": valid}


def collate_semantic(batch: list[dict]) -> dict:
    """Stack images and labels; names, and for eval the original-size labels, stay lists."""
    out = {"image": torch.stack([b["image"] for b in batch]), "label": torch.stack([b["label"] for b in batch]),
           "name": [b["name"] for b in batch]}
    if "label_orig" in batch[0]:
        out["label_orig"] = [b["label_orig"] for b in batch]
        out["valid_hw"] = torch.tensor([b["valid_hw"] for b in batch], dtype=torch.long)
    return out


def build_semantic_dataset(*, root: str | os.PathLike, benchmark: str, fold: int, split: str, seed: int = 0,
                           protocol: str = "pfenet", convention: str = "interleaved", train_crop: int = 417,
                           train_scale: Sequence[float] = (0.5, 2.0), test_size: int = 417,
                           workers: int | None = None) -> SemanticBaseDataset:
    """Stage-1 (base learner) data of a fold.

    Args:
        root: Prepared Pascal-layout root.
        benchmark: "pascal", "coco" or "synthetic".
        fold: 0..3 (decides which classes are base).
        split: "train" (random augmentation) or "val" (test chain, original-size labels).
        seed: Augmentation seed (train).
        protocol: "pfenet" keeps every image of the list with novel pixels as background (what
            BAM's base stage does); "dagger" drops images that show any novel class (training
            split only; validation always uses every image).
        convention: COCO fold convention.
        train_crop, train_scale: Training crop side and RandScale range (BAM: 417, 0.5-2.0).
        test_size: Longer side at evaluation.
        workers: Processes for a first-time class-index scan.

    Returns:
        A :class:`SemanticBaseDataset`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if protocol not in TRAIN_PROTOCOLS:
        raise ValueError(f"protocol must be one of {TRAIN_PROTOCOLS}, got {protocol!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset root folder, found none")
    sp = class_split(benchmark, fold, convention)
    index = load_class_index(root, split, num_classes(benchmark), workers=workers)
    keep = None
    if split == "train" and protocol == "dagger":
        novel = set(sp.novel)
        keep = [i for i, r in enumerate(index.records) if not novel.intersection(r.counts)]
    if split == "train":
        tr = TrainTransform(crop=train_crop, scale=(float(train_scale[0]), float(train_scale[1])), fg_keep=0.0,
                            crop_tries=1)
        ds = SemanticBaseDataset(index, sp.base, train=True, keep=keep, seed=seed, transform=tr)
    else:
        ds = SemanticBaseDataset(index, sp.base, train=False, transform=TestTransform(size=test_size))
    log.info("%s fold %d %s base-class segmentation: %d images, %d classes (background + %d base)", benchmark, fold,
             split, len(ds), ds.num_classes, len(sp.base))
    return ds


# ---------------------------------------------------------------------------- generalized setting


def generalized_episodes(index: ClassIndex, *, benchmark: str, fold: int, shot: int, seed: int = 0,
                         convention: str = "interleaved", min_pixels: int | None = None, count: int | None = None):
    """BAM's generalized few-shot episodes: every val image once, base and novel classes together.

    For each image (list order) with at least one labelled class: if it shows a base class, the
    episode's novel class is drawn uniformly among all novel classes of the fold (it may be
    absent from the image); otherwise among the novel classes it shows. Supports: ``shot``
    other images where that class covers ``>= min_pixels`` pixels (the small-object rule; BAM
    accepts any pixel count). Randomness: ``numpy.random.default_rng(seed)``. ``count`` keeps
    only the first episodes (quick checks); None keeps one per image.

    Returns:
        An :class:`~svfseg.data.episodes.EpisodeList` (split "val").
    """
    from svfseg.data.build import default_min_pixels
    from svfseg.data.episodes import Episode, EpisodeList

    sp = class_split(benchmark, fold, convention)
    if min_pixels is None:
        min_pixels = default_min_pixels(index.root, benchmark)
    recs = index.records
    holders = {c: [i for i, r in enumerate(recs) if r.counts.get(c, 0) >= min_pixels] for c in sp.novel}
    short = {c: len(v) for c, v in holders.items() if len(v) < shot + 1}
    if short:
        raise DataError(f"{index.root} (val): generalized {shot}-shot episodes need >= {shot + 1} images per novel "
                        f"class with >= {min_pixels} px; found class:count {short}")
    rng = np.random.default_rng(seed)
    base, novel = set(sp.base), list(sp.novel)
    eps = []
    for i, r in enumerate(recs):
        present = set(r.counts)
        if not present:
            continue
        choices = novel if present & base else sorted(present & set(novel))
        c = int(choices[int(rng.integers(len(choices)))])
        cand = np.asarray([j for j in holders[c] if j != i])
        sup = rng.choice(cand, size=shot, replace=False)
        eps.append(Episode(r.image, c, tuple(recs[int(j)].image for j in sup)))
        if count is not None and len(eps) >= count:
            break
    return EpisodeList(benchmark, index.split, fold, shot, seed, convention, int(min_pixels), index.fingerprint,
                       tuple(eps))


class GeneralizedEpisodes(Dataset):
    """Episodes of the generalized setting, scored over base + novel classes at once.

    Items are those of :class:`~svfseg.data.pascal.EvalEpisodes` (binary masks of the episode's
    novel class, test chain), except ``query_label_orig``: base class ``c`` -> its
    channel ``1..num_base``, the episode's novel class -> ``num_base + 1``, other novel classes
    -> 0, 255 kept (BAM's generalized labels).

    Args:
        index: Val class index.
        episodes: From :func:`generalized_episodes`.
        base_classes: Base classes of the fold.
        transform: Test chain.
    """

    def __init__(self, index: ClassIndex, episodes, base_classes: Sequence[int], *,
                 transform: TestTransform | None = None):
        from svfseg.data.pascal import binarize

        episodes.check_dataset(index.fingerprint)
        self.index, self.episodes, self.root = index, episodes, Path(index.root)
        self.base_classes = tuple(sorted(int(c) for c in base_classes))
        self.lut = base_label_lut(self.base_classes, index.num_classes)
        self.transform = transform or TestTransform()
        self._pos = index.position()
        self._binarize = binarize

    def __len__(self) -> int:
        return len(self.episodes)

    def _load(self, image: str):
        r = self.index.records[self._pos[image]]
        return r, *load_pair(self.root, r.image, r.label)

    def __getitem__(self, i: int) -> dict:
        ep = self.episodes[i]
        qr, img, lbl = self._load(ep.query)
        label = remap_label(lbl, self.lut)
        label[lbl == ep.class_id] = len(self.base_classes) + 1
        q_img, q_mask, valid = self.transform(img, self._binarize(lbl, ep.class_id))
        s_imgs, s_masks = [], []
        for s in ep.supports:
            _, simg, slbl = self._load(s)
            a, b, _ = self.transform(simg, self._binarize(slbl, ep.class_id))
            s_imgs.append(a)
            s_masks.append(b)
        return {"query_img": torch.from_numpy(q_img), "query_mask": torch.from_numpy(q_mask),
                "support_imgs": torch.from_numpy(np.stack(s_imgs)),
                "support_masks": torch.from_numpy(np.stack(s_masks)), "class_id": ep.class_id, "query_name": qr.name,
                "support_names": [Path(s).stem for s in ep.supports],
                "query_label_orig": torch.from_numpy(label.astype(np.int64)), "query_valid_hw": valid}


def build_generalized_dataset(*, root: str | os.PathLike, benchmark: str, fold: int, shot: int, seed: int = 0,
                              convention: str = "interleaved", test_size: int = 473,
                              count: int | None = None) -> GeneralizedEpisodes:
    """Generalized-setting evaluation episodes on the val split (see :func:`generalized_episodes`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset root folder, found none")
    index = load_class_index(root, "val", num_classes(benchmark))
    eps = generalized_episodes(index, benchmark=benchmark, fold=fold, shot=shot, seed=seed, convention=convention,
                               count=count)
    log.info("%s fold %d generalized: %d episodes", benchmark, fold, len(eps))
    return GeneralizedEpisodes(index, eps, class_split(benchmark, fold, convention).base,
                               transform=TestTransform(size=test_size))
