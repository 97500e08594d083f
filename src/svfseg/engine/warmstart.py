"""A warm start: a new model's head taken from another run's checkpoint (``model.init_head``).

Linear-probe-then-fine-tune (Kumar et al., ICLR 2022): the head is first trained with the frozen
backbone, then every backbone regime starts from that same head. `svfseg compare --warm-start`
trains the head once and starts every cell from it, so that a short budget is spent adapting the
backbone rather than teaching the head from scratch, and every regime starts from the same point.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from svfseg.engine import checkpoint as ckpt

BACKBONE_PREFIX = "backbone."


def head_state(state: dict) -> dict:
    """The entries of a model state dict that lie outside the backbone."""
    return {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}


def check_head_file(path: str | Path) -> None:
    """Refuse a missing ``model.init_head`` before anything is written (one line)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_head={str(path)!r}: no such checkpoint (expected the best.pt or "
                                f"last.pt of a run of the same head)")


def load_head(model: nn.Module, path: str | Path) -> int:
    """Copy every tensor outside ``model.backbone`` from the checkpoint at ``path`` into ``model``.

    The backbone keeps its own weights (pretrained, or decomposed for SVF), so a head trained on a
    frozen backbone can start an SVF, full or any other regime's run.

    Returns:
        The number of tensors copied.

    Raises:
        FileNotFoundError, CheckpointError: the file is missing or not an svfseg checkpoint.
        CheckpointMismatch: the file's head has other keys or shapes than this model's.
    """
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
            f"model.init_head={path}: its head does not fit this model's ({len(missing)} missing e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(shape)} of another shape e.g. {shape[:1]}); "
            f"warm-start from a run of the same head and head options")
    model.load_state_dict({**own, **theirs}, strict=True)
    return len(theirs)
