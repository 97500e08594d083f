"""Checkpoints: atomic writes, RNG state capture/restore, compatibility checks on load."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "svfseg-train-checkpoint-v1"


class CheckpointMismatch(ValueError):
    """A checkpoint was written for a different architecture, fold or class count."""


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, foreign, or holds non-finite numbers."""


class NonFiniteWeights(CheckpointError):
    """A state to be saved holds NaN/inf although the loss was finite: training diverged (nothing was written)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, no permission); the previous file is intact."""


# Headroom over the tensors' bytes: the zip container, pickled metadata, the filesystem's blocks.
_SPACE_FACTOR, _SPACE_MARGIN = 1.1, 16 << 20


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list (what a checkpoint of ``obj`` mostly weighs)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


#: What to do after freeing space, when a training checkpoint did not fit (save_atomic's default).
RESUME_AFTER_FREEING = "resume (the previous checkpoint is kept)"


def check_free_space(path: Path, needed: int, then: str = RESUME_AFTER_FREEING) -> None:
    """Raise :class:`CheckpointWriteError` when ``path``'s filesystem has less than ``needed`` bytes free.

    ``then`` says what to do once space is freed (a run resumes; a merge is simply run again).
    """
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CheckpointWriteError(
            errno.ENOSPC, f"cannot write checkpoint {path}: expected {needed / 1e6:.0f} MB free on its disk, "
                          f"found {free / 1e6:.0f} MB; free some space and {then}")


def save_atomic(obj: Any, path: str | os.PathLike, *, keep_previous: bool = False, verify: bool = False,
                then: str = RESUME_AFTER_FREEING) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write (or ENOSPC) leaves the previous file intact; readers never see a partial
    file. The free space is checked first.

    Args:
        obj: what to save (tensors and plain Python).
        path: final file.
        keep_previous: first keep the file being replaced as ``<stem>.prev<suffix>`` (a fallback
            for ``--resume`` should ``path`` be damaged later).
        verify: read the written file back before it replaces ``path``.
        then: what the too-little-space message tells the user to do once space is freed.

    Raises:
        CheckpointWriteError: too little free space, or the write failed (e.g. ENOSPC).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, int(tensor_bytes(obj) * _SPACE_FACTOR) + _SPACE_MARGIN, then)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise CheckpointWriteError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}; the previous "
                                                f"checkpoint is kept") from e
        except RuntimeError as e:
            # torch's zip writer turns a failed write of its file (ENOSPC when another process
            # takes the space mid-write) into "unexpected pos ..." instead of the OSError
            raise CheckpointWriteError(errno.EIO, f"cannot write checkpoint {path}: the write stopped part-way "
                                                  f"({_first_sentence(e)}; {_free_mb(path)} MB free on its disk, "
                                                  f"is it full?); the previous checkpoint is kept") from None
        if verify:
            load(tmp, mmap=True)  # a file that does not read back must never replace a good one
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _free_mb(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent).free / 1e6:.0f}"
    except OSError:
        return "?"


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_atomic` keeps the file it replaced: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    # A hard link keeps ``path`` in place all the time (no moment without a last.pt); the rename
    # is the fallback where the filesystem has no links.
    prev, link = previous_path(path), path.with_name(f".{path.name}.prev.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, prev)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, prev)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an earlier crash left in ``folder`` (call it holding the run lock)."""
    removed = []
    for f in Path(folder).glob(".*.tmp"):
        if f.is_file() and ".pt." in f.name:
            f.unlink(missing_ok=True)
            removed.append(f)
    if removed:
        logger.info("removed %d temporary file(s) left by an earlier crash in %s", len(removed), folder)
    return removed


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_atomic` (tensors and plain Python only).

    ``mmap=True`` maps the tensors instead of reading them (a cheap check that the file is whole).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated or corrupt, not a torch file, or holding other Python objects
            (the message is one line and never suggests an unsafe loader).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _refuse_safetensors(path)
    try:
        with warnings.catch_warnings():
            # torch warns (without the file name) about pickle protocols of foreign files; the
            # error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: expected an svfseg checkpoint (tensors and plain values), found a file "
                              f"holding other Python objects; svfseg reads only files it wrote") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, IndexError, EOFError, ... here
        raise CheckpointError(f"{path}: expected an svfseg checkpoint (a complete torch zip file), found a "
                              f"truncated or corrupt file ({_first_sentence(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected an svfseg checkpoint (a dict), found a {type(state).__name__}")
    return state


def _refuse_safetensors(path: Path) -> None:
    """Refuse a safetensors file (torch.load reads one as a bare dict of tensors, and the commands then
    failed on its missing config with "unknown model ''"): say what it is and what takes it.

    A safetensors file starts with the little-endian length of its JSON header, then the header's ``{``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{" or not 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return
    raise CheckpointError(f"{path}: expected an svfseg checkpoint (best.pt/last.pt or a merged export), found a "
                          f"safetensors file of tensors only: an S file (a run's trained_backbone.safetensors, "
                          f"save_svf's singular values), no model or config; give the run's best.pt to test, "
                          f"predict, merge or serve, and load an S file in Python with svfseg.load_svf into a model "
                          f"decomposed the same way")


def read_checkpoint(path: str | os.PathLike, require: Sequence[str], expected: str, *, lazy: bool = False,
                    finite: bool = False) -> dict:
    """The one "is this a checkpoint of the kind we need" check: :func:`load` (or :func:`peek`) and the entries.

    Args:
        path: the file.
        require: entries it must hold (e.g. ``("model", "config", "describe")``).
        expected: what it should be, for the message ("a resumable svfseg training checkpoint").
        lazy: memory-map the tensors instead of reading them (only metadata is looked at).
        finite: also refuse NaN/inf in its ``model`` weights (:func:`check_finite_weights`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: damaged, foreign, without one of ``require``, or (``finite``) non-finite.
    """
    state = peek(path) if lazy else load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected {expected}, found a {type(state).__name__}")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{path}: expected {expected}, found a file without {missing} "
                              f"(keys {sorted(state)[:8]})")
    if finite:
        check_finite_weights(state["model"], path)
    return state


def _first_sentence(e: BaseException) -> str:
    text = str(e).split("\n")[0].split(". ")[0].strip() or type(e).__name__
    return text[:160]


def check_finite(blob: Mapping, path: str | os.PathLike, step: Optional[int] = None) -> None:
    """Refuse to save a state whose model or optimiser tensors hold NaN/inf (it would replace a sane file).

    Raises:
        NonFiniteWeights: naming the first non-finite entries.
    """
    bad = [f"model.{k}" for k, v in blob.get("model", {}).items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    for i, st in (blob.get("optimizer") or {}).get("state", {}).items():
        bad += [f"optimizer.state[{i}].{k}" for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        at = f" at step {step}" if step is not None else ""
        raise NonFiniteWeights(f"{path}: not written: {len(bad)} tensor(s) hold NaN/inf{at} (e.g. {bad[:3]}) "
                              f"although the loss was finite; the last good checkpoint is kept. Lower optim.lr "
                              f"or set optim.grad_clip.")


def check_finite_weights(model_state: Mapping, path: str | os.PathLike) -> None:
    """Refuse to use a checkpoint whose weights hold NaN/inf (a model that predicts nothing sensible).

    Raises:
        CheckpointError: naming the file and the first non-finite tensors.
    """
    bad = [k for k, v in model_state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: expected finite weights, found NaN/inf in {len(bad)} tensor(s) (e.g. "
                              f"{bad[:3]}); this checkpoint cannot be used: train again or use an earlier "
                              f"checkpoint")


def peek(path: str | os.PathLike) -> dict:
    """A checkpoint's entries with tensors memory-mapped, not read (cheap look at its config)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _refuse_safetensors(Path(path))
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
    diffs = describe_differences(expected, upgrade_description(found))
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(diffs))


def upgrade_description(d: Mapping) -> Mapping:
    """A description svfseg 0.1 wrote (``backbone_mode``, policies with ``lr_mult``; heads without
    the later options: the model's recipe back-fills them) in today's terms."""
    from svfseg.regimes import regime_from_01_description

    out = dict(d)
    if "backbone_mode" in out:
        mode = out.pop("backbone_mode")
        out["regime"] = regime_from_01_description(mode)
        if isinstance(out.get("svf_policy"), Mapping):
            out["svf_policy"] = {k: v for k, v in out["svf_policy"].items() if k != "lr_mult"}
    from svfseg.models import list_models, model_recipe

    name = out.get("name")
    return model_recipe(name).upgrade_description(out) if name in list_models() else out


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
