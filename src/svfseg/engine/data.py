"""Engine-side data plumbing: datasets from the config and DataLoaders that keep off the global RNG."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from svfseg.config import ExperimentConfig
from svfseg.data.collate import collate_episodes

logger = logging.getLogger(__name__)


def make_loader(dataset: Dataset, *, batch_sampler: Optional[Sampler] = None, sampler: Optional[Sampler] = None,
                batch_size: int = 1, workers: int = 0, pin_memory: bool = False,
                collate_fn=collate_episodes) -> DataLoader:
    """A DataLoader that never touches the global torch RNG (it gets its own generator).

    The episodes' randomness comes from (seed, epoch, index) inside the dataset; keeping the
    loader off the global RNG is what makes a resumed run continue the same dropout stream.
    ``collate_fn`` defaults to the episode collate.
    """
    kw = dict(num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
              generator=torch.Generator().manual_seed(0), persistent_workers=False)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, shuffle=False, drop_last=False, **kw)


def train_dataset(cfg: ExperimentConfig) -> Dataset:
    """The training episodes of ``cfg`` (base classes of ``cfg.fold``)."""
    from svfseg.data.build import build_dataset

    _check_root(cfg)
    d = cfg.data
    return build_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold, split="train", shot=cfg.shot,
                         seed=cfg.seed, protocol=d.protocol, convention=d.convention, train_crop=d.train_crop,
                         train_scale=d.train_scale, test_size=d.test_size, query_rule=d.query_rule,
                         min_pixels=d.min_pixels)


def eval_protocol(cfg: ExperimentConfig, name: Optional[str] = None):
    """The :class:`~svfseg.data.episodes.EvalProtocol` named ``name`` (default ``cfg.eval.protocol``)."""
    from svfseg.data.episodes import PROTOCOLS

    name = name or cfg.eval.protocol
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def eval_dataset(cfg: ExperimentConfig, *, fold: Optional[int] = None, seed: int = 0, count: int = 1000,
                 episodes=None, shot: Optional[int] = None, order: Optional[str] = None) -> Dataset:
    """Fixed evaluation episodes on the val split (novel classes of ``fold``, default ``cfg.fold``).

    New episodes walk the query pool in ``order`` (default: the order of ``cfg.eval.protocol``,
    so validation files and test episodes follow the same protocol).
    """
    from svfseg.data.build import build_dataset

    _check_root(cfg)
    d = cfg.data
    return build_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold if fold is None else fold,
                         split="val", shot=cfg.shot if shot is None else shot, seed=seed, protocol=d.protocol,
                         convention=d.convention, test_size=d.test_size, episodes=episodes, num_episodes=count,
                         query_rule=d.query_rule, min_pixels=d.min_pixels,
                         upstream_padding=cfg.eval.upstream_padding,
                         order=order or eval_protocol(cfg).order)


def write_episode_file(cfg: ExperimentConfig, out, *, seed: int = 0, count: int = 1000,
                       fold: Optional[int] = None, shot: Optional[int] = None):
    """Make fixed evaluation episodes for ``cfg`` (its val split, novel classes) and save them to ``out``.

    The file is what ``svfseg test --episodes`` reads; it carries the dataset fingerprint, so it is
    refused on other data.

    Returns:
        The saved :class:`~svfseg.data.episodes.EpisodeList`.
    """
    episodes = eval_dataset(cfg, fold=fold, seed=seed, count=count, shot=shot).episodes
    episodes.save(out)
    return episodes


def episode_summary(cfg: ExperimentConfig, episodes) -> str:
    """One line per class: how many of the episodes ask about it, with its name."""
    from collections import Counter

    names = class_names_of(cfg)
    per = Counter(e.class_id for e in episodes.episodes)
    return ", ".join(f"{c} {names[c - 1]}: {per[c]}" for c in sorted(per))


def _check_root(cfg: ExperimentConfig) -> None:
    root = Path(cfg.data.root)
    if not root.is_dir():
        hint = ("`svfseg demo` generates it" if cfg.data.benchmark == "synthetic"
                else f"prepare it with `svfseg prepare {cfg.data.benchmark} ...`")
        raise FileNotFoundError(f"data.root={cfg.data.root!r}: no such folder ({hint}, or set data.root=...)")


def benchmark_classes(cfg: ExperimentConfig):
    """The classes and folds of a custom benchmark (``data.root``'s dataset.yaml); None for the built-ins."""
    from svfseg.data.meta import benchmark_meta

    return benchmark_meta(cfg.data.benchmark, cfg.data.root)


def class_names_of(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Class names of the config's benchmark (custom: from the root's dataset.yaml), indexed by id - 1."""
    from svfseg.data.splits import class_names

    return class_names(cfg.data.benchmark, benchmark_classes(cfg))


def novel_classes(cfg: ExperimentConfig, fold: Optional[int] = None) -> Sequence[int]:
    """Novel class ids of a fold (what mIoU averages over)."""
    from svfseg.data.splits import class_split

    return class_split(cfg.data.benchmark, cfg.fold if fold is None else fold, cfg.data.convention,
                       benchmark_classes(cfg)).novel


def heldout_base_fold(fold: int, folds: int = 4) -> int:
    """The fold whose novel classes serve as held-out base-class episodes for ``fold``.

    Every novel class of fold ``(fold + 1) % folds`` is a base class of ``fold``; its val-split
    episodes use images never seen in training, so checkpoint selection on them does not
    look at the test fold's classes.
    """
    return (fold + 1) % folds


def semantic_dataset(cfg: ExperimentConfig, split: str) -> Dataset:
    """Semantic-segmentation data of ``cfg`` (base classes of ``cfg.fold``; novel pixels are background)."""
    from svfseg.data.semantic import build_semantic_dataset

    _check_root(cfg)
    d = cfg.data
    return build_semantic_dataset(root=d.root, benchmark=d.benchmark, fold=cfg.fold, split=split, seed=cfg.seed,
                                  protocol=d.protocol, convention=d.convention, train_crop=d.train_crop,
                                  train_scale=d.train_scale, test_size=d.test_size)


def run_facts(cfg: ExperimentConfig):
    """What a model's recipe may know of the run ``cfg`` describes (``svfseg.models.recipe.RunFacts``).

    The fold's class split is resolved only when a recipe asks (a custom root's ``dataset.yaml``
    is read then), so building a model that needs no classes never touches the data root.
    """
    from svfseg.data.meta import benchmark_meta
    from svfseg.data.splits import class_split, num_classes
    from svfseg.models.recipe import ClassFacts, RunFacts

    d, m = cfg.data, cfg.model

    def classes() -> ClassFacts:
        meta = benchmark_meta(d.benchmark, d.root)
        return ClassFacts(tuple(class_split(d.benchmark, cfg.fold, d.convention, meta).base),
                          num_classes(d.benchmark, meta))

    return RunFacts(benchmark=d.benchmark, fold=cfg.fold, shot=cfg.shot, output_dir=cfg.output_dir, model=m.name,
                    backbone=m.backbone, convention=d.convention, backbone_kwargs=dict(m.backbone_kwargs),
                    head=dict(m.head), base_checkpoint=m.base_checkpoint, resolve_classes=classes)
