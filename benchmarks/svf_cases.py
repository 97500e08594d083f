"""The cases of `bench_svf.py`: the regimes, the models of each variant, one step, interleaved timing.

A helper module (no `bench_` prefix: `run_all.py` does not run it on its own).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from svfseg.models.backbones import create_backbone, freeze_batchnorm
from svfseg.svf import FormsPlan, SVFConfig, apply_svf, plan_forms, svf_layers, use_plan
from svfseg.svf.forms import form_key

#: Timed calls per form for the per-layer best (the default, mode "auto", takes 3).
BEST_REPS = 15
VARIANTS = ("frozen", "full", "svf_reparam", "svf_factorized", "svf_cost_model", "svf_auto", "svf_per_layer_best",
            "svf_auto_unfolded")
#: The SVF variants that differ only in the form each layer computes with (BN folded).
FORM_VARIANTS = ("svf_reparam", "svf_factorized", "svf_cost_model", "svf_auto", "svf_per_layer_best")


@dataclass(frozen=True)
class Regime:
    key: str
    title: str
    backbone: str
    output_stride: int
    input_shape: tuple[int, int, int, int]
    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    channels_last: bool = False


def demo_regime(quick: bool) -> Regime:
    """The demo's EfficientNet-Lite0 recipe: its SVF stages and memory layout, a step's backbone batch."""
    from svfseg.config import load_config
    from svfseg.demo import FULL, recipe_path

    cfg = load_config(recipe_path("pfenet"))
    images, side = (4, 64) if quick else (FULL.batch_size * (1 + cfg.shot), FULL.image_size)  # queries + supports
    layout = ", channels_last" if cfg.train.channels_last else ""
    title = f"demo recipe: EfficientNet-Lite0, {images}x3x{side}x{side}{layout}" + (" (quick)" if quick else "")
    return Regime("c", title, "efficientnet_lite0", 32, (images, 3, side, side), tuple(cfg.svf.stages),
                  cfg.train.channels_last)


def regimes(quick: bool) -> list[Regime]:
    """(a) the ResNet-50 bottleneck regime of the paper, (b) a small one, (c) the demo's; --quick shrinks the inputs."""
    if quick:
        return [
            Regime("a", "ResNet-50 deep stem, OS8, 1x3x97x97 (quick)", "resnet50_deep", 8, (1, 3, 97, 97)),
            Regime("b", "ResNet-50 7x7 stem, OS32, 1x3x128x128 (quick)", "resnet50", 32, (1, 3, 128, 128)),
            demo_regime(True),
        ]
    return [
        Regime("a", "ResNet-50 deep stem, OS8, 2x3x321x321", "resnet50_deep", 8, (2, 3, 321, 321)),
        Regime("b", "ResNet-50 7x7 stem, OS32, 2x3x224x224", "resnet50", 32, (2, 3, 224, 224)),
        demo_regime(False),
    ]


def regime_input(regime: Regime, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(regime.input_shape, generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last) if regime.channels_last else x


# -- models -------------------------------------------------------------------------------------
def build_plain(regime: Regime, device: torch.device, x: torch.Tensor) -> nn.Module:
    """Random backbone whose BN statistics are calibrated on ``x``, then frozen.

    Calibration gives the activations the scale they have in a pretrained network (raw
    random init lets ResNet layer4 outputs reach ~100, which would make absolute differences
    meaningless).
    """
    torch.manual_seed(0)
    model = create_backbone(regime.backbone, output_stride=regime.output_stride).to(device)
    if regime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(x)
    model = freeze_batchnorm(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_full(plain: nn.Module, regime: Regime) -> nn.Module:
    """Full fine-tune of the stages SVF touches: every conv weight in them (BN frozen, applied as its own op)."""
    model = copy.deepcopy(plain)
    for stage in regime.stages:
        for module in getattr(model, stage).modules():
            if isinstance(module, nn.Conv2d):
                for p in module.parameters():
                    p.requires_grad_(True)
    return model


def make_svf(plain: nn.Module, regime: Regime, mode: str, fold: bool = True) -> nn.Module:
    model = copy.deepcopy(plain)
    pairs = model.conv_bn_pairs() if fold else None
    return apply_svf(model, SVFConfig(target_modules=list(regime.stages), mode=mode, fold_bn=pairs))


def make_variant(plain: nn.Module, regime: Regime, variant: str, x: torch.Tensor) -> nn.Module:
    """The model of one variant; "svf_auto" is the library default as it is (measured on its first training call)."""
    if variant == "frozen":
        return plain
    if variant == "full":
        return make_full(plain, regime)
    if variant == "svf_auto_unfolded":
        return make_svf(plain, regime, "auto", fold=False)
    if variant in ("svf_reparam", "svf_factorized"):
        return make_svf(plain, regime, variant.removeprefix("svf_"))
    model = make_svf(plain, regime, "auto")
    if variant == "svf_cost_model":
        use_plan(model, FormsPlan(frozen=True))  # nothing measured: the cost model decides every layer
    elif variant == "svf_per_layer_best":
        plan_forms(model, x, reps=BEST_REPS)
    return model


def layer_forms(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, str]]:
    """(layer name, plan key, form it computes with) of every SVD layer in one training forward of ``x``."""
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, name=name: seen.append((name, form_key(m, args[0]), m.choose_mode(args[0]))))
        for name, layer in svf_layers(model)]  # fmt: skip
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(model: nn.Module, variant: str, x: torch.Tensor):
    """One training step (forward + backward), or a no-grad forward for the frozen backbone."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        if variant == "frozen":
            with torch.no_grad():
                model(x)
            return
        for p in params:
            p.grad = None  # as optimizer.zero_grad() does by default
        model(x).float().square().mean().backward()

    return run


def infer_fn(model: nn.Module, x: torch.Tensor):
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def interleaved(fns: dict, device: torch.device, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved round by round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(reps):
        order = keys if r % 2 == 0 else keys[::-1]  # no variant always runs right after another
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def stats(times: dict[str, list[float]], ref: str) -> dict[str, dict]:
    """Median, min, max per key, and the per-round ratio to ``ref`` (median, min, max)."""
    out = {}
    for k, v in times.items():
        ratios = [a / b for a, b in zip(v, times[ref])]
        out[k] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "all_s": v,
                  "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out
