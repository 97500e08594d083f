"""What BAM's two stages need from a run: base classes, shot, the stage-1 checkpoint and its checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from svfseg.models.recipe import Dependency, ModelRecipe, PriorHeadRecipe, RunFacts

BASE_MODEL = "bam_base"
#: Placeholders allowed in ``model.base_checkpoint``.
CHECKPOINT_FIELDS = ("output_dir", "benchmark", "fold", "backbone")


def base_classes(cfg: RunFacts) -> tuple[int, ...]:
    """Benchmark ids of the base classes of ``cfg.fold`` (channel order of the base learner)."""
    return tuple(cfg.classes().base)


def base_checkpoint_path(cfg: RunFacts) -> Path:
    """``model.base_checkpoint`` with ``{fold}``, ``{benchmark}``, ``{backbone}``, ``{output_dir}`` filled in."""
    template = cfg.base_checkpoint
    if not template:
        raise ValueError("model.base_checkpoint is not set: BAM (stage 2) needs the stage-1 base learner, e.g. "
                         "model.base_checkpoint=runs/<stage-1 run>/best.pt (train it with "
                         f"`svfseg train --config configs/{cfg.benchmark}/bam_base_<backbone>.yaml "
                         f"fold={cfg.fold}`)")
    values = {"output_dir": cfg.output_dir, "benchmark": cfg.benchmark, "fold": cfg.fold,
              "backbone": cfg.backbone}
    try:
        return Path(str(template).format(**values))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"model.base_checkpoint={template!r}: only the placeholders "
                         f"{{{'}, {'.join(CHECKPOINT_FIELDS)}}} are known ({e})") from None


def stage1_differences(stage1: dict, cfg: RunFacts) -> list[str]:
    """What in a stage-1 checkpoint's description/config does not fit the BAM model of ``cfg``.

    Args:
        stage1: The loaded stage-1 checkpoint (``describe`` and ``config`` entries).
        cfg: The stage-2 config.

    Returns:
        Human-readable differences; empty when the checkpoint fits.
    """
    d = stage1.get("describe") or {}
    conf = stage1.get("config") or {}
    head = dict(d.get("head") or {})
    want_head = cfg.head
    expected = {
        "model": BASE_MODEL,
        "benchmark": cfg.benchmark,
        "fold": cfg.fold,
        "num_classes (background + base)": len(base_classes(cfg)) + 1,
        "backbone": cfg.backbone,
        "ppm_bins": list(want_head.get("ppm_bins", (1, 2, 3, 6))),
        "hidden": int(want_head.get("base_hidden", 512)),
    }
    found = {
        "model": d.get("name"),
        "benchmark": d.get("benchmark"),
        "fold": d.get("fold"),
        "num_classes (background + base)": d.get("num_classes"),
        "backbone": d.get("backbone"),
        "ppm_bins": head.get("ppm_bins"),
        "hidden": head.get("hidden"),
    }
    if cfg.benchmark == "coco":
        expected["data.convention"] = cfg.convention
        found["data.convention"] = (conf.get("data") or {}).get("convention")
    want_os = dict(cfg.backbone_kwargs).get("output_stride")
    have_os = ((conf.get("model") or {}).get("backbone_kwargs") or {}).get("output_stride")
    if (want_os or 8) != (have_os or 8):
        key = "model.backbone_kwargs.output_stride"
        expected[key], found[key] = want_os or 8, have_os or 8
    n_cls = cfg.classes().num_benchmark_classes
    if d.get("num_benchmark_classes") not in (None, n_cls):
        expected["num_benchmark_classes"] = n_cls
        found["num_benchmark_classes"] = d.get("num_benchmark_classes")
    return [f"{k}: checkpoint has {found[k]!r}, this run needs {v!r}" for k, v in expected.items() if found[k] != v]


class BaseLearnerRecipe(ModelRecipe):
    """BAM stage 1: a semantic segmenter over background + the fold's base classes."""

    task = "semantic"
    test_tasks = ("semantic",)

    def model_kwargs(self, cfg: RunFacts) -> dict[str, Any]:
        return {"num_classes": len(base_classes(cfg)) + 1}


class BAMRecipe(PriorHeadRecipe):
    """BAM stage 2: built for the fold's base classes and one K, from the stage-1 checkpoint."""

    task = "fewshot"
    test_tasks = ("fewshot", "generalized")

    def model_kwargs(self, cfg: RunFacts) -> dict[str, Any]:
        return {"base_classes": base_classes(cfg), "shot": cfg.shot}

    def dependencies(self, cfg: RunFacts) -> list[Dependency]:
        return [Dependency(
            keyword="base_state", path=base_checkpoint_path(cfg), what="stage-1 checkpoint",
            how_to_make=(f"BAM's stage 2 needs the stage-1 base learner of fold {cfg.fold}: run `svfseg train "
                         f"--config configs/{cfg.benchmark}/bam_base_<backbone>.yaml fold={cfg.fold}` first, "
                         "or point model.base_checkpoint at its best.pt"),
            check=lambda state: stage1_differences(state, cfg))]
