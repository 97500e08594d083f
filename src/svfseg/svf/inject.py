"""Put SVD layers into a model, fold them back, report counts (saving/loading S: `svf/state.py`)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from svfseg.svf.config import SVFConfig, selector_matches
from svfseg.svf.decompose import check_exact, full_rank
from svfseg.svf.fold import FoldedBatchNorm, check_pairs, refuse_trainable, trainable_bn_error
from svfseg.svf.layers import SUPPORTED_TYPES, SVFLayer, svf_layer_from
from svfseg.svf.plan import FormsPlan

logger = logging.getLogger(__name__)



def is_svf_layer(module: nn.Module) -> bool:
    """Tells whether a module is one of the SVD layers of this package."""
    return isinstance(module, SVFLayer)


def svf_layers(model: nn.Module) -> Iterator[tuple[str, SVFLayer]]:
    """Yields (qualified_name, layer) for every SVD layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SVFLayer):
            yield name, module


def singular_value_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yields (qualified_parameter_name, S) for every SVD layer of the model."""
    for name, layer in svf_layers(model):
        yield join_name(name, "S"), layer.S


#: Attribute of each factor that may train (V stands for Vh).
FACTOR_ATTR = {"U": "U", "S": "S", "V": "Vh"}


def trained_factors(layer: SVFLayer) -> tuple[str, ...]:
    return tuple(getattr(layer, "trained_factors", ("S",)))


def trained_factor_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yields (qualified_parameter_name, tensor) for the factors each SVD layer trains (its S by default;
    U and/or Vh with ``SVFConfig.train_factors``)."""
    for name, layer in svf_layers(model):
        for factor in trained_factors(layer):
            yield join_name(name, FACTOR_ATTR[factor]), getattr(layer, FACTOR_ATTR[factor])


def set_trained_factors(layer: SVFLayer, factors) -> None:
    """Make exactly ``factors`` (a subset of "U", "S", "V") of an SVD layer trainable.

    A trained U / Vh becomes an ``nn.Parameter`` under the same name (so state-dict keys do not
    change); an untrained one is a frozen buffer again. The layer then runs the rebuilt-weight
    form whenever U or Vh trains, and remembers the set in ``layer.trained_factors``.
    """
    factors = tuple(factors)
    for factor in ("U", "V"):
        attr = FACTOR_ATTR[factor]
        tensor = getattr(layer, attr)
        if factor in factors and not isinstance(tensor, nn.Parameter):
            del layer._buffers[attr]
            layer.register_parameter(attr, nn.Parameter(tensor.detach(), requires_grad=True))
        elif factor not in factors and isinstance(tensor, nn.Parameter):
            del layer._parameters[attr]
            layer.register_buffer(attr, tensor.detach())
        else:
            tensor.requires_grad_(factor in factors)
    layer.S.requires_grad_("S" in factors)
    layer.trained_factors = factors
    layer.clear_cache()


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _looks_like_weight_layer(module: nn.Module) -> bool:
    """Conv/linear-like modules that SVF cannot take (subclasses, transposed, lazy, ...)."""
    lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
    conv_or_linear = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear))
    return lazy or conv_or_linear


def _selected(config: SVFConfig, name: str, module: nn.Module) -> bool:
    if config.target_modules is not None and not selector_matches(config.target_modules, name):
        return False
    if selector_matches(config.exclude_modules, name):
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = tuple(module.kernel_size)
        if config.skip_1x1 and all(k == 1 for k in kernel):
            return False
        if config.skip_3x3 and all(k == 3 for k in kernel):
            return False
    return True


@contextlib.contextmanager
def _one_lapack_thread(active: bool) -> Iterator[None]:
    """Runs the CPU SVDs on one thread, restoring the thread count afterwards.

    LAPACK's SVD gains little from a second core, but its spin-waiting threads collapse when
    the cores are shared: on a busy 2-core machine the ResNet-50 layer2-4 decomposition took
    34 s on two threads and 3 s on one.
    """
    before = torch.get_num_threads()
    if active and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def apply_svf(model: nn.Module, config: SVFConfig | None = None) -> nn.Module:
    """Replaces the selected conv/linear layers by exact SVD layers, in place.

    Afterwards only the singular values (and the biases of replaced layers when
    ``config.train_bias``) require grad, plus every parameter of the modules named in
    ``config.trainable_modules``; everything else in ``model`` is frozen.

    Args:
        model: the network; its supported layers (exact types nn.Conv1d/2d/3d, nn.Linear)
            that the config selects are decomposed. Other conv/linear-like types are left
            alone and listed in one logged warning.
        config: what to decompose and how; default `SVFConfig()` (every supported layer).

    Returns:
        The same model object.
    """
    config = SVFConfig() if config is None else config
    if not isinstance(config, SVFConfig):
        raise TypeError(f"apply_svf: expected an SVFConfig, found {type(config).__name__}")
    existing = next(svf_layers(model), None)
    if existing is not None:
        raise RuntimeError(
            f"apply_svf: the model already contains SVD layers (first: {existing[0] or '<root>'!r}); "
            "SVF cannot be applied twice. Call merge_svf(model) first to start again."
        )
    if type(model) in SUPPORTED_TYPES:
        raise ValueError(
            f"apply_svf: the root module is a plain {type(model).__name__} and cannot be replaced "
            "in place; wrap it, e.g. nn.Sequential(layer)."
        )

    targets: dict[int, tuple[str, nn.Module]] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or not _selected(config, name, module):
            continue
        if type(module) in SUPPORTED_TYPES:
            targets[id(module)] = (name, module)
        elif _looks_like_weight_layer(module):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        logger.warning(
            "apply_svf: left %d unsupported layer(s) unchanged: %s",
            len(unsupported), ", ".join(unsupported),
        )  # fmt: skip
    if not targets:
        if config.target_modules is not None:
            raise ValueError(
                f"apply_svf: target_modules={config.target_modules!r} matched no supported layer "
                f"(nn.Conv1d/2d/3d, nn.Linear) of {type(model).__name__} (exclude_modules="
                f"{config.exclude_modules!r}, skip_1x1={config.skip_1x1}, skip_3x3={config.skip_3x3})"
            )
        logger.warning("apply_svf: %s has no supported layer to decompose", type(model).__name__)

    pairs = check_pairs(model, config.fold_bn or ())
    for conv_name, bn_name in pairs:  # refuse before anything is replaced
        if selector_matches(config.trainable_modules, bn_name):
            raise trainable_bn_error(bn_name)
    replacements: dict[int, SVFLayer] = {}
    plan = FormsPlan()  # mode "auto": equal layers of this model are measured once
    with _one_lapack_thread(any(m.weight.device.type == "cpu" for _, m in targets.values())):
        for key, (name, module) in targets.items():
            layer = svf_layer_from(module, config.mode, config.svd_dtype, config.rank_multiple)
            if layer.rank == full_rank(module.weight.shape, getattr(module, "groups", 1)):  # floored: lossy by design
                check_exact(module.weight, (layer.U, layer.S, layer.Vh), where=name)
            layer.svf_config = config
            layer.forms_plan = plan
            replacements[key] = layer
    # A module registered under several names (shared) is replaced everywhere by one layer.
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])

    _set_trainable(model, config)
    _fold_pairs(model, pairs)
    if logger.isEnabledFor(logging.INFO):
        logger.info("apply_svf: decomposed %d layer(s); %s", len(replacements), trainable_parameter_report(model))
    return model


def _fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Folds each listed BN into its (now decomposed) conv; pairs with an undecomposed conv stay."""
    count = 0
    for conv_name, bn_name in pairs:
        layer, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(layer, SVFLayer):
            logger.debug("apply_svf: %s is not decomposed; %s is not folded", conv_name, bn_name)
            continue
        refuse_trainable(bn, bn_name)  # trainable_modules may have unfrozen it
        folded = layer.fold_batchnorm(bn, bn_name)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, folded)
        count += 1
    if count:
        logger.info("apply_svf: folded %d frozen BatchNorm(s) into SVD layers", count)


def _set_trainable(model: nn.Module, config: SVFConfig) -> None:
    """Freezes everything, then unfreezes S, trained biases and the trainable modules."""
    # Attribute assignment (not requires_grad_) also works on lazy modules' uninitialised
    # parameters, and the flag survives their initialisation.
    for param in model.parameters():
        param.requires_grad = False
    if config.trainable_modules is not None:
        found = False
        for name, module in model.named_modules():
            if not name or not selector_matches(config.trainable_modules, name):
                continue
            if isinstance(module, SVFLayer) and selector_matches(
                config.trainable_modules, name, descendants=False
            ):
                raise ValueError(
                    f"apply_svf: {name!r} is decomposed and also named in trainable_modules; "
                    "exclude it from target_modules or drop it from trainable_modules"
                )
            found = True
            for param in module.parameters():
                param.requires_grad = True
        if not found:
            raise ValueError(
                f"apply_svf: trainable_modules={config.trainable_modules!r} matched no module "
                f"of {type(model).__name__}"
            )
    # SVD layers follow their own rule even inside a trainable container.
    for _, layer in svf_layers(model):
        set_trained_factors(layer, config.train_factors)
        if layer.bias is not None:
            layer.bias.requires_grad_(config.train_bias)


def merge_svf(model: nn.Module, fold_bn: bool = False) -> nn.Module:
    """Folds every SVD layer back into the plain layer with W = U diag(S) Vh, in place.

    The merged weight requires grad when S did; biases keep their flag. By default folded
    BatchNorms are restored (same module types as before `apply_svf`), so the state dict
    has exactly the keys of the original architecture and loads strictly into it.

    Args:
        model: a model (or a bare SVD layer inside a container) after `apply_svf`.
        fold_bn: keep folded BatchNorms folded instead: their conv gets the scaled weight and
            a bias, the BN becomes nn.Identity (an inference export; keys change).

    Returns:
        The same model object.
    """
    if isinstance(model, SVFLayer):
        raise ValueError("merge_svf: the root module is an SVD layer; call layer.to_plain() instead")
    layers = list(svf_layers(model))
    plain: dict[int, nn.Module] = {id(layer): layer.to_plain(fold_bn=fold_bn) for _, layer in layers}
    bns: dict[int, nn.Module] = {}
    for _, layer in layers:
        bn = layer.folded_bn
        if bn is not None:
            bns[id(bn)] = nn.Identity() if fold_bn else bn.restore()
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in plain:
                setattr(parent, child_name, plain[id(child)])
            elif child is not None and id(child) in bns:
                setattr(parent, child_name, bns[id(child)])
    stray = [name for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
    if stray:
        raise RuntimeError(f"merge_svf: folded BatchNorm(s) without their SVD layer: {stray[:3]}")
    logger.info("merge_svf: merged %d layer(s), %s %d BatchNorm(s)", len(plain),
                "kept folded" if fold_bn else "restored", len(bns))  # fmt: skip
    return model


def _plain_count(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting SVD layers as their plain weights."""
    trainable = total = 0
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if isinstance(param, nn.parameter.UninitializedParameter):
                continue  # lazy modules: size unknown until their first forward
            if param.requires_grad:
                trainable += param.numel()
            if isinstance(sub, SVFLayer) and any(param is t for t in (sub.S, sub.U, sub.Vh)):
                continue  # the factors stand for the plain weight, counted below
            total += param.numel()
        if isinstance(sub, SVFLayer):
            total += int(torch.Size(sub.weight_shape).numel())
    return trainable, total


def trainable_parameter_report(model: nn.Module) -> str:
    """Returns "trainable params: N || all params: M || trainable%: P" (PEFT's style).

    "all params" counts each SVD layer as the plain layer it stands for (weight + bias), so
    the percentage compares with the original model; the trainable count includes S.
    Uninitialised parameters of lazy modules are not counted.

    Args:
        model: any module.

    Returns:
        The one-line report.
    """
    trainable, total = _plain_count(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
