"""Build the model a config names (through its registered recipe), describe it for checkpoint checks, load saved weights."""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from svfseg.config import ExperimentConfig, config_with_overrides, from_dict, to_dict
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.resolved import ResolvedRun, resolve_run
from svfseg.engine.runfolder import RunFolder
from svfseg.regimes import PLAIN_REGIME, regime_spec
from svfseg.results import pct

logger = logging.getLogger(__name__)

#: A plain-architecture model file: `svfseg merge` output, and `svfseg convert` output (which also holds a
#: ``converted_from`` record: the upstream file's name, sha256 and format).
MERGED_FORMAT = "svfseg-merged-v1"


def build_model(run: ResolvedRun, *, pretrained: bool = True) -> nn.Module:
    """The model of the run's config: its registered constructor with the keywords its recipe derives.

    Args:
        run: the resolved run (``model.regime``; ``svf`` is the SVF policy of a staged regime; the
            recipe reads ``run.facts``).
        pretrained: load ``model.weights`` into the backbone and the recipe's dependencies
            (checkpoints of other runs). Off when a checkpoint will overwrite every weight
            anyway (test, predict, resume), so those files are not needed.

    Returns:
        The model on the CPU, in train mode.
    """
    from svfseg.models import create_model, model_recipe

    cfg = run.cfg
    m = cfg.model
    recipe = model_recipe(m.name)
    # model.init_from gives every weight: no backbone file, no other run's checkpoint is read
    init = m.init_from if pretrained else None
    weights = m.weights if pretrained and not init else None
    if weights and weights != "imagenet" and not Path(weights).is_file():
        raise FileNotFoundError(f"model.weights={weights!r}: no such file (download the backbone weights the "
                                f"recipe names, or set model.weights=null to start from random weights)")
    spec = regime_spec(m.regime)
    kwargs = {**recipe.model_kwargs(run.facts), **(load_dependencies(run) if pretrained and not init else {})}
    if spec.model_kwarg:  # the regime's own config section (lora:) goes to the model
        kwargs[spec.model_kwarg] = getattr(cfg, spec.section)
    backbone, blob = m.backbone, None
    if init:
        backbone, blob = _init_backbone(cfg, init)
    try:
        model = create_model(m.name, backbone=backbone, weights=weights, regime=m.regime,
                             svf_policy=cfg.svf if spec.staged else None,
                             backbone_kwargs=(dict(m.backbone_kwargs) or None) if blob is None else None,
                             **{**kwargs, **m.head})
    except TypeError as e:
        raise _unknown_option(e, cfg) from None
    except ValueError as e:  # a head's own check of one of its options ("reduce_dim: expected ...")
        option, _, why = str(e).partition(": ")
        if option in m.head:
            from svfseg.config import ConfigError

            raise ConfigError(f"config key 'model.head.{option}': {why}") from None
        raise
    if blob is not None:
        from svfseg.engine.warmstart import init_from_differences, load_head

        diffs = init_from_differences(describe(model, run), blob["describe"])
        if diffs:
            raise ckpt.CheckpointMismatch(f"model.init_from={init} describes another model than this run's (the "
                                          f"regime aside): " + "; ".join(diffs))
        logger.info("model.init_from: backbone and %d other tensors from %s", load_head(
            model, init, blob, key="model.init_from"), init)
    elif pretrained and m.init_head:
        from svfseg.engine.warmstart import load_head

        logger.info("warm start: %d head tensors from %s", load_head(model, m.init_head), m.init_head)
    return model


def check_model_names(cfg: ExperimentConfig) -> None:
    """The keys only the model registry can check, checked before a run reads data or trains anything:
    ``model.name``, ``model.backbone`` and, for a staged regime, ``svf.stages`` against the stages the
    backbone declares (a backbone registered without them is checked when it is built).

    Raises:
        ValueError: an unknown model or backbone, or a stage the backbone does not have (each names the key).
    """
    from svfseg.config import ConfigError
    from svfseg.models import model_recipe
    from svfseg.models.backbones import backbone_stages, list_backbones
    from svfseg.regimes import regime_spec

    model_recipe(cfg.model.name)  # an unknown name: the registry's message lists the registered ones
    if cfg.model.backbone not in list_backbones():
        raise ConfigError(f"config key 'model.backbone' must be one of {list_backbones()}, found "
                          f"{cfg.model.backbone!r}")
    stages = backbone_stages(cfg.model.backbone)
    missing = [s for s in cfg.svf.stages if stages is not None and s not in stages]
    if regime_spec(cfg.model.regime).staged and missing:
        raise ConfigError(f"config key 'svf.stages' must name stages of {cfg.model.backbone} {list(stages)}, found "
                          f"{missing}")


def _init_backbone(cfg: ExperimentConfig, path: str) -> tuple[nn.Module, dict]:
    """The plain backbone of ``cfg`` holding the weights of the ``model.init_from`` file, and the file.

    The weights go in before the run's regime decomposes (SVF) or wraps (LoRA) the backbone.
    """
    from svfseg.engine.warmstart import backbone_state, read_init_file
    from svfseg.models.backbones import create_backbone

    blob = read_init_file(path)
    backbone = create_backbone(cfg.model.backbone, **dict(cfg.model.backbone_kwargs))
    ckpt.load_model_state(backbone, backbone_state(blob["model"]), path)
    return backbone, blob


def _unknown_option(e: TypeError, cfg: ExperimentConfig) -> Exception:
    """A constructor's "unexpected keyword argument 'k'" as the config key it came from."""
    import re

    from svfseg.config import ConfigError

    found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    if not found:
        return e
    key = found.group(1)
    m = cfg.model
    where = ("model.head" if key in m.head else "model.backbone_kwargs" if key in m.backbone_kwargs else None)
    if where is None:
        return e
    what = f"head of model.name={m.name}" if where == "model.head" else f"backbone {m.backbone}"
    return ConfigError(f"config key '{where}.{key}' is not an option of the {what} ({e})")


def load_dependencies(run: ResolvedRun) -> dict[str, dict]:
    """The state dicts of the checkpoints the run's model is built from, keyed by constructor keyword.

    Raises:
        FileNotFoundError, CheckpointMismatch: as :func:`preflight`.
    """
    from svfseg.models import model_recipe

    out = {}
    for dep in model_recipe(run.cfg.model.name).dependencies(run.facts):
        state = _read_dependency(dep, lazy=False)
        logger.info("%s: %s (step %s, validation mIoU %s)", dep.what, dep.path, state.get("step"),
                    pct((state.get("metrics") or {}).get("miou")))
        out[dep.keyword] = state["model"]
    return out


def preflight(run: ResolvedRun) -> None:
    """Checks that must pass before a run folder is created: the recipe's dependencies exist and fit.

    Raises:
        FileNotFoundError: a dependency is missing (the message says how to make it).
        CheckpointMismatch: a dependency was made for another model, fold, class count, ...
    """
    from svfseg.models import model_recipe

    cfg = run.cfg
    for dep in [] if cfg.model.init_from else model_recipe(cfg.model.name).dependencies(run.facts):
        _read_dependency(dep, lazy=True)
    if cfg.model.init_head:
        from svfseg.engine.warmstart import check_head_file

        check_head_file(cfg.model.init_head)
    if cfg.model.init_from:
        from svfseg.engine.warmstart import read_init_file

        read_init_file(cfg.model.init_from, lazy=True)


def _read_dependency(dep, *, lazy: bool) -> dict:
    """A recipe dependency's checkpoint, checked (``lazy``: tensors memory-mapped, only metadata read)."""
    if not dep.path.is_file():
        raise FileNotFoundError(f"{dep.path} does not exist. {dep.how_to_make}")
    state = ckpt.read_checkpoint(dep.path, ("model", "describe"), f"an svfseg training checkpoint ({dep.what})",
                                 lazy=lazy, finite=not lazy)
    diffs = dep.check(state)
    if diffs:
        raise ckpt.CheckpointMismatch(f"{dep.what} {dep.path} does not fit this run:\n  " + "\n  ".join(diffs))
    return state


def describe(model: nn.Module, run: ResolvedRun) -> dict[str, Any]:
    """What must match for a checkpoint to load: architecture, regime, benchmark, fold, class count.

    Optimiser settings (the policy's ``decay_to``; ``lr_mult`` in svfseg 0.1's policies), BN
    folding (an exact rewrite with the same state-dict keys) and the forms plan file are left out:
    they do not change the weights' meaning.
    """
    cfg = run.cfg
    d = copy.deepcopy(model.describe()) if hasattr(model, "describe") else {"name": type(model).__name__}
    if isinstance(d.get("svf_policy"), dict):
        for key in ("lr_mult", "decay_to", "fold_bn", "plan"):
            d["svf_policy"].pop(key, None)
        if d["svf_policy"].get("train") == ["S"]:
            del d["svf_policy"]["train"]  # the default, and what every description before svf.train meant
        if d["svf_policy"].get("rank_multiple") == 1:
            del d["svf_policy"]["rank_multiple"]  # likewise: exact, as before the option
    d.update(benchmark=cfg.data.benchmark, fold=cfg.fold, num_benchmark_classes=run.bench.num_classes)
    return _plain(d)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def checkpoint_config(checkpoint: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config a checkpoint was made with, from a memory-mapped look at its metadata (no weights read),
    with ``key=value`` overrides applied (``svfseg test --checkpoint C KEY=VALUE``)."""
    own = ckpt.read_checkpoint(checkpoint, ("config",), "an svfseg checkpoint", lazy=True)["config"]
    if overrides:
        return config_with_overrides(own, overrides, str(checkpoint))
    return from_dict(own, source=str(checkpoint))


def export_merged_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the plain-architecture (merged) model of a training checkpoint.

    The file holds the merged state dict, the config it builds from (SVF off, frozen backbone)
    and its description, so ``svfseg test``/``predict`` load it like a checkpoint.
    """
    from svfseg.models import export_merged

    run = resolve_run(checkpoint_config(checkpoint))  # once, for both descriptions
    model, run, state = load_for_inference_run(checkpoint, run)
    merged = export_merged(model)
    plain = run.with_config(_plain_config(run.cfg))
    blob = {"format": MERGED_FORMAT, "model": merged.state_dict(), "config": to_dict(plain.cfg),
            "describe": describe(merged, plain), "source": str(checkpoint), "step": state.get("step")}
    return ckpt.save_atomic(blob, out, then="run the merge again (nothing was written)")


def check_merge_out(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse a ``merge --out`` that would replace a file: any file without ``overwrite``, a file of the run never.

    Raises:
        FileExistsError: ``out`` is the checkpoint, a file of its run folder (``last.pt``, ...) or,
            without ``overwrite``, any existing file.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    same = out.exists() and checkpoint.exists() and os.path.samefile(out, checkpoint)
    if same or RunFolder(checkpoint.parent).owns(out):
        raise FileExistsError(f"merge: --out {out} belongs to the run being merged (its resumable state or its "
                              f"results); write the merged model elsewhere, e.g. {out.parent / 'merged.pt'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"merge: --out {out} exists; choose another file or pass --overwrite")


def _svfseg_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """A best.pt/last.pt or merged export, read whole and checked (finite weights)."""
    return ckpt.read_checkpoint(checkpoint, ("model", "config", "describe"),
                                "an svfseg checkpoint (best.pt/last.pt or a merged export)", finite=True)


def nothing_to_merge(checkpoint: str | os.PathLike) -> Optional[str]:
    """Why merging ``checkpoint`` would change nothing (no SVD layers or adapters in it), or None when it would."""
    from svfseg.regimes import REGISTRY

    state = _svfseg_checkpoint(checkpoint)
    if state.get("format") == MERGED_FORMAT:
        source = state.get("converted_from")
        if isinstance(source, dict):
            return (f"{checkpoint} is a converted {source.get('format')} model ({source.get('file')}): the plain "
                    f"architecture already")
        return f"{checkpoint} is already a merged export"
    regime = ckpt.upgrade_description(state["describe"]).get("regime")
    if regime not in REGISTRY or not REGISTRY[regime].mergeable:
        return (f"{checkpoint} was trained with model.regime={regime}: its backbone is the plain architecture, "
                f"with no singular values or adapters to fold back; use it as it is")
    return None


def _plain_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` for the plain architecture of a merged export (a copy; nothing of the backbone trains)."""
    plain = copy.deepcopy(cfg)
    plain.model.regime = PLAIN_REGIME
    return plain


def load_for_inference(checkpoint: str | os.PathLike, cfg: Optional[ExperimentConfig] = None,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, ExperimentConfig, dict]:
    """Model + config from a training checkpoint or a merged export, in eval mode (``predict``, ``serve``, ``demo``).

    The config (``cfg``, or the checkpoint's own) is resolved here, once: these commands start from a
    checkpoint. A command that has resolved its run already calls :func:`load_for_inference_run`.

    Returns:
        (model, config, raw checkpoint dict), as :func:`load_for_inference_run`.
    """
    state = _svfseg_checkpoint(checkpoint)
    run = resolve_run(cfg if cfg is not None else from_dict(state["config"], source=str(checkpoint)))
    model, run, state = load_for_inference_run(checkpoint, run, device, state=state)
    return model, run.cfg, state


def load_for_inference_run(checkpoint: str | os.PathLike, run: ResolvedRun, device: torch.device | str = "cpu", *,
                           state: Optional[dict] = None) -> tuple[nn.Module, ResolvedRun, dict]:
    """Model from a training checkpoint or a merged export for the resolved ``run``, in eval mode.

    Args:
        checkpoint: a ``best.pt``/``last.pt`` or a file from ``svfseg merge``; it must describe the
            run's model, fold and class count (a mismatch raises
            :class:`~svfseg.engine.checkpoint.CheckpointMismatch` listing what differs).
        run: the resolved run (a merged export is compared with its plain-architecture config).
        device: where to put the model.
        state: the checkpoint already read (:func:`load_for_inference`), else read here.

    Returns:
        (model, the run it was built for, raw checkpoint dict); the model in ``train.channels_last``
        memory format when the config asks for it.
    """
    state = state if state is not None else _svfseg_checkpoint(checkpoint)
    if state.get("format") == MERGED_FORMAT:
        # A merged export is the plain architecture: compare against the frozen-backbone config.
        run = run.with_config(_plain_config(run.cfg))
    model = build_model(run, pretrained=False)
    # a whole checkpoint into a model for scoring (a run's restore is engine.state's; a head warm start, warmstart's)
    ckpt.check_compatible(describe(model, run), state["describe"], checkpoint)
    ckpt.load_model_state(model, state["model"], checkpoint)
    model = model.to(device).eval()
    if run.cfg.train.channels_last:  # the recipe's convolutions run NHWC: at test time too (benchmarks/bench_eval.py)
        model = model.to(memory_format=torch.channels_last)
    return model, run, state
