"""Checkpoints: atomic writes, RNG state capture/restore, compatibility checks on load."""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "svfseg-train-checkpoint-v1"


class CheckpointMismatch(ValueError):
    """A checkpoint was written for a different architecture, fold or class count."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact; readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_atomic` (tensors and plain Python only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e


def peek(path: str | os.PathLike) -> dict:
    """A checkpoint's entries with tensors memory-mapped, not read (cheap look at its config)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - e.g. a legacy non-zip file: the full reader names the problem
        return load(path)


def capture_rng(generators: Optional[Mapping[str, np.random.Generator]] = None) -> dict:
    """RNG states of torch (CPU and CUDA), Python's ``random`` and named numpy Generators."""
    state = {
        "torch": torch.get_rng_state(),
        "python": _py_state_to_plain(random.getstate()),
        "numpy": {k: g.bit_generator.state for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping, generators: Optional[Mapping[str, np.random.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng` (numpy Generators are restored in place by name)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_py_state_from_plain(state["python"]))
    for k, g in (generators or {}).items():
        if k not in state["numpy"]:
            raise KeyError(f"checkpoint has no RNG state for generator '{k}' (has {sorted(state['numpy'])})")
        g.bit_generator.state = state["numpy"][k]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(st: tuple) -> dict:
    # random.getstate() is (version, tuple_of_625_ints, gauss_next); lists keep the weights-only loader happy.
    return {"version": st[0], "internal": list(st[1]), "gauss_next": st[2]}


def _py_state_from_plain(d: Mapping) -> tuple:
    return (d["version"], tuple(d["internal"]), d["gauss_next"])


def describe_differences(expected: Mapping, found: Mapping) -> list[str]:
    """Human-readable list of keys whose values differ between two model descriptions."""
    diffs = []
    for k in sorted(set(expected) | set(found)):
        a, b = expected.get(k, "<absent>"), found.get(k, "<absent>")
        if _norm(a) != _norm(b):
            diffs.append(f"{k}: checkpoint has {b!r}, this run expects {a!r}")
    return diffs


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _norm(x) for k, x in v.items()}
    return v


def check_compatible(expected: Mapping, found: Mapping, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose model description differs, listing every difference.

    Args:
        expected: description of the model this run builds.
        found: description stored in the checkpoint.
        path: the checkpoint (named in the error).

    Raises:
        CheckpointMismatch: when any key differs.
    """
    diffs = describe_differences(expected, _upgrade_description(found))
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(diffs))


def _upgrade_description(d: Mapping) -> Mapping:
    """A description svfseg 0.1 wrote (``backbone_mode``, policies with ``lr_mult``) in today's terms."""
    if "backbone_mode" not in d:
        return d
    out = {k: v for k, v in d.items() if k != "backbone_mode"}
    out["regime"] = {"train": "full"}.get(d["backbone_mode"], d["backbone_mode"])
    if isinstance(out.get("svf_policy"), Mapping):
        out["svf_policy"] = {k: v for k, v in out["svf_policy"].items() if k != "lr_mult"}
    return out


def load_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the first bad keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise CheckpointMismatch(
            f"checkpoint {path} does not match the model's parameters: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shape)} with another shape (e.g. {shape[:3]})")
    model.load_state_dict(state, strict=True)
