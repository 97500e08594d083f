"""Warm starts: a new model's head from another run's checkpoint (``model.init_head``), or the whole
model from a model file (``model.init_from``).

Linear-probe-then-fine-tune (Kumar et al., ICLR 2022): the head is first trained with the frozen
backbone, then every backbone regime starts from that same head. `svfseg compare --warm-start`
trains the head once and starts every cell from it, so that a short budget is spent adapting the
backbone rather than teaching the head from scratch, and every regime starts from the same point.

``model.init_from`` starts a run from every weight of a model file (a converted published model, a
merged export, or a run's checkpoint of a regime that keeps the plain architecture): the backbone's
weights go into the plain backbone before the run's regime decomposes or wraps it, the rest after.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from svfseg.engine import checkpoint as ckpt

BACKBONE_PREFIX = "backbone."
#: Description keys a run may change from its ``model.init_from`` file: the regime and its settings.
REGIME_KEYS = ("regime", "svf_policy", "lora")


def head_state(state: dict) -> dict:
    """The entries of a model state dict that lie outside the backbone."""
    return {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}


def check_head_file(path: str | Path) -> None:
    """Refuse a missing ``model.init_head`` before anything is written (one line)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_head={str(path)!r}: no such checkpoint (expected the best.pt or "
                                f"last.pt of a run of the same head)")


def backbone_state(state: dict) -> dict:
    """The backbone's own state dict (keys without ``backbone.``) from a model state dict."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


def read_init_file(path: str | Path, *, lazy: bool = False) -> dict:
    """The ``model.init_from`` file, checked: an svfseg model file whose backbone is the plain architecture.

    Raises:
        FileNotFoundError, CheckpointError: missing, damaged or foreign (one line).
        CheckpointMismatch: a backbone with singular values or adapters (merge it first).
    """
    from svfseg.regimes import REGISTRY

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_from={str(path)!r}: no such file (expected an svfseg model file: "
                                f"`svfseg convert` or `svfseg merge` output, or a run's best.pt)")
    blob = ckpt.read_checkpoint(path, ("model", "describe"), "an svfseg model file (model.init_from)",
                                lazy=lazy, finite=not lazy)
    regime = ckpt.upgrade_description(blob["describe"]).get("regime")
    spec = REGISTRY.get(regime)
    if spec is not None and spec.mergeable:
        raise ckpt.CheckpointMismatch(
            f"model.init_from={path}: expected a plain-architecture backbone, found a model.regime={regime} one "
            f"(decomposed or wrapped); merge it first: svfseg merge --checkpoint {path} --out merged.pt, then "
            f"model.init_from=merged.pt")
    return blob


def init_from_differences(expected: dict, found: dict) -> list[str]:
    """How a ``model.init_from`` file's description differs from the run's model, the regime aside."""
    strip = lambda d: {k: v for k, v in d.items() if k not in REGIME_KEYS}  # noqa: E731
    return ckpt.describe_differences(strip(expected), strip(ckpt.upgrade_description(found)))


def load_head(model: nn.Module, path: str | Path, blob: dict | None = None, key: str = "model.init_head") -> int:
    """Copy every tensor outside ``model.backbone`` from the checkpoint at ``path`` into ``model``.

    The backbone keeps its own weights (pretrained, or decomposed for SVF), so a head trained on a
    frozen backbone can start an SVF, full or any other regime's run.

    Args:
        model: the new model.
        path: the file (named in errors).
        blob: the file already read (``model.init_from``); None: read ``path``.
        key: the config key that named the file, for messages.

    Returns:
        The number of tensors copied.

    Raises:
        FileNotFoundError, CheckpointError: the file is missing or not an svfseg checkpoint.
        CheckpointMismatch: the file's head has other keys or shapes than this model's.
    """
    if blob is None:
        check_head_file(path)
        blob = ckpt.read_checkpoint(path, ("model",), "an svfseg training checkpoint with model weights "
                                                      "(model.init_head)", finite=True)
    theirs = head_state(blob["model"])
    own = model.state_dict()
    mine = head_state(own)
    missing = sorted(set(mine) - set(theirs))
    unexpected = sorted(set(theirs) - set(mine))
    shape = [f"{k}: file {tuple(theirs[k].shape)} vs model {tuple(v.shape)}" for k, v in mine.items()
             if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        raise ckpt.CheckpointMismatch(
            f"{key}={path}: its head does not fit this model's ({len(missing)} missing e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(shape)} of another shape e.g. {shape[:1]}); "
            f"warm-start from a run of the same head and head options")
    model.load_state_dict({**own, **theirs}, strict=True)
    return len(theirs)
