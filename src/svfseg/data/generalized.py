"""Episodes of the generalized few-shot setting (BAM's): base classes and the episode's novel class scored together."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from svfseg.data.benchmark import Benchmark, check_root_dir
from svfseg.data.episodic import binarize, load_pair
from svfseg.data.index import ClassIndex, load_class_index
from svfseg.data.io import DataError
from svfseg.data.semantic import base_label_lut, remap_label
from svfseg.data.transforms import TestTransform

__all__ = ["generalized_episodes", "GeneralizedEpisodes", "build_generalized_dataset", "build_generalized"]

log = logging.getLogger(__name__)


def generalized_episodes(index: ClassIndex, bench: Benchmark, *, fold: int, shot: int, seed: int = 0,
                         min_pixels: int | None = None, count: int | None = None):
    """BAM's generalized few-shot episodes: every val image once, base and novel classes together.

    For each image (list order) with at least one labelled class: if it shows a base class, the
    episode's novel class is drawn uniformly among all novel classes of the fold (it may be
    absent from the image); otherwise among the novel classes it shows. Supports: ``shot``
    other images where that class covers ``>= min_pixels`` pixels (the small-object rule; BAM
    accepts any pixel count). Randomness: ``numpy.random.default_rng(seed)``. ``count`` keeps
    only the first episodes (quick checks); None keeps one per image. ``bench``: the benchmark
    ``index`` belongs to (its class split; ``min_pixels`` None: its default).

    Returns:
        An :class:`~svfseg.data.episodes.EpisodeList` (split "val").
    """
    from svfseg.data.build import benchmark_min_pixels
    from svfseg.data.episodes import Episode, EpisodeList

    sp = bench.split(fold)
    if min_pixels is None:
        min_pixels = benchmark_min_pixels(bench)
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
    return EpisodeList(bench.name, index.split, fold, shot, seed, bench.convention, int(min_pixels),
                       index.fingerprint, tuple(eps))


class GeneralizedEpisodes(Dataset):
    """Episodes of the generalized setting, scored over base + novel classes at once.

    Items are those of :class:`~svfseg.data.episodic.EvalEpisodes` (binary masks of the episode's
    novel class, test chain), except ``query_label_orig``: base class ``c`` -> its
    channel ``1..num_base``, the episode's novel class -> ``num_base + 1``, other novel classes
    -> 0, 255 kept (BAM's generalized labels).

    Args:
        index: Val class index.
        episodes: From :func:`generalized_episodes`.
        base_classes: Base classes of the fold.
        novel_classes: Novel classes of the fold (what the generalized score adds to the base classes).
        transform: Test chain.
    """

    def __init__(self, index: ClassIndex, episodes, base_classes: Sequence[int], *, novel_classes: Sequence[int],
                 transform: TestTransform | None = None):
        episodes.check_dataset(index.fingerprint, legacy=index.legacy_fingerprint)
        self.index, self.episodes, self.root = index, episodes, Path(index.root)
        self.base_classes = tuple(sorted(int(c) for c in base_classes))
        self.novel_classes = tuple(sorted(int(c) for c in novel_classes))
        self.lut = base_label_lut(self.base_classes, index.num_classes)
        self.transform = transform or TestTransform()
        self._pos = index.position()

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
        q_img, q_mask, valid = self.transform(img, binarize(lbl, ep.class_id))
        s_imgs, s_masks = [], []
        for s in ep.supports:
            _, simg, slbl = self._load(s)
            a, b, _ = self.transform(simg, binarize(slbl, ep.class_id))
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
    """Generalized-setting evaluation episodes on the val split (the keyword form of :func:`build_generalized`)."""
    bench = Benchmark.resolve(benchmark, check_root_dir(root), convention)
    return build_generalized(bench, fold=fold, shot=shot, seed=seed, test_size=test_size, count=count)


def build_generalized(bench: Benchmark, *, fold: int, shot: int, seed: int = 0, test_size: int = 473,
                      count: int | None = None) -> GeneralizedEpisodes:
    """Generalized-setting episodes of ``bench``'s ``fold`` (see :func:`generalized_episodes`; the small-object
    rule is the benchmark's default, as BAM's setting has no ``data.min_pixels``)."""
    index = load_class_index(check_root_dir(bench.root), "val", bench.num_classes)
    eps = generalized_episodes(index, bench, fold=fold, shot=shot, seed=seed, count=count)
    log.info("%s fold %d generalized: %d episodes", bench.name, fold, len(eps))
    sp = bench.split(fold)
    return GeneralizedEpisodes(index, eps, sp.base, novel_classes=sp.novel, transform=TestTransform(size=test_size))
