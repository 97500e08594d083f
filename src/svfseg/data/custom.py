"""`svfseg prepare custom`: folders of images and class-id masks -> a custom root (layout, lists, dataset.yaml)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from svfseg.data.io import DataError, atomic_dir, image_size, read_label, write_label, write_list, wxh
from svfseg.data.meta import write_dataset_meta
from svfseg.labels import IGNORE_LABEL

__all__ = ["prepare_custom", "read_class_names", "pair_folders", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_DIR, LABEL_DIR = "JPEGImages", "SegmentationClassAug"
_SHOWN = 10


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line: line 1 names class id 1 (blank lines skipped).

    Raises:
        DataError: missing file, no names, or a repeated name.
    """
    path = Path(path)
    try:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise DataError(f"{path}: expected a class-name file (one name per line), could not read it ({e})") from None
    if not names:
        raise DataError(f"{path}: expected one class name per line (class id 1 first), found none")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: expected distinct class names, found repeated {dup}")
    return names


def _by_stem(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        found = ("a symbolic link that leads nowhere (or back to itself)" if folder.is_symlink() and not
                 folder.exists() else "a file" if folder.exists() else "none")
        raise DataError(f"{folder}: expected a folder of {what}, found {found}")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in suffixes or p.name.startswith("."):
            continue
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:  # the list files and the class index record every name as UTF-8 text
            shown = os.fsencode(p).decode("utf-8", "backslashreplace")
            raise DataError(f"{shown}: expected a UTF-8 file name (the root's train.txt/val.txt list it), found "
                            f"bytes that are not UTF-8; rename the file") from None
        if p.stem in out:
            raise DataError(f"{folder}: expected one {what[:-1]} per name, found {out[p.stem].name} and {p.name}")
        out[p.stem] = p
    if not out:
        raise DataError(f"{folder}: expected {what} ({', '.join(suffixes)}), found none")
    return out


def pair_folders(images: str | os.PathLike, masks: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file stem (``cat_01.jpg`` <-> ``cat_01.png``), sorted by stem.

    Raises:
        DataError: a folder is missing or empty, or an image has no mask (or a mask no image).
    """
    imgs = _by_stem(Path(images), IMAGE_SUFFIXES, "images")
    msks = _by_stem(Path(masks), (".png",), "masks")
    lonely_i, lonely_m = sorted(set(imgs) - set(msks)), sorted(set(msks) - set(imgs))
    if lonely_i or lonely_m:
        parts = []
        if lonely_i:
            parts.append(f"{len(lonely_i)} image(s) without a mask in {masks} (e.g. {lonely_i[:_SHOWN]})")
        if lonely_m:
            parts.append(f"{len(lonely_m)} mask(s) without an image in {images} (e.g. {lonely_m[:_SHOWN]})")
        raise DataError("expected every image to have a mask <same name>.png: found " + "; ".join(parts))
    return [(imgs[s], msks[s]) for s in sorted(imgs)]


def _read_masks(pairs, n_classes: Optional[int]) -> tuple[list[np.ndarray], int, int]:
    """Every mask, checked; returns (masks, number of classes, median longer side)."""
    masks, problems, top, sides, present = [], [], 0, [], set()
    for img, msk in pairs:
        try:
            label = read_label(msk)
        except DataError as e:
            problems.append(str(e))
            continue
        try:
            hw = image_size(img)
        except OSError as e:
            problems.append(f"{img}: expected a readable image, found {e}")
            continue
        if hw != label.shape:
            problems.append(f"{msk}: expected the size of its image {img.name} {wxh(hw)}, "
                            f"found {wxh(label.shape)} (width x height)")
        values = np.unique(label)
        fg = values[(values > 0) & (values != IGNORE_LABEL)]
        if n_classes is not None and fg.size and int(fg.max()) > n_classes:
            problems.append(f"{msk}: expected class ids 0..{n_classes} or {IGNORE_LABEL} (the class-name file has "
                            f"{n_classes} names), found {[int(v) for v in fg if v > n_classes][:10]}")
        top = max(top, int(fg.max()) if fg.size else 0)
        present.update(int(v) for v in fg)
        sides.append(max(hw))
        masks.append(label)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in the masks:\n  " + "\n  ".join(problems[:20]) + more)
    if top == 0:
        raise DataError("expected masks with class ids 1..C (0 background, 255 ignore), found only background")
    absent = sorted(set(range(1, top + 1)) - present)
    if n_classes is None and absent:  # C is the largest id: every id below it must be a class with pixels
        raise DataError(f"{pairs[0][1].parent}: expected class ids 1..C with each id in some mask (0 background, "
                        f"{IGNORE_LABEL} ignore), found ids {sorted(present)[:12]}: {len(absent)} id(s) below {top} "
                        f"in no mask (e.g. {absent[:10]}); renumber the classes 1..C")
    return masks, (n_classes if n_classes is not None else top), sorted(sides)[len(sides) // 2]


def prepare_custom(images, masks, out, *, class_names: Optional[str | os.PathLike] = None,
                   val_fraction: float = 0.2, folds: Optional[int] = None, seed: int = 0,
                   copy_images: bool = False, workers: Optional[int] = None) -> Path:
    """Build a custom root from a folder of images and a folder of class-id masks.

    Masks are PNGs named like their images, single channel (mode L or P), pixel value = class id:
    0 background, 1..C the classes, 255 ignore. The root gets ``JPEGImages/`` (a link to the image
    folder, or copies), ``SegmentationClassAug/`` (the masks as mode-L PNGs), ``train.txt`` and
    ``val.txt`` (a seeded random ``val_fraction`` of the images is val) and ``dataset.yaml``; then
    the ``svfseg prepare custom --check`` checks run and nothing is written unless they pass.

    Args:
        images: folder of images (.jpg, .png, ...). masks: folder of ``<image stem>.png`` masks.
        out: output root (must not exist; written atomically).
        class_names: text file, one name per line (line 1 = id 1); default ``class1..classC`` with
            C the largest id found.
        val_fraction: share of the images in the val list (0 < f < 1).
        folds: fold count (consecutive blocks of ids, as Pascal-5i); default min(4, C).
        seed: seed of the train/val split.
        copy_images: copy the images instead of linking the folder.
        workers: processes for the checks.

    Returns:
        The output root.

    Raises:
        DataError: unpaired files, bad masks, or a fold that cannot make episodes (every problem listed).
    """
    from svfseg.data.check import check_dataset
    from svfseg.data.index import load_class_index

    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction: expected a number between 0 and 1, found {val_fraction}")
    names = read_class_names(class_names) if class_names is not None else None
    pairs = pair_folders(images, masks)
    labels, n_classes, side = _read_masks(pairs, len(names) if names else None)
    names = names or [f"class{i}" for i in range(1, n_classes + 1)]
    if n_classes < 2:
        raise DataError(f"{masks}: expected at least 2 classes (novel and base), found class ids up to {n_classes}")
    n_folds = min(4, n_classes) if folds is None else folds
    n_val = int(round(val_fraction * len(pairs)))
    if not 0 < n_val < len(pairs):
        raise DataError(f"--val-fraction {val_fraction} of {len(pairs)} images leaves {n_val} val image(s): "
                        f"expected at least one train and one val image")
    order = np.random.default_rng(seed).permutation(len(pairs))
    val_set = {int(i) for i in order[:n_val]}
    with atomic_dir(out) as tmp:
        (tmp / LABEL_DIR).mkdir()
        for (img, msk), label in zip(pairs, labels):
            write_label(tmp / LABEL_DIR / f"{img.stem}.png", label)
        if copy_images:
            (tmp / IMAGE_DIR).mkdir()
            for img, _ in pairs:
                shutil.copy2(img, tmp / IMAGE_DIR / img.name)
        else:
            (tmp / IMAGE_DIR).symlink_to(Path(images).resolve(), target_is_directory=True)
        lines = [(f"{IMAGE_DIR}/{img.name}", f"{LABEL_DIR}/{img.stem}.png") for img, _ in pairs]
        write_list(tmp / "train.txt", [ln for i, ln in enumerate(lines) if i not in val_set])
        write_list(tmp / "val.txt", [ln for i, ln in enumerate(lines) if i in val_set])
        write_dataset_meta(tmp, names, n_folds, image_size=side, name=Path(out).name)
        problems = check_dataset(tmp, "custom", workers=workers, progress=False)
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{out}: not written, {len(problems)} problem(s) found by the checks:\n  "
                            + "\n  ".join(p.replace(str(tmp), str(out)) for p in problems[:20]) + more)
        for split in ("train", "val"):
            load_class_index(tmp, split, n_classes, workers=workers, cache_as=out)
    log.info("wrote %s: %d classes %s, %d folds, %d train + %d val images", out, n_classes, names, n_folds,
             len(pairs) - n_val, n_val)
    return Path(out)
