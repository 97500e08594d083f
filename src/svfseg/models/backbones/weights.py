"""Load original-format weight files into backbones, with errors that list mismatched keys."""

from __future__ import annotations

import logging
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import Backbone

logger = logging.getLogger(__name__)

_SHOW = 10  # keys listed per category in error messages


class WeightsMismatchError(ValueError, RuntimeError):  # ValueError: the CLI's one-line errors
    """A weight file does not fit a backbone; keys are given in the file's own naming."""

    def __init__(self, message: str, report: "LoadReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What happened when loading a file; all keys in the file's naming."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt`` (torch pickle, weights only) or ``.safetensors`` file.

    A checkpoint dict holding the weights under ``state_dict`` or ``model`` is unwrapped, and a
    ``module.`` prefix present on every key (DataParallel checkpoints) is removed.

    Args:
        path: File path.

    Returns:
        Mapping from key to tensor, on CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notes name no file
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # never torch's advice to retry with weights_only=False: that runs the file's code
        raise ValueError(f"{path}: expected a weight file of tensors, found one holding other Python objects "
                         f"(svfseg loads only tensors from weight files)") from None
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise RuntimeError, EOFError, ... on damage
        first = str(e).split("\n")[0].split(". ")[0].strip()[:160] or type(e).__name__
        raise ValueError(f"{path}: expected a weight file of tensors (torch or safetensors), found a truncated, "
                         f"corrupt or foreign file ({first})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _listing(what: str, keys: list[str]) -> str:
    head = ", ".join(keys[:_SHOW])
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{len(keys)} {what}: [{head}{more}]"


def load_backbone_weights(
    model: Backbone, path: str | Path, strict: bool = True
) -> LoadReport:
    """Load an original-format weight file (torchvision, PSPNet, TF-ported) into ``model``.

    The file's keys are translated to the model's naming with ``model.checkpoint_key``; keys
    the model declares unused (``fc.*``, ``classifier.*``) are skipped and logged.

    Args:
        model: The backbone (before any SVF decomposition).
        path: Weight file (``.pth``/``.pt``/``.safetensors``).
        strict: If True, any missing or unexpected key is an error. If False, matching keys
            load and the rest is logged as a warning. A shape mismatch is always an error.

    Returns:
        A :class:`LoadReport` (keys in the file's naming).

    Raises:
        WeightsMismatchError: The file does not fit; the message names the file and lists the
            first missing / unexpected / mis-shaped keys with their counts.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    to_file = {k: model.checkpoint_key(k) for k in own}
    from_file = {f: k for k, f in to_file.items()}
    if len(from_file) != len(to_file):
        raise RuntimeError(f"{type(model).__name__}.checkpoint_key maps two keys to one name")
    report = LoadReport(path=str(path))
    mapped: dict[str, torch.Tensor] = {}
    for fkey, tensor in state.items():
        key = from_file.get(fkey)
        if key is None:
            (report.ignored if model.is_ignored_checkpoint_key(fkey) else report.unexpected).append(fkey)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.shape_mismatch.append(
                f"{fkey} (file {tuple(tensor.shape)}, model {tuple(own[key].shape)})"
            )
        else:
            mapped[key] = tensor
            report.loaded.append(fkey)
    for key, fkey in to_file.items():
        if fkey in state:
            continue
        if key.endswith("num_batches_tracked"):
            # Files saved before torch 0.4.1 (torchvision's resnet50-19c8e357.pth, vgg16_bn,
            # PSPNet's resnet50_v2.pth) have no BN step counters; keep the model's own.
            mapped[key] = own[key]
        else:
            report.missing.append(fkey)
    name = getattr(model, "name", type(model).__name__)
    problems = []
    if report.missing:
        problems.append(_listing("missing keys", report.missing))
    if report.unexpected:
        problems.append(_listing("unexpected keys", report.unexpected))
    if report.shape_mismatch:
        problems.append(_listing("keys with the wrong shape", report.shape_mismatch))
    if report.shape_mismatch or (strict and problems):
        raise WeightsMismatchError(
            f"weight file {path} does not fit backbone {name}: " + "; ".join(problems), report
        )
    if problems:
        logger.warning("loading %s into %s (non-strict): %s", path, name, "; ".join(problems))
    if report.ignored:
        logger.info("loading %s: ignored %s", path, _listing("unused keys", report.ignored))
    model.load_state_dict(mapped, strict=strict)
    logger.info("loaded %d tensors from %s into %s", len(mapped), path, name)
    return report


def checkpoint_state_dict(model: Backbone) -> dict[str, torch.Tensor]:
    """The model's state dict under the original file's key names (inverse of loading).

    Useful to hand a (merged) backbone back to torchvision / PSPNet-style code.

    Args:
        model: A backbone whose state-dict keys are plain (not SVF-decomposed).

    Returns:
        Dict from original key name to tensor (the model's own tensors, not copies).
    """
    return {model.checkpoint_key(k): v for k, v in model.state_dict().items()}
