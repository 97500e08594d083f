"""Pascal VOC 2012 + SBD sources: locate folders, read VOC palette PNGs and SBD .mat masks, build lists."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from svfseg.data.io import DataError, read_label

__all__ = ["find_voc", "find_sbd", "read_sbd_mat", "voc_or_sbd_label", "pascal_lists", "KNOWN_COUNTS"]

# Image counts of the standard lists: val = VOC2012 val; train "pfenet" = VOC train + SBD train_noval
# (deduplicated, PFENet/BAM); "trainaug" = VOC train + SBD train + SBD val, minus VOC val (DeepLab).
KNOWN_COUNTS = {"val": 1449, "pfenet": 5953, "trainaug": 10582}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: expected {what}, found nothing")
    return path


def find_voc(voc: str | Path) -> Path:
    """The VOC2012 folder (holding JPEGImages, SegmentationClass, ImageSets) given it or a parent VOCdevkit."""
    voc = Path(voc)
    for cand in (voc, voc / "VOC2012", voc / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise DataError(f"{voc}: expected a VOC2012 folder with JPEGImages/ and ImageSets/Segmentation/, found none")


def find_sbd(sbd: str | Path) -> Path:
    """The SBD ``dataset`` folder (holding cls/*.mat and train.txt) given it or its parent."""
    sbd = Path(sbd)
    for cand in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir() and (cand / "train.txt").is_file():
            return cand
    raise DataError(f"{sbd}: expected the SBD dataset folder with cls/*.mat and train.txt, found none")


def _ids(path: Path) -> list[str]:
    return [ln.strip() for ln in _need(path, "an image-id list").read_text().splitlines() if ln.strip()]


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """Class-id mask (uint8, 0..20) from an SBD ``cls/*.mat`` file (field ``GTcls.Segmentation``)."""
    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"{path}: expected an SBD .mat with GTcls.Segmentation, could not read it ({e})") from None
    if seg.ndim != 2:
        raise DataError(f"{path}: expected a 2-D GTcls.Segmentation, found shape {seg.shape}")
    return seg.astype(np.uint8)


def voc_or_sbd_label(voc: Path, sbd: Path | None, image_id: str) -> np.ndarray:
    """VOC ``SegmentationClass`` (palette indices, 255 boundaries kept) when it exists, else the SBD mask."""
    png = voc / "SegmentationClass" / f"{image_id}.png"
    if png.is_file():
        return read_label(png)
    if sbd is not None:
        mat = sbd / "cls" / f"{image_id}.mat"
        if mat.is_file():
            return read_sbd_mat(mat)
    raise DataError(f"{image_id}: expected {png} or an SBD cls/{image_id}.mat, found neither")


def pascal_lists(voc: Path, sbd: Path | None, *, sbd_val: bool = False) -> tuple[list[str], list[str], str]:
    """Image ids of the train and val lists, and which known count the train list should match.

    Train = VOC train + SBD train (``train_noval.txt`` when present, as PFENet uses, else
    ``train.txt``) [+ SBD val with ``sbd_val``], minus VOC val, deduplicated and sorted.
    """
    seg = voc / "ImageSets" / "Segmentation"
    val = _ids(seg / "val.txt")
    train = set(_ids(seg / "train.txt"))
    kind = "voc-only"
    if sbd is not None:
        noval = sbd / "train_noval.txt"
        train |= set(_ids(noval if noval.is_file() else sbd / "train.txt"))
        kind = "pfenet"
        if sbd_val:
            train |= set(_ids(sbd / "val.txt"))
            kind = "trainaug"
    train -= set(val)
    return sorted(train), sorted(set(val)), kind
