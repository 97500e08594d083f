"""Episodic datasets: ``build_episodic`` (a resolved benchmark + settings) and its keyword form ``build_dataset``."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from svfseg.data.episodes import DEFAULT_MIN_PIXELS, TRAIN_PROTOCOLS, EpisodeList, make_episodes, make_pool
from svfseg.data.index import load_class_index
from svfseg.data.io import DataError, list_source
from svfseg.data.episodic import EvalEpisodes, TrainEpisodes
from svfseg.data.benchmark import Benchmark, DataSettings, check_root_dir
from svfseg.data.splits import CUSTOM
from svfseg.data.transforms import TestTransform, TrainTransform

__all__ = ["build_dataset", "build_episodic", "default_min_pixels", "benchmark_min_pixels"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def _median_label_side(root: Path, split: str = "train", limit: int = 200) -> int:
    """Median longer side of (up to ``limit``) label images of a split, from their headers."""
    from svfseg.data.io import image_size, list_path, read_list

    pairs = read_list(list_path(root, split))
    step = max(1, len(pairs) // limit)
    sides = []
    for _, lbl in pairs[::step]:
        try:
            sides.append(max(image_size(root / lbl)))
        except OSError:
            continue  # the index scan reports unreadable labels with their names
    if not sides:
        raise DataError(f"{root}: expected readable label images in the {split} list, found none")
    return sorted(sides)[len(sides) // 2]


def default_min_pixels(root, benchmark: str) -> int:
    """Small-object threshold: 2,048 px for pascal/coco (the protocols' rule); for the other benchmarks
    the same fraction of the image (2,048 / 473^2, 0.9%), scaled by the area ratio of the image size
    to 473 px. Synthetic reads the size from its marker; custom takes ``min_pixels`` or ``image_size``
    from ``dataset.yaml``, else the median longer side of the training labels."""
    return benchmark_min_pixels(Benchmark.resolve(benchmark, root))


def benchmark_min_pixels(bench: Benchmark) -> int:
    """:func:`default_min_pixels` of a resolved benchmark (a custom root's ``dataset.yaml`` is not read again)."""
    from svfseg.data.synthetic import MARKER, scaled_min_pixels

    if bench.name == CUSTOM:
        meta = bench.meta
        if meta.min_pixels is not None:
            return meta.min_pixels
        return scaled_min_pixels(meta.image_size or _median_label_side(bench.root))
    if bench.name != "synthetic":
        return DEFAULT_MIN_PIXELS

    marker = bench.root / MARKER
    try:
        size = int(json.loads(marker.read_text())["params"]["size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{marker}: expected the synthetic dataset marker (made by generate_synthetic), "
                        f"found none or unreadable; pass min_pixels explicitly") from None
    return scaled_min_pixels(size)


def build_dataset(*, root: str | os.PathLike, benchmark: str, fold: int, split: str, shot: int, seed: int = 0,
                  protocol: str = "dagger", convention: str = "interleaved", train_crop: int = 473,
                  train_scale: Sequence[float] = (0.9, 1.1), test_size: int = 473,
                  episodes: EpisodeList | str | os.PathLike | None = None, num_episodes: int = 1000,
                  min_pixels: int | None = None, query_rule: str = "any", workers: int | None = None,
                  upstream_padding: bool = False, order: str = "permuted") -> Dataset:
    """Build an episodic dataset on a Pascal-layout root (the keyword form of :func:`build_episodic`).

    Args:
        root: dataset root (``train.txt``/``val.txt`` lists, images, class-id PNGs).
        benchmark: "pascal", "coco", "synthetic" or "custom".
        fold: 0..3 (custom: the folds of its ``dataset.yaml``).
        split: "train" (base classes, random episodes per epoch) or "val" (novel classes, fixed episodes).
        shot: supports per episode (K).
        seed: training: seed of every episode and augmentation; val: episode seed when ``episodes`` is None.
        protocol: training pool: "dagger" (†, drop images with any novel pixel; default) or
            "pfenet" (keep them; novel pixels are background in the binary masks).
        convention: COCO fold convention, "interleaved" or "consecutive".
        train_crop: training crop side. train_scale: RandScale range.
        test_size: longer side at test (473 Pascal, 641 COCO).
        episodes: val only: an EpisodeList or a path to one (checked against this dataset);
            None makes ``num_episodes`` episodes from ``seed``.
        num_episodes: val episode count when ``episodes`` is None.
        min_pixels: small-object threshold (``data.min_pixels``); None: :func:`default_min_pixels`.
        query_rule: which classes a query may be asked about: "any" (every fold class it shows,
            of any size: PFENet/BAM) or "min_pixels" (only classes passing the size rule).
            Supports always pass the size rule. A loaded episode file keeps its own rule.
        workers: processes for a first-time class-index scan.
        upstream_padding: val only: PFENet/BAM's test geometry (see ``TestTransform.upstream``).
        order: val only, new episodes: how the query pool is walked ("permuted" or "list", see
            :func:`~svfseg.data.episodes.make_episodes`).

    Returns:
        TrainEpisodes (``len`` = query pool size, ``set_epoch``) or EvalEpisodes (``len`` = episodes,
        ``.episodes``).
    """
    _check_request(split, protocol, shot)
    bench = Benchmark.resolve(benchmark, check_root_dir(root), convention)
    settings = DataSettings(protocol=protocol, train_crop=train_crop, train_scale=tuple(train_scale),
                            test_size=test_size, min_pixels=min_pixels, query_rule=query_rule,
                            upstream_padding=upstream_padding, workers=workers)
    return build_episodic(bench, settings, fold=fold, split=split, shot=shot, seed=seed, episodes=episodes,
                          num_episodes=num_episodes, order=order)


def _check_request(split: str, protocol: str, shot) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if protocol not in TRAIN_PROTOCOLS:
        raise ValueError(f"protocol must be one of {TRAIN_PROTOCOLS}, got {protocol!r}")
    if not isinstance(shot, int) or shot < 1:
        raise ValueError(f"shot must be a positive int, got {shot!r}")


def build_episodic(bench: Benchmark, settings: DataSettings = DataSettings(), *, fold: int, split: str, shot: int,
                   seed: int = 0, episodes: EpisodeList | str | os.PathLike | None = None, num_episodes: int = 1000,
                   order: str = "permuted") -> Dataset:
    """The episodic dataset of ``bench``'s ``fold`` (see :func:`build_dataset` for the arguments).

    The class split comes from ``bench`` (resolved once per run), how items are made from ``settings``.
    """
    _check_request(split, settings.protocol, shot)
    root = check_root_dir(bench.root)
    benchmark, convention, s = bench.name, bench.convention, settings
    sp = bench.split(fold)
    min_pixels, source = s.min_pixels, "data.min_pixels"
    if min_pixels is None:
        min_pixels, source = benchmark_min_pixels(bench), f"default for {benchmark}"
    log.info("small-object rule: min_pixels=%d (%s)", min_pixels, source)
    index = load_class_index(root, split, bench.num_classes, workers=s.workers, benchmark=benchmark)
    if split == "train":
        if episodes is not None:
            raise ValueError("episodes= fixes evaluation episodes; training episodes are drawn per epoch "
                             "from (seed, epoch, index): pass it with split='val'")
        pool = make_pool(index, sp.base, shot=shot, min_pixels=min_pixels, query_rule=s.query_rule,
                         exclude_any=sp.novel if s.protocol == "dagger" else ())
        log.info("%s fold %d train pool (%s): %d query images", benchmark, fold, s.protocol, len(pool))
        tr = TrainTransform(crop=s.train_crop, scale=(float(s.train_scale[0]), float(s.train_scale[1])))
        return TrainEpisodes(pool, shot=shot, seed=seed, transform=tr)
    pool = make_pool(index, sp.novel, shot=shot, min_pixels=min_pixels, query_rule=s.query_rule)
    if episodes is None:
        episodes = make_episodes(pool, benchmark=benchmark, fold=fold, shot=shot, seed=seed,
                                 count=num_episodes, convention=convention, order=order,
                                 query_list=list_source(root, split))
    where = "episode list"
    if episodes is not None and not isinstance(episodes, EpisodeList):
        where = str(episodes)
        episodes = EpisodeList.load(episodes)  # the dataset check is EvalEpisodes' (legacy lists too)
    want = dict(benchmark=benchmark, split=split, fold=fold, shot=shot, convention=convention)
    got = {k: getattr(episodes, k) for k in want}
    if got != want:
        raise DataError(f"{where}: episode list made for {got}, but the dataset asked for {want}")
    check_episode_contents(episodes, sp.novel, shot, fold, where)
    if episodes.query_rule != s.query_rule:
        log.warning("episode list made with query_rule=%r, dataset asked for %r: the list's episodes are used "
                    "as they are", episodes.query_rule, s.query_rule)
    log.info("%s fold %d val: %d episodes over %d query images", benchmark, fold, len(episodes), len(pool))
    return EvalEpisodes(pool, episodes, transform=TestTransform(size=s.test_size, upstream=s.upstream_padding))


def check_episode_contents(episodes: EpisodeList, novel, shot: int, fold: int, where: str) -> None:
    """Refuse an episode list that has no episodes, asks about a class that is not novel in ``fold``,
    or holds another number of supports than its shot (an edited file with a fitting fingerprint).

    Raises:
        DataError: naming the file and the first bad episode.
    """
    if not len(episodes):
        raise DataError(f"{where}: expected at least one episode, found no episodes")
    for i, e in enumerate(episodes.episodes):
        if e.class_id not in novel:
            raise DataError(f"{where}: expected episodes of the novel classes {sorted(novel)} of fold {fold}, "
                            f"found base class {e.class_id} in episode {i}")
        if len(e.supports) != shot:
            raise DataError(f"{where}: expected {shot} supports per episode ({shot}-shot), found "
                            f"{len(e.supports)} supports in episode {i}")
