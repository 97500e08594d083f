"""Base-class semantic segmentation data (BAM's stage 1): labels 0..num_base, novel pixels -> background."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from svfseg.data.benchmark import Benchmark, DataSettings, check_root_dir
from svfseg.data.episodes import TRAIN_PROTOCOLS
from svfseg.data.index import ClassIndex, load_class_index
from svfseg.data.io import DataError
from svfseg.data.episodic import load_pair
from svfseg.data.transforms import TestTransform, TrainTransform
from svfseg.labels import IGNORE_LABEL

__all__ = ["base_label_lut", "remap_label", "SemanticBaseDataset", "collate_semantic", "build_semantic_dataset",
           "build_semantic"]

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
    lut[IGNORE_LABEL] = IGNORE_LABEL
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
    """Stage-1 (base learner) data of a fold (the keyword form of :func:`build_semantic`).

    Args:
        root: Prepared Pascal-layout root.
        benchmark: "pascal", "coco", "synthetic" or "custom".
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
    _check_request(split, protocol)
    bench = Benchmark.resolve(benchmark, check_root_dir(root), convention)
    settings = DataSettings(protocol=protocol, train_crop=train_crop, train_scale=tuple(train_scale),
                            test_size=test_size, workers=workers)
    return build_semantic(bench, settings, split=split, fold=fold, seed=seed)


def _check_request(split: str, protocol: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if protocol not in TRAIN_PROTOCOLS:
        raise ValueError(f"protocol must be one of {TRAIN_PROTOCOLS}, got {protocol!r}")


def build_semantic(bench: Benchmark, settings: DataSettings, *, split: str, fold: int,
                   seed: int = 0) -> SemanticBaseDataset:
    """Stage-1 data of ``bench``'s ``fold`` (see :func:`build_semantic_dataset`; ``settings``: protocol,
    crop, scale, test size, index workers; the class split comes from ``bench``)."""
    _check_request(split, settings.protocol)
    s = settings
    root = check_root_dir(bench.root)
    sp = bench.split(fold)
    index = load_class_index(root, split, bench.num_classes, workers=s.workers)
    keep = None
    if split == "train" and s.protocol == "dagger":
        novel = set(sp.novel)
        keep = [i for i, r in enumerate(index.records) if not novel.intersection(r.counts)]
    if split == "train":
        tr = TrainTransform(crop=s.train_crop, scale=(float(s.train_scale[0]), float(s.train_scale[1])), fg_keep=0.0,
                            crop_tries=1)
        ds = SemanticBaseDataset(index, sp.base, train=True, keep=keep, seed=seed, transform=tr)
    else:
        ds = SemanticBaseDataset(index, sp.base, train=False, transform=TestTransform(size=s.test_size))
    log.info("%s fold %d %s base-class segmentation: %d images, %d classes (background + %d base)", bench.name, fold,
             split, len(ds), ds.num_classes, len(sp.base))
    return ds
