"""Engine-side data plumbing: datasets from the config and DataLoaders that keep off the global RNG."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from svfseg.config import ExperimentConfig
from svfseg.data.benchmark import Benchmark, DataSettings
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


def resolve_benchmark(cfg: ExperimentConfig) -> Benchmark:
    """The benchmark of ``cfg``, resolved once per run (a custom root's ``dataset.yaml`` is read here).

    Pass the result down (``bench=``) to everything of the same run that needs the class split,
    count or names; each function below resolves it itself only when it is not given one.
    """
    from svfseg.data.splits import CUSTOM

    if cfg.data.benchmark == CUSTOM:
        _check_root(cfg)  # its classes live in the root: the hint to prepare it, not a missing-file error
    return Benchmark.resolve(cfg.data.benchmark, cfg.data.root, cfg.data.convention)


def benchmark_of(cfg: ExperimentConfig, bench: Optional[Benchmark] = None) -> Benchmark:
    """``bench`` if given (checked to be ``cfg``'s), else ``cfg``'s benchmark resolved now."""
    if bench is None:
        return resolve_benchmark(cfg)
    d = cfg.data
    if (bench.name, bench.root, bench.convention) != (d.benchmark, Path(d.root), d.convention):
        raise ValueError(f"benchmark {bench.name} at {bench.root} ({bench.convention}) was resolved for another "
                         f"config: expected data.benchmark={d.benchmark} at data.root={d.root} ({d.convention})")
    return bench


def data_settings(cfg: ExperimentConfig) -> DataSettings:
    """How ``cfg``'s datasets make their items (the ``data.*`` keys beyond the benchmark, ``eval.upstream_padding``)."""
    d = cfg.data
    return DataSettings(protocol=d.protocol, train_crop=d.train_crop, train_scale=tuple(d.train_scale),
                        test_size=d.test_size, min_pixels=d.min_pixels, query_rule=d.query_rule,
                        upstream_padding=cfg.eval.upstream_padding)


def train_dataset(cfg: ExperimentConfig, bench: Optional[Benchmark] = None) -> Dataset:
    """The training episodes of ``cfg`` (base classes of ``cfg.fold``); ``bench``: its resolved benchmark."""
    from svfseg.data.build import build_episodic

    _check_root(cfg)
    return build_episodic(benchmark_of(cfg, bench), data_settings(cfg), fold=cfg.fold, split="train", shot=cfg.shot,
                          seed=cfg.seed)


def eval_protocol(cfg: ExperimentConfig, name: Optional[str] = None):
    """The :class:`~svfseg.data.episodes.EvalProtocol` named ``name`` (default ``cfg.eval.protocol``)."""
    from svfseg.data.episodes import PROTOCOLS

    name = name or cfg.eval.protocol
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def eval_dataset(cfg: ExperimentConfig, *, fold: Optional[int] = None, seed: int = 0, count: int = 1000,
                 episodes=None, shot: Optional[int] = None, order: Optional[str] = None,
                 bench: Optional[Benchmark] = None) -> Dataset:
    """Fixed evaluation episodes on the val split (novel classes of ``fold``, default ``cfg.fold``).

    New episodes walk the query pool in ``order`` (default: the order of ``cfg.eval.protocol``,
    so validation files and test episodes follow the same protocol). ``bench``: the run's
    resolved benchmark (None: resolved here).
    """
    from svfseg.data.build import build_episodic

    _check_root(cfg)
    return build_episodic(benchmark_of(cfg, bench), data_settings(cfg), fold=cfg.fold if fold is None else fold,
                          split="val", shot=cfg.shot if shot is None else shot, seed=seed, episodes=episodes,
                          num_episodes=count, order=order or eval_protocol(cfg).order)


def write_episode_file(cfg: ExperimentConfig, out, *, seed: int = 0, count: int = 1000,
                       fold: Optional[int] = None, shot: Optional[int] = None, bench: Optional[Benchmark] = None):
    """Make fixed evaluation episodes for ``cfg`` (its val split, novel classes) and save them to ``out``.

    The file is what ``svfseg test --episodes`` reads; it carries the dataset fingerprint, so it is
    refused on other data.

    Returns:
        The saved :class:`~svfseg.data.episodes.EpisodeList`.
    """
    episodes = eval_dataset(cfg, fold=fold, seed=seed, count=count, shot=shot, bench=bench).episodes
    episodes.save(out)
    return episodes


def episode_summary(cfg: ExperimentConfig, episodes, bench: Optional[Benchmark] = None) -> str:
    """One line per class: how many of the episodes ask about it, with its name."""
    from collections import Counter

    names = benchmark_of(cfg, bench).class_names
    per = Counter(e.class_id for e in episodes.episodes)
    return ", ".join(f"{c} {names[c - 1]}: {per[c]}" for c in sorted(per))


def _check_root(cfg: ExperimentConfig) -> None:
    root = Path(cfg.data.root)
    if not root.is_dir():
        hint = ("`svfseg demo` generates it" if cfg.data.benchmark == "synthetic"
                else f"prepare it with `svfseg prepare {cfg.data.benchmark} ...`")
        raise FileNotFoundError(f"data.root={cfg.data.root!r}: no such folder ({hint}, or set data.root=...)")


def heldout_base_fold(fold: int, folds: int = 4) -> int:
    """The fold whose novel classes serve as held-out base-class episodes for ``fold``.

    Every novel class of fold ``(fold + 1) % folds`` is a base class of ``fold``; its val-split
    episodes use images never seen in training, so checkpoint selection on them does not
    look at the test fold's classes.
    """
    return (fold + 1) % folds


def semantic_dataset(cfg: ExperimentConfig, split: str, bench: Optional[Benchmark] = None) -> Dataset:
    """Semantic-segmentation data of ``cfg`` (base classes of ``cfg.fold``; novel pixels are background)."""
    from svfseg.data.semantic import build_semantic

    _check_root(cfg)
    return build_semantic(benchmark_of(cfg, bench), data_settings(cfg), split=split, fold=cfg.fold, seed=cfg.seed)


def run_facts(cfg: ExperimentConfig, bench: Optional[Benchmark] = None):
    """What a model's recipe may know of the run ``cfg`` describes (``svfseg.models.recipe.RunFacts``).

    The fold's class split comes from ``bench`` when given; otherwise it is resolved only when a
    recipe asks (a custom root's ``dataset.yaml`` is read then), so building a model that needs
    no classes never touches the data root.
    """
    from svfseg.models.recipe import ClassFacts, RunFacts

    d, m = cfg.data, cfg.model

    def classes() -> ClassFacts:
        b = benchmark_of(cfg, bench)
        return ClassFacts(tuple(b.split(cfg.fold).base), b.num_classes)

    return RunFacts(benchmark=d.benchmark, fold=cfg.fold, shot=cfg.shot, output_dir=cfg.output_dir, model=m.name,
                    backbone=m.backbone, convention=d.convention, backbone_kwargs=dict(m.backbone_kwargs),
                    head=dict(m.head), base_checkpoint=m.base_checkpoint, resolve_classes=classes)
