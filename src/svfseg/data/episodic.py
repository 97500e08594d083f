"""Episodic datasets over a Pascal-layout root (Pascal-5i, prepared COCO-20i, synthetic-5i)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from svfseg.data.episodes import EpisodeList, EpisodePool, sample_episode
from svfseg.data.io import DataError, read_image, read_label, wxh
from svfseg.data.transforms import TestTransform, TrainTransform
from svfseg.labels import IGNORE_LABEL

__all__ = ["binarize", "load_pair", "TrainEpisodes", "EvalEpisodes"]


def binarize(label: np.ndarray, class_id: int) -> np.ndarray:
    """1 where ``label == class_id``, 255 where ignored, 0 elsewhere (other classes become background)."""
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE_LABEL] = IGNORE_LABEL
    return out


def load_pair(root: Path, image_rel: str, label_rel: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its label; their sizes must agree."""
    img = read_image(root / image_rel)
    lbl = read_label(root / label_rel)
    if img.shape[:2] != lbl.shape:
        raise DataError(f"{root / label_rel}: expected the size of {image_rel} {wxh(img.shape)}, "
                        f"found {wxh(lbl.shape)} (width x height)")
    return img, lbl


class TrainEpisodes(Dataset):
    """Training episodes: item ``i`` is query ``pool.queries[i]`` with a class and supports drawn from
    ``numpy.random.default_rng([seed, epoch, i])`` (independent of workers and batch order).

    Call :meth:`set_epoch` at the start of each epoch.
    """

    def __init__(self, pool: EpisodePool, *, shot: int, seed: int = 0, transform: TrainTransform | None = None):
        self.pool = pool
        self.shot = shot
        self.seed = seed
        self.epoch = 0
        self.transform = transform or TrainTransform()
        self.root = pool.index.root

    def __len__(self) -> int:
        return len(self.pool)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose randomness the next items use."""
        self.epoch = int(epoch)

    def _view(self, pos: int, class_id: int, rng: np.random.Generator):
        r = self.pool.index.records[pos]
        img, lbl = load_pair(self.root, r.image, r.label)
        return self.transform(img, binarize(lbl, class_id), rng)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"episode index {i} out of range 0..{len(self) - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        q, c, sup = sample_episode(self.pool, i, self.shot, rng)
        q_img, q_mask = self._view(q, c, rng)
        views = [self._view(s, c, rng) for s in sup]
        recs = self.pool.index.records
        return {
            "query_img": torch.from_numpy(q_img), "query_mask": torch.from_numpy(q_mask),
            "support_imgs": torch.from_numpy(np.stack([v[0] for v in views])),
            "support_masks": torch.from_numpy(np.stack([v[1] for v in views])),
            "class_id": c, "query_name": recs[q].name, "support_names": [recs[s].name for s in sup],
        }


class EvalEpisodes(Dataset):
    """Fixed evaluation episodes (an :class:`EpisodeList`) through the test chain.

    Items also carry ``query_label_orig`` (binarised, original size) and ``query_valid_hw``.
    """

    def __init__(self, pool: EpisodePool, episodes: EpisodeList, *, transform: TestTransform | None = None):
        episodes.check_dataset(pool.index.fingerprint, legacy=pool.index.legacy_fingerprint)
        episodes.check_classes_present(pool.index)
        self.pool = pool
        self.episodes = episodes
        self.transform = transform or TestTransform()
        self.root = pool.index.root
        pos = pool.index.position()
        missing = [e.query for e in episodes.episodes if e.query not in pos]
        if missing:
            raise DataError(f"{self.root}: episode images not in the {pool.index.split} list: {missing[:5]}")
        self._pos = pos

    def __len__(self) -> int:
        return len(self.episodes)

    def _record(self, image: str):
        return self.pool.index.records[self._pos[image]]

    def __getitem__(self, i: int) -> dict:
        ep = self.episodes[i]
        qr = self._record(ep.query)
        img, lbl = load_pair(self.root, qr.image, qr.label)
        q_orig = binarize(lbl, ep.class_id)
        q_img, q_mask, valid = self.transform(img, q_orig)
        s_imgs, s_masks = [], []
        for s in ep.supports:
            r = self._record(s)
            simg, slbl = load_pair(self.root, r.image, r.label)
            a, b, _ = self.transform(simg, binarize(slbl, ep.class_id))
            s_imgs.append(a)
            s_masks.append(b)
        return {
            "query_img": torch.from_numpy(q_img), "query_mask": torch.from_numpy(q_mask),
            "support_imgs": torch.from_numpy(np.stack(s_imgs)), "support_masks": torch.from_numpy(np.stack(s_masks)),
            "class_id": ep.class_id, "query_name": qr.name,
            "support_names": [self._record(s).name for s in ep.supports],
            "query_label_orig": torch.from_numpy(q_orig.astype(np.int64)),
            "query_valid_hw": valid,
        }
