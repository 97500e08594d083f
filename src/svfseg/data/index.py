"""Per-image class index (pixel count of every class), built once per list file and cached outside the data."""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from svfseg.data.io import (DataError, file_head_and_tail, image_size, incomplete_image, list_path, read_label,
                            read_list, wxh)
from svfseg.labels import IGNORE_LABEL

__all__ = ["ImageRecord", "ClassIndex", "load_class_index", "build_class_index", "check_command", "CACHE_DIR",
           "cache_root", "index_cache_file"]

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: records carry a content digest of image + label
# svfseg <= 0.1 wrote caches into the dataset root; such caches are still read, never written.
CACHE_DIR = ".svfseg_cache"
CACHE_ENV = "SVFSEG_CACHE"
_MAX_REPORTED = 20


@dataclass(frozen=True)
class ImageRecord:
    """One list entry: image and label paths (relative to the root), size, class pixel counts, content digest."""

    image: str
    label: str
    hw: tuple[int, int]
    counts: dict[int, int]
    digest: str = ""  # blake2b of the image and label bytes: any changed pixel changes the fingerprint

    @property
    def name(self) -> str:
        """Image file stem, e.g. ``2008_000123``."""
        return Path(self.image).stem


@dataclass(frozen=True)
class ClassIndex:
    """The class index of one split of a Pascal-layout root."""

    root: Path
    split: str
    num_classes: int
    records: tuple[ImageRecord, ...]
    fingerprint: str
    # What svfseg 0.1 computed (names, sizes, counts only): episode files it wrote still load.
    legacy_fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def position(self) -> dict[str, int]:
        """Map image path -> record position."""
        return {r.image: i for i, r in enumerate(self.records)}


def _content_fingerprint(num_classes: int, records, *, version: int = INDEX_VERSION) -> str:
    """sha256 of what the index says (names, sizes, counts, file contents): equal on any machine holding the same data.

    ``version=1`` gives the fingerprint of svfseg 0.1, which left the file contents out.
    """
    h = hashlib.sha256(f"svfseg-index-v{version}:{num_classes}\n".encode())
    for r in records:
        counts = ",".join(f"{c}:{n}" for c, n in sorted(r.counts.items()))
        digest = f" {r.digest}" if version >= 2 else ""
        h.update(f"{r.image} {r.label} {r.hw[0]}x{r.hw[1]} {counts}{digest}\n".encode())
    return h.hexdigest()[:16]


def _digest(*blobs: bytes) -> str:
    h = hashlib.blake2b(digest_size=12)
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


def _pair_digest(args) -> str:
    root, img_rel, lbl_rel = args
    try:
        return _digest((Path(root) / img_rel).read_bytes(), (Path(root) / lbl_rel).read_bytes())
    except OSError:
        return "missing"


def _source_stamp(list_file: Path, root: Path, pairs, num_classes: int, workers: int | None = None) -> str:
    """Cache key: list bytes + the content digest of every image and label (the one the fingerprint holds).

    Size and mtime would miss a file rewritten in place with both kept (and then accept an old
    episode file); the contents cannot. Reading every file costs about a second per GB.
    """
    h = hashlib.sha256(f"v{INDEX_VERSION}-content:{num_classes}\n".encode())
    h.update(list_file.read_bytes())
    jobs = [(str(root), a, b) for a, b in pairs]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers > 1 and len(jobs) >= 2048:
        with multiprocessing.get_context().Pool(workers) as pool:
            digests = pool.map(_pair_digest, jobs, chunksize=256)
    else:
        digests = [_pair_digest(j) for j in jobs]
    for (img, lbl), d in zip(pairs, digests):
        h.update(f"{img} {lbl} {d}\n".encode())
    return h.hexdigest()[:16]


def _scan_one(args) -> tuple[tuple[int, int], dict[int, int], list[str]]:
    """Read one label: class pixel counts plus every problem found (never raises)."""
    root, img_rel, lbl_rel, num_classes = args
    problems: list[str] = []
    img_path, lbl_path = Path(root) / img_rel, Path(root) / lbl_rel
    hw = (0, 0)
    if not img_path.is_file():
        problems.append(f"{img_path}: expected an image, found no file")
    if not lbl_path.is_file():
        problems.append(f"{lbl_path}: expected a label PNG, found no file")
        return hw, {}, problems
    try:
        label = read_label(lbl_path)
    except DataError as e:
        return hw, {}, problems + [str(e)]
    hw = (int(label.shape[0]), int(label.shape[1]))
    if img_path.is_file():
        try:
            ihw = image_size(img_path)
            if ihw != hw:
                problems.append(f"{lbl_path}: expected the size of its image {img_path.name} "
                                f"{wxh(ihw)}, found {wxh(hw)} (width x height)")
            # the header reads fine on a cut-off file: its end must be there too (tail read, cheap)
            cut = incomplete_image(file_head_and_tail(img_path))
            if cut:
                problems.append(f"{img_path}: expected a complete image, found {cut}")
        except OSError as e:
            problems.append(f"{img_path}: expected a readable image, found {e}")
    hist = np.bincount(label.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(hist) if num_classes < v < IGNORE_LABEL]
    if bad:
        problems.append(f"{lbl_path}: expected class ids 0..{num_classes} or {IGNORE_LABEL}, found {bad[:10]}")
    counts = {int(c): int(hist[c]) for c in range(1, num_classes + 1) if hist[c] > 0}
    return hw, counts, problems


def _scan_record(args) -> tuple[tuple[int, int], dict[int, int], list[str], str]:
    """:func:`_scan_one` plus the content digest of the image and label files ("" when unreadable)."""
    hw, counts, problems = _scan_one(args)
    root, img_rel, lbl_rel, _ = args
    try:
        digest = _digest((Path(root) / img_rel).read_bytes(), (Path(root) / lbl_rel).read_bytes())
    except OSError:
        digest = ""  # already a problem in the list
    return hw, counts, problems, digest


def build_class_index(root, split: str, num_classes: int, *, workers: int | None = None,
                      progress: bool = True) -> tuple[ClassIndex, list[str]]:
    """Scan every label of a split (no cache). Returns the index and the problems found.

    Args:
        root: dataset root (Pascal layout).
        split: list name, "train" or "val".
        num_classes: largest valid class id.
        workers: processes for scanning (default: up to 8, serial for small lists).
        progress: show a tqdm bar on stderr once the scan has taken more than 2 s.
    """
    root = Path(root)
    lf = list_path(root, split)
    pairs = read_list(lf)
    jobs = [(str(root), a, b, num_classes) for a, b in pairs]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    bar = dict(total=len(jobs), desc=f"indexing {split} labels", unit="img", delay=2.0, disable=not progress)
    if workers > 1 and len(jobs) >= 512:
        with multiprocessing.get_context().Pool(workers) as pool:
            results = list(tqdm(pool.imap(_scan_record, jobs, chunksize=64), **bar))
    else:
        results = [_scan_record(j) for j in tqdm(jobs, **bar)]
    records, problems = [], []
    for (a, b), (hw, counts, probs, digest) in zip(pairs, results):
        records.append(ImageRecord(a, b, hw, counts, digest))
        problems.extend(probs)
    index = ClassIndex(root, split, num_classes, tuple(records), _content_fingerprint(num_classes, records),
                       _content_fingerprint(num_classes, records, version=1))
    return index, problems


def check_command(root, benchmark: str | None = None) -> str:
    """The ``svfseg prepare`` command line that checks ``root`` (the benchmark argument is required)."""
    return f"svfseg prepare {benchmark or '{pascal,coco,synthetic,custom}'} --check {root}"


def cache_root() -> Path:
    """The cache folder: ``$SVFSEG_CACHE``, default ``~/.cache/svfseg`` (never inside a dataset root)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "svfseg"


def index_cache_file(root, split: str) -> Path:
    """Where the class index of ``root``'s ``split`` is cached: one folder per resolved root path.

    The file also holds the stamp of the list and labels it was built from, so a changed dataset
    at the same path is rebuilt, and its content fingerprint, checked on every read.
    """
    resolved = str(Path(root).expanduser().resolve())
    key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return cache_root() / "index" / f"{Path(resolved).name or 'root'}-{key}" / f"index-{split}.json"


def _read_cache(cache_file: Path, stamp: str, root: Path, split: str, num_classes: int) -> ClassIndex | None:
    if not cache_file.is_file():
        return None
    try:
        blob = json.loads(cache_file.read_text())
        if blob.get("stamp") == stamp and blob.get("version") == INDEX_VERSION:
            records = tuple(ImageRecord(r[0], r[1], tuple(r[2]), {int(k): v for k, v in r[3].items()}, r[4])
                            for r in blob["records"])
            fp = _content_fingerprint(num_classes, records)
            if fp == blob.get("fingerprint"):
                return ClassIndex(root, split, num_classes, records, fp,
                                  _content_fingerprint(num_classes, records, version=1))
            log.warning("%s: cached class index fails its fingerprint; rebuilding", cache_file)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("%s: unreadable cached class index (%s); rebuilding", cache_file, e)
    return None


def _raise_problems(problems: list[str], where: Path, root: Path, benchmark: str | None) -> None:
    shown = "\n  ".join(problems[:_MAX_REPORTED])
    more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
    raise DataError(f"{where}: {len(problems)} problem(s) in the dataset "
                    f"(run `{check_command(root, benchmark)}` for the full list):\n  {shown}{more}")


def load_class_index(root, split: str, num_classes: int, *, workers: int | None = None,
                     progress: bool = True, cache: bool = True, benchmark: str | None = None,
                     cache_as=None) -> ClassIndex:
    """The class index of a split, from the cache when still valid, else scanned and cached.

    The cache lives in :func:`cache_root` (``$SVFSEG_CACHE``), keyed by the root's path, so a
    read-only or shared dataset root works; a cache an older svfseg wrote in ``root/.svfseg_cache``
    is still read. Validity is checked with a stamp of the list file and the size/mtime of every
    label, so a second start on COCO (82k masks) costs a few seconds of ``stat`` calls.

    ``benchmark`` only names the benchmark in the ``svfseg prepare ... --check`` hint of an error.
    ``cache_as``: key the cache by this path instead of ``root`` (preparation scans a temporary
    folder that is then renamed to it).

    Raises:
        DataError: listing every missing/unreadable file, size mismatch and out-of-range label found.
    """
    root = Path(root)
    lf = list_path(root, split)
    pairs = read_list(lf)
    stamp = _source_stamp(lf, root, pairs, num_classes, workers)
    cache_file = index_cache_file(cache_as if cache_as is not None else root, split)
    if cache:
        for f in (cache_file, root / CACHE_DIR / f"index-{split}.json"):
            found = _read_cache(f, stamp, root, split, num_classes)
            if found is not None:
                return found
    index, problems = build_class_index(root, split, num_classes, workers=workers, progress=progress)
    if problems:
        _raise_problems(problems, lf, root, benchmark)
    if cache:
        blob = {"version": INDEX_VERSION, "stamp": stamp, "fingerprint": index.fingerprint,
                "num_classes": num_classes,
                "records": [[r.image, r.label, list(r.hw), {str(k): v for k, v in r.counts.items()}, r.digest]
                            for r in index.records]}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(blob, separators=(",", ":")))
            os.replace(tmp, cache_file)
        except OSError as e:
            log.warning("%s: cannot write the class index cache (%s); it will be rebuilt next time",
                        cache_file, e)
    return index
