"""A custom root's ``dataset.yaml``: class names, folds and image size, read into splits' ``CustomClasses``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

from svfseg.data.io import DataError
from svfseg.data.splits import CustomClasses, consecutive_folds

__all__ = ["META_FILE", "DatasetMeta", "load_dataset_meta", "write_dataset_meta"]

META_FILE = "dataset.yaml"
FORMAT = "svfseg-dataset-1"


@dataclass(frozen=True)
class DatasetMeta:
    """What ``dataset.yaml`` says.

    Attributes:
        classes: names and folds (the input of :mod:`svfseg.data.splits` for ``benchmark=custom``).
        image_size: typical longer image side in pixels (sets the default small-object rule), or None.
        min_pixels: an explicit small-object rule for this dataset, or None.
        name: a free-form dataset name.
    """

    classes: CustomClasses
    image_size: Optional[int] = None
    min_pixels: Optional[int] = None
    name: str = ""


def _fold_ids(path: Path, i: int, fold, names: Sequence[str]) -> tuple[int, ...]:
    if not isinstance(fold, (list, tuple)) or not fold:
        raise DataError(f"{path}: folds[{i}]: expected a non-empty list of class ids or names, found {fold!r}")
    ids = []
    for c in fold:
        if isinstance(c, str) and c in names:
            ids.append(names.index(c) + 1)
        elif isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= len(names):
            ids.append(c)
        else:
            raise DataError(f"{path}: folds[{i}]: expected class ids 1..{len(names)} or names of `classes`, "
                            f"found {c!r}")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: folds[{i}]: expected distinct classes, found {fold!r}")
    if len(ids) == len(names):
        raise DataError(f"{path}: folds[{i}]: every class is novel, so no base class is left to train on")
    return tuple(sorted(ids))


def parse_dataset_meta(blob, path: Path) -> DatasetMeta:
    """Validate a loaded ``dataset.yaml`` mapping (errors name the file and the key)."""
    if not isinstance(blob, dict):
        raise DataError(f"{path}: expected a mapping with 'classes' and 'folds', found {type(blob).__name__}")
    unknown = sorted(set(blob) - {"format", "name", "classes", "folds", "image_size", "min_pixels"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}: expected format, name, classes, folds, image_size, "
                        f"min_pixels")
    names = blob.get("classes")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)):
        raise DataError(f"{path}: classes: expected a list of class names (id 1 first), found {names!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: classes: expected distinct names, found {names!r}")
    if len(names) < 2:
        raise DataError(f"{path}: classes: expected at least 2 classes (novel and base), found {len(names)}")
    folds = blob.get("folds", min(4, len(names)))
    if isinstance(folds, int) and not isinstance(folds, bool):
        if not 2 <= folds <= len(names):
            raise DataError(f"{path}: folds: expected a fold count in 2..{len(names)} or a list of class lists, "
                            f"found {folds}")
        fold_ids = consecutive_folds(len(names), folds)
    elif isinstance(folds, list) and folds:
        fold_ids = tuple(_fold_ids(path, i, f, names) for i, f in enumerate(folds))
        seen: dict[int, int] = {}
        for i, ids in enumerate(fold_ids):
            for c in ids:
                if c in seen:
                    raise DataError(f"{path}: folds[{i}]: expected folds without shared classes, found class {c} "
                                    f"({names[c - 1]}) also in folds[{seen[c]}] (it would be novel in two folds)")
                seen[c] = i
    else:
        raise DataError(f"{path}: folds: expected a fold count or a list of class lists, found {folds!r}")
    ints = {}
    for key in ("image_size", "min_pixels"):
        v = blob.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DataError(f"{path}: {key}: expected a positive integer, found {v!r}")
        ints[key] = v
    return DatasetMeta(CustomClasses(tuple(names), fold_ids), name=str(blob.get("name") or ""), **ints)


def load_dataset_meta(root: str | os.PathLike) -> DatasetMeta:
    """Read and check ``root/dataset.yaml``.

    Raises:
        DataError: missing, unreadable, or not a valid description (the message names the key).
    """
    path = Path(root) / META_FILE
    try:
        blob = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: expected the dataset description of a custom root (made by "
                        f"`svfseg prepare custom`, or written by hand: classes, folds), found no file") from None
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: expected a YAML dataset description, found an unreadable file ({e})") from None
    return parse_dataset_meta(blob, path)


def write_dataset_meta(root: str | os.PathLike, names: Sequence[str], folds, *, image_size: Optional[int] = None,
                       name: str = "") -> Path:
    """Write ``root/dataset.yaml`` (``folds``: a count for consecutive blocks, or lists of novel ids)."""
    path = Path(root) / META_FILE
    blob = {"format": FORMAT, "name": name, "classes": list(names),
            "folds": folds if isinstance(folds, int) else [list(f) for f in folds]}
    if image_size is not None:
        blob["image_size"] = int(image_size)
    header = ("# svfseg custom dataset: class id i (label value i) is classes[i-1]; 0 is background, 255 ignore.\n"
              "# folds: a count (consecutive blocks of ids, as Pascal-5i) or a list of novel-class lists.\n")
    parse_dataset_meta(blob, path)  # never write what could not be read back
    path.write_text(header + yaml.safe_dump(blob, sort_keys=False, allow_unicode=True))
    return path
