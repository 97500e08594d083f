"""Engine-side data plumbing: datasets of a resolved run and DataLoaders that keep off the global RNG.

Every dataset function takes the command's :class:`~svfseg.engine.resolved.ResolvedRun` (its config and
benchmark, resolved once) and resolves nothing itself.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from svfseg.config import ExperimentConfig
from svfseg.data.benchmark import DataSettings
from svfseg.data.collate import collate_episodes
from svfseg.engine.resolved import ResolvedRun, check_root

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


def data_settings(cfg: ExperimentConfig) -> DataSettings:
    """How ``cfg``'s datasets make their items (the ``data.*`` keys beyond the benchmark, ``eval.upstream_padding``)."""
    d = cfg.data
    return DataSettings(protocol=d.protocol, train_crop=d.train_crop, train_scale=tuple(d.train_scale),
                        test_size=d.test_size, min_pixels=d.min_pixels, query_rule=d.query_rule,
                        upstream_padding=cfg.eval.upstream_padding)


def train_dataset(run: ResolvedRun) -> Dataset:
    """The training episodes of the run (base classes of ``cfg.fold``)."""
    from svfseg.data.build import build_episodic

    cfg = run.cfg
    check_root(cfg)
    return build_episodic(run.bench, data_settings(cfg), fold=cfg.fold, split="train", shot=cfg.shot, seed=cfg.seed)


def eval_protocol(cfg: ExperimentConfig, name: Optional[str] = None):
    """The :class:`~svfseg.data.episodes.EvalProtocol` named ``name`` (default ``cfg.eval.protocol``)."""
    from svfseg.data.episodes import PROTOCOLS

    name = name or cfg.eval.protocol
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def eval_dataset(run: ResolvedRun, *, fold: Optional[int] = None, seed: int = 0, count: int = 1000,
                 episodes=None, shot: Optional[int] = None, order: Optional[str] = None) -> Dataset:
    """Fixed evaluation episodes on the val split (novel classes of ``fold``, default ``cfg.fold``).

    New episodes walk the query pool in ``order`` (default: the order of ``cfg.eval.protocol``,
    so validation files and test episodes follow the same protocol).
    """
    from svfseg.data.build import build_episodic

    cfg = run.cfg
    check_root(cfg)
    return build_episodic(run.bench, data_settings(cfg), fold=cfg.fold if fold is None else fold,
                          split="val", shot=cfg.shot if shot is None else shot, seed=seed, episodes=episodes,
                          num_episodes=count, order=order or eval_protocol(cfg).order)


def write_episode_file(run: ResolvedRun, out, *, seed: int = 0, count: int = 1000,
                       fold: Optional[int] = None, shot: Optional[int] = None):
    """Make fixed evaluation episodes for the run (its val split, novel classes) and save them to ``out``.

    The file is what ``svfseg test --episodes`` reads; it carries the dataset fingerprint, so it is
    refused on other data.

    Returns:
        The saved :class:`~svfseg.data.episodes.EpisodeList`.
    """
    episodes = eval_dataset(run, fold=fold, seed=seed, count=count, shot=shot).episodes
    episodes.save(out)
    return episodes


def episode_summary(run: ResolvedRun, episodes) -> str:
    """One line per class: how many of the episodes ask about it, with its name."""
    from collections import Counter

    names = run.bench.class_names
    per = Counter(e.class_id for e in episodes.episodes)
    return ", ".join(f"{c} {names[c - 1]}: {per[c]}" for c in sorted(per))


def heldout_base_fold(fold: int, folds: int = 4) -> int:
    """The fold whose novel classes serve as held-out base-class episodes for ``fold``.

    Every novel class of fold ``(fold + 1) % folds`` is a base class of ``fold``; its val-split
    episodes use images never seen in training, so checkpoint selection on them does not
    look at the test fold's classes.
    """
    return (fold + 1) % folds


def semantic_dataset(run: ResolvedRun, split: str) -> Dataset:
    """Semantic-segmentation data of the run (base classes of ``cfg.fold``; novel pixels are background)."""
    from svfseg.data.semantic import build_semantic

    cfg = run.cfg
    check_root(cfg)
    return build_semantic(run.bench, data_settings(cfg), split=split, fold=cfg.fold, seed=cfg.seed)
