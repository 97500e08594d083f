"""A benchmark resolved once (name, root, fold convention, a custom root's ``dataset.yaml``) and the dataset settings.

Every layer that needs a class split, a class count or class names asks one :class:`Benchmark`
made at the start of a run (``svfseg.engine.resolved.resolve_run``), instead of reading the
root's metadata again. :class:`DataSettings` carries how items are made from it, so the dataset
factories take two objects and a few per-call values rather than a long list of keywords.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from svfseg.data.io import DataError
from svfseg.data.meta import DatasetMeta, load_dataset_meta
from svfseg.data.splits import (BENCHMARKS, CONVENTIONS, CUSTOM, CustomClasses, Split, class_names, class_split,
                                num_classes, num_folds)

__all__ = ["Benchmark", "DataSettings", "check_root_dir"]


def check_root_dir(root: str | os.PathLike) -> Path:
    """``root`` as a Path (DataError when it is not a folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset root folder, found none")
    return root


@dataclass(frozen=True)
class Benchmark:
    """One benchmark at one root, with what its splits need already read.

    Make it with :meth:`resolve`; the built-in benchmarks never touch the root, ``custom`` reads
    ``root/dataset.yaml`` there, once.

    Attributes:
        name: "pascal", "coco", "synthetic" or "custom".
        root: the prepared root (``data.root``).
        convention: the COCO fold convention ("interleaved" or "consecutive"; only coco uses it).
        meta: a custom root's ``dataset.yaml`` (None for the built-ins).
    """

    name: str
    root: Path
    convention: str = "interleaved"
    meta: Optional[DatasetMeta] = None

    def __post_init__(self):
        if self.name != CUSTOM and self.name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}: expected one of {sorted(BENCHMARKS) + [CUSTOM]}")
        if self.name == CUSTOM and self.meta is None:
            raise ValueError("benchmark 'custom' takes its classes from the root's dataset.yaml: expected its "
                             "metadata (Benchmark.resolve reads it), found none")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown COCO fold convention {self.convention!r}: expected one of {CONVENTIONS}")

    @classmethod
    def resolve(cls, name: str, root: str | os.PathLike, convention: str = "interleaved") -> "Benchmark":
        """The benchmark ``name`` at ``root``; for ``custom`` the root's ``dataset.yaml`` is read and checked.

        Raises:
            ValueError: unknown benchmark or convention.
            DataError: custom: no root folder, or a missing or invalid ``dataset.yaml``.
        """
        meta = load_dataset_meta(check_root_dir(root)) if name == CUSTOM else None
        return cls(name, Path(root), convention, meta)

    @property
    def classes(self) -> Optional[CustomClasses]:
        """The custom root's class names and folds (the splits' input); None for the built-ins."""
        return self.meta.classes if self.meta is not None else None

    @property
    def num_classes(self) -> int:
        """Foreground classes (20 pascal/synthetic, 80 coco; custom: its ``dataset.yaml``)."""
        return num_classes(self.name, self.classes)

    @property
    def num_folds(self) -> int:
        """Cross-validation folds (4 for the built-ins; custom: its ``dataset.yaml``)."""
        return num_folds(self.name, self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names indexed by ``class_id - 1``."""
        return class_names(self.name, self.classes)

    def split(self, fold: int) -> Split:
        """Novel / base class ids of ``fold`` (ValueError outside ``0..num_folds - 1``)."""
        return class_split(self.name, fold, self.convention, self.classes)


@dataclass(frozen=True)
class DataSettings:
    """How items are made from a benchmark: the ``data.*`` keys beyond the benchmark, and ``eval.upstream_padding``.

    The defaults are those of the episodic datasets (``build_dataset``); the semantic datasets'
    keyword form uses BAM's own (417 px, scale 0.5-2.0, protocol "pfenet").

    Attributes:
        protocol: training pool: "dagger" (drop images with any novel pixel) or "pfenet" (keep them).
        train_crop: training crop side. train_scale: RandScale range.
        test_size: longer side at test.
        min_pixels: small-object threshold (``data.min_pixels``); None: the benchmark's default.
        query_rule: which classes a query may be asked about ("any" or "min_pixels").
        upstream_padding: evaluation: PFENet/BAM's test geometry.
        workers: processes for a first-time class-index scan (None: the index's default).
    """

    protocol: str = "dagger"
    train_crop: int = 473
    train_scale: tuple[float, float] = (0.9, 1.1)
    test_size: int = 473
    min_pixels: Optional[int] = None
    query_rule: str = "any"
    upstream_padding: bool = False
    workers: Optional[int] = None
