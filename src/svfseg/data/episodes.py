"""Episode pools and sampling: seeded, reproducible, serialisable evaluation episode lists."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from svfseg.data.index import ClassIndex
from svfseg.data.io import DataError

__all__ = [
    "EpisodePool", "make_pool", "sample_episode", "Episode", "EpisodeList", "make_episodes",
    "EvalProtocol", "PROTOCOLS", "TRAIN_PROTOCOLS", "DEFAULT_MIN_PIXELS", "QUERY_RULES", "BAM_SEEDS",
    "QUERY_ORDERS", "EMPTY_CLASS_RULES",
]

# Small-object rule: a class counts for an image only if it covers >= 2*32*32 pixels (Pascal/COCO).
DEFAULT_MIN_PIXELS = 2048
TRAIN_PROTOCOLS = ("dagger", "pfenet")
# Which classes a query image may be asked about. "any": every pool class present in it, of any
# size (PFENet/BAM/SVF: the size rule only decides list membership and supports). "min_pixels":
# only classes that pass the size rule (svfseg before issue 11; files without the field used it).
QUERY_RULES = ("any", "min_pixels")
LEGACY_QUERY_RULE = "min_pixels"
EPISODES_VERSION = 2
# How evaluation walks the query pool. "permuted": a fresh seeded permutation per pass (svfseg's
# draw). "list": the pool in list-file order, again and again, as PFENet's and BAM's test loaders
# do (shuffle=False): every seed then sees the same query images, only classes and supports differ.
QUERY_ORDERS = ("permuted", "list")
# A fold class without any episode: "drop" leaves it out of mIoU (NaN per class, svfseg's rule);
# "zero" scores it 0 and divides by the fold's class count (PFENet/BAM: inter / (union + 1e-10)).
EMPTY_CLASS_RULES = ("drop", "zero")
#: Most episodes one list may hold: 50x the largest protocol's (PFENet's 20,000 on COCO), about 100 MB of
#: JSON and a minute to make; the config's ``MAX_EPISODES`` is the same number (a test keeps them equal).
MAX_EPISODES = 1_000_000
#: Lists at least this long log their progress (a tenth at a time) while they are made.
PROGRESS_FROM = 100_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodePool:
    """Which images may be queries, with which classes, and which images support each class.

    ``queries`` and the values of ``class_images`` are positions in ``index.records``.
    """

    index: ClassIndex
    classes: tuple[int, ...]
    queries: tuple[int, ...]
    query_classes: tuple[tuple[int, ...], ...]
    class_images: dict[int, np.ndarray]
    min_pixels: int
    query_rule: str = "any"

    def __len__(self) -> int:
        return len(self.queries)


def make_pool(index: ClassIndex, classes: Sequence[int], *, shot: int, min_pixels: int = DEFAULT_MIN_PIXELS,
              exclude_any: Sequence[int] = (), query_rule: str = "any") -> EpisodePool:
    """Filter an index into an episode pool.

    An image is dropped if it holds any pixel of a class in ``exclude_any`` (the † protocol drops
    training images that show a novel class). Class ``c`` counts for an image when it covers
    ``>= min_pixels`` pixels; support images of ``c`` are the kept images where it counts, so a
    support mask always has foreground. Query images are the kept images where some class counts.
    A query's eligible classes are, with ``query_rule="any"`` (upstream's rule), all classes of
    ``classes`` present in it at any size, and with ``"min_pixels"`` only those that count for it;
    either way a class needs at least ``shot`` support images other than the query.

    Raises:
        ValueError: unknown ``query_rule``.
        DataError: a class of ``classes`` has fewer than ``shot + 1`` images after filtering.
    """
    if query_rule not in QUERY_RULES:
        raise ValueError(f"query_rule must be one of {QUERY_RULES}, got {query_rule!r}")
    classes = tuple(sorted(classes))
    excl = set(exclude_any)
    members: dict[int, list[int]] = {c: [] for c in classes}
    kept: list[int] = []
    for i, r in enumerate(index.records):
        if excl and any(c in excl for c in r.counts):
            continue
        kept.append(i)
        for c in classes:
            if r.counts.get(c, 0) >= min_pixels:
                members[c].append(i)
    short = {c: len(v) for c, v in members.items() if len(v) < shot + 1}
    if short:
        raise DataError(
            f"{index.root} ({index.split}): after filtering (>= {min_pixels} px per class"
            f"{', images with classes ' + str(sorted(excl)) + ' dropped' if excl else ''}) "
            f"{shot}-shot episodes need >= {shot + 1} images per class; found class:count {short} "
            f"(lower the size rule with data.min_pixels=N, now {min_pixels}, or add images of these classes)")
    class_images = {c: np.asarray(v, dtype=np.int64) for c, v in members.items()}
    floor = min_pixels if query_rule == "min_pixels" else 1
    queries, qclasses = [], []
    for i in kept:
        r = index.records[i]
        if not any(r.counts.get(c, 0) >= min_pixels for c in classes):
            continue  # not in the list at all: no class passes the size rule here
        # A class needs `shot` supports besides this image (which supports c when it counts for c).
        elig = tuple(c for c in classes if r.counts.get(c, 0) >= floor
                     and len(members[c]) - int(r.counts.get(c, 0) >= min_pixels) >= shot)
        if elig:
            queries.append(i)
            qclasses.append(elig)
    return EpisodePool(index, classes, tuple(queries), tuple(qclasses), class_images, min_pixels, query_rule)


def sample_episode(pool: EpisodePool, query_pos: int, shot: int,
                   rng: np.random.Generator) -> tuple[int, int, tuple[int, ...]]:
    """Draw (class, supports) for the query at ``pool.queries[query_pos]``.

    The class is uniform among the query's eligible classes; the ``shot`` supports are drawn
    without replacement among the class's images, never the query itself.

    Returns:
        (query record position, class id, support record positions).
    """
    q = pool.queries[query_pos]
    elig = pool.query_classes[query_pos]
    c = elig[int(rng.integers(len(elig)))] if len(elig) > 1 else elig[0]
    cand = pool.class_images[c]
    cand = cand[cand != q]
    sup = rng.choice(cand, size=shot, replace=False)
    return q, c, tuple(int(s) for s in sup)


@dataclass(frozen=True)
class Episode:
    """One evaluation episode: image paths (as in the list file) and the class id."""

    query: str
    class_id: int
    supports: tuple[str, ...]


@dataclass(frozen=True)
class EpisodeList:
    """A fixed, ordered list of episodes plus the parameters and data fingerprint that made it.

    ``query_rule`` names the query-class rule of the pool (see :func:`make_pool`); files written
    before it was recorded load as ``"min_pixels"``, the rule that made them. ``order`` is how
    the queries were walked (``QUERY_ORDERS``; files without it were permuted). ``query_list`` names
    the given list file the root's split list was made from (``svfseg prepare --val-list``), ""
    when svfseg made the list.
    """

    benchmark: str
    split: str
    fold: int
    shot: int
    seed: int
    convention: str
    min_pixels: int
    dataset_fingerprint: str
    episodes: tuple[Episode, ...] = field(repr=False)
    query_rule: str = LEGACY_QUERY_RULE
    order: str = "permuted"
    query_list: str = ""

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Episode:
        return self.episodes[i]

    def _payload(self) -> dict:
        d = asdict(self)
        d["episodes"] = [[e.query, e.class_id, list(e.supports)] for e in self.episodes]
        if self.query_rule == LEGACY_QUERY_RULE:
            # Lists made before the field existed used this rule: leaving it out keeps their
            # fingerprints (and so their saved files) valid.
            del d["query_rule"]
        if self.order == "permuted":
            del d["order"]  # likewise for lists made before the field existed
        if not self.query_list:
            del d["query_list"]  # likewise
        return d

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the dataset fingerprint, the parameters and every episode."""
        blob = json.dumps(self._payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (with ``version`` and ``fingerprint``); returns the path."""
        path = Path(path)
        if len(self) >= PROGRESS_FROM:
            log.info("episodes: writing %s episodes to %s", f"{len(self):,}", path)
        blob = {"version": EPISODES_VERSION, "fingerprint": self.fingerprint, **self._payload()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(blob, indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, dataset_fingerprint: str | None = None) -> "EpisodeList":
        """Read a saved list; check its own fingerprint and, if given, the dataset's.

        Raises:
            DataError: unreadable file, edited content, or made from a different dataset.
        """
        path = Path(path)
        try:
            blob = json.loads(path.read_text())
            eps = tuple(Episode(str(q), int(c), tuple(str(s) for s in sup)) for q, c, sup in blob["episodes"])
            out = cls(blob["benchmark"], blob["split"], int(blob["fold"]), int(blob["shot"]), int(blob["seed"]),
                      blob["convention"], int(blob["min_pixels"]), blob["dataset_fingerprint"], eps,
                      str(blob.get("query_rule", LEGACY_QUERY_RULE)), str(blob.get("order", "permuted")),
                      str(blob.get("query_list", "")))
            stored = blob["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: expected an svfseg episode list (JSON), could not read it: {e}") from None
        if out.fingerprint != stored:
            raise DataError(f"{path}: episode list fingerprint mismatch (stored {stored}, content gives "
                            f"{out.fingerprint}): the file was edited or is corrupt")
        if dataset_fingerprint is not None:
            out.check_dataset(dataset_fingerprint, where=str(path))
        return out

    def check_classes_present(self, index: ClassIndex, where: str = "episode list") -> None:
        """Raise DataError for episodes whose class has no pixel in the query or in a support.

        Such an episode (an edited file, a list made from other labels) scores 100% IoU whatever
        the model predicts, so it is refused rather than counted.
        """
        pos = index.position()
        bad = []
        for i, e in enumerate(self.episodes):
            absent = [img for img in (e.query, *e.supports)
                      if img in pos and index.records[pos[img]].counts.get(e.class_id, 0) == 0]
            if absent:
                bad.append(f"episode {i} (class {e.class_id}): no pixel of the class in {absent[:2]}")
        if bad:
            raise DataError(f"{where}: expected every episode's class in its query and supports, found {len(bad)} "
                            f"episode(s) without it: {'; '.join(bad[:3])}")

    def check_dataset(self, dataset_fingerprint: str, where: str = "episode list", *, legacy: str = "") -> None:
        """Raise DataError unless the episodes were made from a dataset with this fingerprint.

        ``legacy``: the same dataset's svfseg 0.1 fingerprint (no file contents in it), accepted
        with a warning so episode files of that version keep working.
        """
        if legacy and self.dataset_fingerprint == legacy and dataset_fingerprint != legacy:
            logging.getLogger(__name__).warning(
                "%s: made by svfseg 0.1, whose dataset fingerprint did not cover file contents; names, sizes "
                "and class pixel counts match this dataset", where)
            return
        if dataset_fingerprint != self.dataset_fingerprint:
            raise DataError(
                f"{where}: episodes were made from dataset {self.dataset_fingerprint} but this dataset's "
                f"{self.split} index is {dataset_fingerprint}: the images or labels differ, so scores would "
                f"not be comparable (make new episodes from this dataset)")


def make_episodes(pool: EpisodePool, *, benchmark: str, fold: int, shot: int, seed: int, count: int,
                  convention: str = "interleaved", order: str = "permuted", query_list: str = "") -> EpisodeList:
    """Evaluation episodes: a pure function of (pool data, fold, shot, seed, count, order).

    With ``order="permuted"`` queries are visited in a fresh seeded permutation of the pool on
    each pass (so every query image is used about equally often); with ``"list"`` in the pool's
    list-file order on every pass, whatever the seed (PFENet's and BAM's unshuffled test
    loaders: with more pool images than episodes, as on COCO, only the first ``count`` images
    are queries). For each query the class and supports come from :func:`sample_episode`. The
    first ``n`` episodes do not depend on ``count`` (a longer list extends a shorter one).
    ``query_list`` is recorded as it is (the given list the pool's list file was made from).
    """
    if not 1 <= count <= MAX_EPISODES:
        raise ValueError(f"episode count must be 1 .. {MAX_EPISODES:,}, got {count:,}")
    if shot < 1:
        raise ValueError(f"shot must be >= 1, got {shot}")
    if order not in QUERY_ORDERS:
        raise ValueError(f"order must be one of {QUERY_ORDERS}, got {order!r}")
    rng = np.random.default_rng(seed)
    recs = pool.index.records
    eps: list[Episode] = []
    tenth = count // 10 if count >= PROGRESS_FROM else 0
    while len(eps) < count:
        walk = rng.permutation(len(pool.queries)) if order == "permuted" else range(len(pool.queries))
        for qp in walk:
            q, c, sup = sample_episode(pool, int(qp), shot, rng)
            eps.append(Episode(recs[q].image, c, tuple(recs[s].image for s in sup)))
            if tenth and len(eps) % tenth == 0:
                log.info("episodes: %s of %s made", f"{len(eps):,}", f"{count:,}")
            if len(eps) == count:
                break
    return EpisodeList(benchmark, pool.index.split, fold, shot, seed, convention, pool.min_pixels,
                       pool.index.fingerprint, tuple(eps), pool.query_rule, order, query_list)


@dataclass(frozen=True)
class EvalProtocol:
    """An evaluation protocol: which seeds, how many episodes each (per benchmark), how the query
    pool is walked (``QUERY_ORDERS``) and how a class without episodes counts (``EMPTY_CLASS_RULES``)."""

    seeds: tuple[int, ...]
    counts: dict[str, int]
    order: str = "permuted"
    empty_class: str = "drop"

    def runs(self, benchmark: str) -> list[tuple[int, int]]:
        """(seed, episode count) for every run of this protocol on ``benchmark``."""
        if benchmark not in self.counts:
            raise ValueError(f"no episode count for benchmark {benchmark!r}: expected one of {sorted(self.counts)}")
        return [(s, self.counts[benchmark]) for s in self.seeds]


#: BAM's five test seeds: its test.py seeds numpy with 123 and draws ``randint(0, 1000, 5)``.
BAM_SEEDS = (510, 365, 382, 322, 988)

# PFENet (test.py): one run, seed 321, 5,000 (Pascal) / 20,000 (COCO) episodes, the query list
#      walked in order (its loader has shuffle=False), an empty class scored 0.
# BAM (test.py): 1,000 episodes for each of BAM's 5 seeds, the same list order for every seed
#      (on COCO: the first 1,000 pool images), an empty class scored 0. The seed values are
#      BAM's, but its classes and supports come from Python's `random` inside its dataset, so
#      the same seed draws other classes/supports here: count, seeds, order and best/mean match.
# bam_permuted / pfenet_permuted: the same counts and seeds with svfseg's own draw (a fresh
#      permutation of the pool per pass and seed; empty classes left out of mIoU).
# HSNet: 1,000 episodes, seed 0, svfseg's draw and empty-class rule.
# A custom dataset gets 1,000 episodes per seed under every protocol (its own size is unknown).
_PFENET_COUNTS = {"pascal": 5000, "coco": 20000, "synthetic": 5000, "custom": 1000}
_THOUSAND = {"pascal": 1000, "coco": 1000, "synthetic": 1000, "custom": 1000}
PROTOCOLS: dict[str, EvalProtocol] = {
    "pfenet": EvalProtocol((321,), _PFENET_COUNTS, order="list", empty_class="zero"),
    "bam": EvalProtocol(BAM_SEEDS, _THOUSAND, order="list", empty_class="zero"),
    "hsnet": EvalProtocol((0,), _THOUSAND),
    "pfenet_permuted": EvalProtocol((321,), _PFENET_COUNTS),
    "bam_permuted": EvalProtocol(BAM_SEEDS, _THOUSAND),
}
