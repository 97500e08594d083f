"""Build the few-shot model a config names, describe it for checkpoint checks, load saved weights."""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from svfseg.config import ExperimentConfig, from_dict, to_dict
from svfseg.engine import checkpoint as ckpt

logger = logging.getLogger(__name__)

MERGED_FORMAT = "svfseg-merged-v1"


def build_model(cfg: ExperimentConfig, *, pretrained: bool = True) -> nn.Module:
    """The model of ``cfg`` (SVF policy from ``cfg.svf`` when enabled).

    Args:
        cfg: the experiment config.
        pretrained: load ``model.weights`` into the backbone. Off when a checkpoint will
            overwrite every weight anyway (test, predict, resume), so the weight file is not needed.

    Returns:
        The model on the CPU, in train mode.
    """
    from svfseg.models import SVFPolicy, create_model

    m, s = cfg.model, cfg.svf
    mode = "svf" if s.enabled else m.backbone_mode
    policy = SVFPolicy(stages=tuple(s.stages), skip_1x1=s.skip_1x1, skip_3x3=s.skip_3x3, train_bn=s.train_bn,
                       train_bias=s.train_bias, mode=s.mode, fold_bn=s.fold_bn) if s.enabled else None
    weights = m.weights if pretrained else None
    if weights and weights != "imagenet" and not Path(weights).is_file():
        raise FileNotFoundError(f"model.weights={weights!r}: no such file (download the backbone weights the "
                                f"recipe names, or set model.weights=null to start from random weights)")
    return create_model(m.name, backbone=m.backbone, weights=weights, backbone_mode=mode, svf_policy=policy,
                        backbone_kwargs=dict(m.backbone_kwargs) or None,
                        **{**extra_model_kwargs(cfg, pretrained=pretrained), **m.head})


STAGED_MODELS = ("bam", "bam_base")


def extra_model_kwargs(cfg: ExperimentConfig, *, pretrained: bool = True) -> dict[str, Any]:
    """Constructor keywords some models derive from the config (BAM: base classes, shot, stage-1 weights)."""
    if cfg.model.name not in STAGED_MODELS:
        return {}
    from svfseg.engine.base_learner import model_kwargs

    return model_kwargs(cfg, pretrained=pretrained)


def preflight(cfg: ExperimentConfig) -> None:
    """Checks that must pass before a run folder is created (BAM stage 2: its stage-1 checkpoint)."""
    if cfg.model.name == "bam":
        from svfseg.engine.base_learner import check_base_checkpoint

        check_base_checkpoint(cfg)


def forward_episode(model: nn.Module, batch: dict, device: torch.device, non_blocking: bool = False):
    """Call a few-shot model on a collated batch; models with ``uses_class_ids`` also get the class ids."""
    args = (batch["query_img"].to(device, non_blocking=non_blocking),
            batch["support_imgs"].to(device, non_blocking=non_blocking),
            batch["support_masks"].to(device, non_blocking=non_blocking))
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if getattr(inner, "uses_class_ids", False):
        return model(*args, class_ids=torch.as_tensor(batch["class_id"]).to(device))
    return model(*args)


def describe(model: nn.Module, cfg: ExperimentConfig) -> dict[str, Any]:
    """What must match for a checkpoint to load: architecture, regime, benchmark, fold, class count.

    Optimiser settings (e.g. the policy's lr multiplier) and BN folding (an exact rewrite with
    the same state-dict keys) are left out: they do not change the weights' meaning.
    """
    from svfseg.data.splits import num_classes

    d = copy.deepcopy(model.describe()) if hasattr(model, "describe") else {"name": type(model).__name__}
    if isinstance(d.get("svf_policy"), dict):
        d["svf_policy"].pop("lr_mult", None)
        d["svf_policy"].pop("fold_bn", None)
    d.update(benchmark=cfg.data.benchmark, fold=cfg.fold, num_benchmark_classes=num_classes(cfg.data.benchmark))
    return _plain(d)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def export_merged_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the plain-architecture (merged) model of a training checkpoint.

    The file holds the merged state dict, the config it builds from (SVF off, frozen backbone)
    and its description, so ``svfseg test``/``predict`` load it like a checkpoint.
    """
    from svfseg.models import export_merged

    state = ckpt.load(checkpoint)
    cfg = from_dict(state["config"], source=str(checkpoint))
    model = build_model(cfg, pretrained=False)
    ckpt.check_compatible(describe(model, cfg), state["describe"], checkpoint)
    ckpt.load_model_state(model, state["model"], checkpoint)
    merged = export_merged(model)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.svf.enabled = False
    plain_cfg.model.backbone_mode = "frozen"
    blob = {"format": MERGED_FORMAT, "model": merged.state_dict(), "config": to_dict(plain_cfg),
            "describe": describe(merged, plain_cfg), "source": str(checkpoint), "step": state.get("step")}
    return ckpt.save_atomic(blob, out)


def load_for_inference(checkpoint: str | os.PathLike, cfg: Optional[ExperimentConfig] = None,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, ExperimentConfig, dict]:
    """Model + config from a training checkpoint or a merged export, in eval mode.

    Args:
        checkpoint: a ``best.pt``/``last.pt`` or a file from ``svfseg merge``.
        cfg: the run's config; when given, the checkpoint must describe the same model, fold
            and class count (a mismatch raises :class:`~svfseg.engine.checkpoint.CheckpointMismatch`
            listing what differs). None: use the checkpoint's own config.
        device: where to put the model.

    Returns:
        (model, config, raw checkpoint dict).
    """
    state = ckpt.load(checkpoint)
    if "model" not in state or "config" not in state:
        raise ckpt.CheckpointMismatch(f"{checkpoint}: not an svfseg checkpoint (no model/config entries; "
                                      f"found keys {sorted(state)[:8]})")
    own_cfg = from_dict(state["config"], source=str(checkpoint))
    if cfg is None:
        cfg = own_cfg
    elif state.get("format") == MERGED_FORMAT and cfg.svf.enabled:
        # A merged export is the plain architecture: compare against the config with SVF off.
        cfg = copy.deepcopy(cfg)
        cfg.svf.enabled = False
        cfg.model.backbone_mode = "frozen"
    model = build_model(cfg, pretrained=False)
    ckpt.check_compatible(describe(model, cfg), state.get("describe", {}), checkpoint)
    ckpt.load_model_state(model, state["model"], checkpoint)
    return model.to(device).eval(), cfg, state
