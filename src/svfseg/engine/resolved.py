"""The resolved run: a config with its benchmark and the facts a model recipe may know, made once per command.

``svfseg train`` makes one in ``engine.run.train_run``, ``svfseg test`` in ``Task.test``, ``merge`` in
``engine.model.export_merged_checkpoint``, ``episodes`` in the CLI, ``predict``/``serve``/``demo``
through ``engine.model.load_for_inference``; everything below them (datasets, the model, its
description, its dependencies, scoring) takes the :class:`ResolvedRun` and resolves nothing itself,
so a custom root's ``dataset.yaml`` is read once per command.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from svfseg.config import ExperimentConfig
from svfseg.data.benchmark import Benchmark
from svfseg.models.recipe import ClassFacts, RunFacts


@dataclass(frozen=True)
class ResolvedRun:
    """``cfg`` with its :class:`~svfseg.data.benchmark.Benchmark` and :class:`~svfseg.models.recipe.RunFacts`.

    Make it with :func:`resolve_run`; :meth:`with_config` gives the same benchmark to a changed copy
    of the config (a merged export's frozen-backbone config).

    Raises:
        ValueError: ``bench`` was resolved for another config (benchmark, root or convention).
    """

    cfg: ExperimentConfig
    bench: Benchmark
    facts: RunFacts

    def __post_init__(self):
        d = self.cfg.data
        if (self.bench.name, self.bench.root, self.bench.convention) != (d.benchmark, Path(d.root), d.convention):
            raise ValueError(f"benchmark {self.bench.name} at {self.bench.root} ({self.bench.convention}) was resolved "
                             f"for another config: expected data.benchmark={d.benchmark} at data.root={d.root} "
                             f"({d.convention})")

    @classmethod
    def of(cls, cfg: ExperimentConfig, bench: Benchmark) -> "ResolvedRun":
        """``cfg`` with an already resolved ``bench`` (checked to be ``cfg``'s)."""
        return cls(cfg, bench, _facts(cfg, bench))

    def with_config(self, cfg: ExperimentConfig) -> "ResolvedRun":
        """Another config of the same data (checked), with the same benchmark and its own facts."""
        return ResolvedRun.of(cfg, self.bench)


def resolve_run(cfg: ExperimentConfig) -> ResolvedRun:
    """``cfg`` resolved: its benchmark (a custom root's ``dataset.yaml`` read here, once) and run facts."""
    return ResolvedRun.of(cfg, resolve_benchmark(cfg))


def resolve_benchmark(cfg: ExperimentConfig) -> Benchmark:
    """The benchmark of ``cfg`` (a custom root's ``dataset.yaml`` is read here); :func:`resolve_run` calls it."""
    from svfseg.data.splits import CUSTOM

    if cfg.data.benchmark == CUSTOM:
        check_root(cfg)  # its classes live in the root: the hint to prepare it, not a missing-file error
    return Benchmark.resolve(cfg.data.benchmark, cfg.data.root, cfg.data.convention)


def check_root(cfg: ExperimentConfig) -> None:
    """Refuse a ``data.root`` that is not a folder, saying how to make it.

    Raises:
        FileNotFoundError: naming the key and the command that prepares the root.
    """
    root = Path(cfg.data.root)
    if not root.is_dir():
        hint = ("`svfseg demo` generates it" if cfg.data.benchmark == "synthetic"
                else f"prepare it with `svfseg prepare {cfg.data.benchmark} ...`")
        raise FileNotFoundError(f"data.root={cfg.data.root!r}: no such folder ({hint}, or set data.root=...)")


def _facts(cfg: ExperimentConfig, bench: Benchmark) -> RunFacts:
    """What a model's recipe may know of the run ``cfg`` describes; the class split from ``bench``."""
    d, m = cfg.data, cfg.model

    def classes() -> ClassFacts:  # asked by recipes that need it (an impossible fold: the split's own error)
        return ClassFacts(tuple(bench.split(cfg.fold).base), bench.num_classes)

    return RunFacts(benchmark=d.benchmark, fold=cfg.fold, shot=cfg.shot, output_dir=cfg.output_dir, model=m.name,
                    backbone=m.backbone, convention=d.convention, backbone_kwargs=dict(m.backbone_kwargs),
                    head=dict(m.head), base_checkpoint=m.base_checkpoint, resolve_classes=classes)
