"""Save and load what SVF trained (singular values, trained U/Vh, trained biases) as safetensors."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from svfseg.svf.inject import FACTOR_ATTR, join_name, svf_layers, trained_factors
from svfseg.svf.layers import SVFLayer

FORMAT_NAME = "svfseg-svf"
FORMAT_VERSION = "1"


def _saved_bias(layer: SVFLayer) -> bool:
    config = getattr(layer, "svf_config", None)
    trained = config.train_bias if config is not None else bool(layer.bias is not None and layer.bias.requires_grad)
    return trained and layer.bias is not None


def svf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns only what SVF trains: every layer's S, its U / Vh when they train
    (``SVFConfig.train_factors``), plus its bias when biases train.

    Args:
        model: a model after `apply_svf`.

    Returns:
        {qualified_name: tensor}: detached tensors sharing storage with the model.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in svf_layers(model):
        state[join_name(name, "S")] = layer.S.detach()
        for factor in ("U", "V"):
            if factor in trained_factors(layer):  # a trained factor is part of the adapter
                state[join_name(name, FACTOR_ATTR[factor])] = getattr(layer, FACTOR_ATTR[factor]).detach()
        if _saved_bias(layer):
            state[join_name(name, "bias")] = layer.bias.detach()
    if not state:
        raise ValueError(f"svf_state_dict: {type(model).__name__} has no SVD layers; call apply_svf first")
    return state


def load_svf_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies saved singular values (and biases) into a model after `apply_svf`.

    Args:
        model: the target, decomposed with the same layers as the saved one.
        state: as returned by `svf_state_dict`.

    Raises:
        KeyError: a key is missing from ``state`` or is not expected by the model (the
            first mismatch in module order is named).
        ValueError: a tensor's shape differs from the model's.
    """
    expected = svf_state_dict(model)
    for key, target in expected.items():
        if key not in state:
            extra = sorted(set(state) - set(expected))
            hint = f"; the file has unexpected keys such as {extra[0]!r}" if extra else ""
            raise KeyError(f"load_svf_state_dict: missing key {key!r} for the model{hint}")
        if tuple(state[key].shape) != tuple(target.shape):
            raise ValueError(
                f"load_svf_state_dict: shape mismatch for {key!r}: model expects "
                f"{tuple(target.shape)}, state has {tuple(state[key].shape)}"
            )
    for key in state:
        if key not in expected:
            raise KeyError(f"load_svf_state_dict: unexpected key {key!r}: no such SVD parameter in the model")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


def save_svf(path: str | os.PathLike, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Writes the singular values (trained U / Vh and biases too) to a safetensors file.

    The file's metadata holds the format, the module names, the shapes and the SVF config as
    JSON strings, plus ``metadata``.

    Args:
        path: destination file (``.safetensors``).
        model: a model after `apply_svf`.
        metadata: extra string entries (e.g. the experiment name).
    """
    from safetensors.torch import save_file

    state = {k: v.contiguous().cpu() for k, v in svf_state_dict(model).items()}
    configs = {json.dumps(layer.svf_config.to_dict(), sort_keys=True)
               for _, layer in svf_layers(model) if getattr(layer, "svf_config", None) is not None}  # fmt: skip
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "modules": json.dumps([name for name, _ in svf_layers(model)]),
        "shapes": json.dumps({k: list(v.shape) for k, v in state.items()}),
        "config": configs.pop() if len(configs) == 1 else json.dumps(sorted(configs)),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_svf: metadata must map str to str, found {key!r}: {type(value).__name__}")
        meta[key] = value
    # Written next to the destination, then renamed: a crash never leaves a half-written file.
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_svf(path: str | os.PathLike, model: nn.Module) -> dict[str, str]:
    """Loads a file written by `save_svf` into a model after `apply_svf`.

    Args:
        path: the safetensors file.
        model: target model with the same decomposed layers.

    Returns:
        The file's metadata.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_svf: no such file {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"load_svf: {path!r} is not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"load_svf: {path!r} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    try:
        load_svf_state_dict(model, state)
    except (KeyError, ValueError) as err:
        raise type(err)(f"{err.args[0]} (file {path!r})") from None
    return meta
