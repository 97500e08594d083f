"""SVF cost benchmark: training step time, spread and peak memory per form, merge, decomposition.

ResNet-50 with layer2-4 decomposed (random weights, BN statistics calibrated then frozen, as
in the paper), two regimes:
  (a) paper-like: deep stem, output stride 8, batch 2 x 3 x 321 x 321;
  (b) small: 7x7 stem, output stride 32, batch 2 x 3 x 224 x 224.
Rows: frozen backbone (no grad, forward only); full fine-tune of layer2-4 (every conv weight,
BN frozen but applied as a separate op, as any full fine-tune does); SVF reparam / factorized
/ auto / tune with the frozen BNs folded into the SVD layers; SVF auto without folding. The
loss is the mean square of the layer4 output. Variants run interleaved round by round (the
order reversed every other round) so load on a shared machine hits them alike; every row
reports the median, the spread (min-max) and the median of the per-round ratios to the full
fine-tune step of the same round. Peak memory: on CUDA max_memory_allocated, on CPU the peak
resident set added by one step in a fresh subprocess (reset through /proc/self/clear_refs).
Saved activations per layer type come from saved-tensor hooks (parameters and buffers
excluded). Also: merged-SVF vs plain conv+BN inference (BN restored, and BN folded into the
convs), their max abs difference, and the decomposition time of ResNet-50 and ResNet-101.

Targets (issue 14): (a) SVF auto <= 0.65x full fine-tune step, SVF auto peak memory <= 0.75x
full; merged inference with BN folded <= 0.95x plain conv+BN, max abs difference at float32
rounding level; (b) SVF auto <= 1.0x full; tune within 3% of the faster form; auto within 5%.

    python benchmarks/bench_svf.py [--quick] [--device cpu|cuda] [--json out.json] [--reps N] [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import copy
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from svfseg.models.backbones import create_backbone, freeze_batchnorm
from svfseg.svf import SVFConfig, apply_svf, fold_conv_bn, merge_svf, svf_layers

STAGES = ("layer2", "layer3", "layer4")
SVF_MODES = ("reparam", "factorized", "auto", "tune")
VARIANTS = ("frozen", "full", "svf_reparam", "svf_factorized", "svf_auto", "svf_tune", "svf_auto_unfolded")


@dataclass(frozen=True)
class Regime:
    key: str
    title: str
    backbone: str
    output_stride: int
    input_shape: tuple[int, int, int, int]


def regimes(quick: bool) -> list[Regime]:
    """The two regimes of the issue; --quick shrinks the inputs (not the network)."""
    if quick:
        return [
            Regime("a", "deep stem, OS8, 1x3x97x97 (quick)", "resnet50_deep", 8, (1, 3, 97, 97)),
            Regime("b", "7x7 stem, OS32, 1x3x128x128 (quick)", "resnet50", 32, (1, 3, 128, 128)),
        ]
    return [
        Regime("a", "deep stem, OS8, 2x3x321x321", "resnet50_deep", 8, (2, 3, 321, 321)),
        Regime("b", "7x7 stem, OS32, 2x3x224x224", "resnet50", 32, (2, 3, 224, 224)),
    ]


# -- models -------------------------------------------------------------------------------------
def build_plain(regime: Regime, device: torch.device, x: torch.Tensor) -> nn.Module:
    """Random ResNet whose BN statistics are calibrated on ``x``, then frozen.

    Calibration gives the activations the scale they have in a pretrained network (raw
    random init lets layer4 outputs reach ~100, which would make absolute differences
    meaningless).
    """
    torch.manual_seed(0)
    model = create_backbone(regime.backbone, output_stride=regime.output_stride).to(device)
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


def make_full(plain: nn.Module) -> nn.Module:
    """Full fine-tune of the same stages SVF touches: every conv weight of layer2-4."""
    model = copy.deepcopy(plain)
    for stage in STAGES:
        for module in getattr(model, stage).modules():
            if isinstance(module, nn.Conv2d):
                for p in module.parameters():
                    p.requires_grad_(True)
    return model


def make_svf(plain: nn.Module, mode: str, fold: bool = True) -> nn.Module:
    model = copy.deepcopy(plain)
    pairs = model.conv_bn_pairs() if fold else None
    return apply_svf(model, SVFConfig(target_modules=list(STAGES), mode=mode, fold_bn=pairs))


def make_variant(plain: nn.Module, variant: str) -> nn.Module:
    if variant == "frozen":
        return plain
    if variant == "full":
        return make_full(plain)
    if variant == "svf_auto_unfolded":
        return make_svf(plain, "auto", fold=False)
    return make_svf(plain, variant.removeprefix("svf_"))


def merged_folded(svf: nn.Module) -> nn.Module:
    """The deployment export: SVD layers merged, every frozen BN folded into its conv."""
    model = merge_svf(copy.deepcopy(svf), fold_bn=True)
    return fold_conv_bn(model, model.conv_bn_pairs())


@torch.no_grad()
def one_ulp_perturbed(plain: nn.Module, fraction: float = 0.1) -> nn.Module:
    """Copy of the plain model with ``fraction`` of the layer2-4 conv weights moved by one ulp.

    It shows how far any weight change at float32 rounding level moves this network's
    output: the floor for a merge that is not bit-identical.
    """
    model = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(0)
    for stage in STAGES:
        for module in getattr(model, stage).modules():
            if isinstance(module, nn.Conv2d):
                w = module.weight
                flip = torch.rand(w.shape, generator=gen).to(w.device) < fraction
                up = torch.rand(w.shape, generator=gen).to(w.device) < 0.5
                toward = torch.where(up, torch.inf, -torch.inf).to(w.dtype)
                w.copy_(torch.where(flip, torch.nextafter(w, toward), w))
    return model


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


# -- memory ---------------------------------------------------------------------------------------
def saved_activations(model: nn.Module, variant: str, x: torch.Tensor) -> dict[str, float]:
    """MB the autograd graph keeps for the backward, per layer type (parameters/buffers excluded).

    Each storage counts once, for the first layer that saves it (a ReLU output that the next
    conv also keeps is the ReLU's).
    """
    if variant == "frozen":
        return {}
    persistent = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    per_type: collections.Counter = collections.Counter()
    current = ["other"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in persistent:
            seen.add(key)
            per_type[current[0]] += storage.nbytes() / 2**20
        return t

    hooks = [m.register_forward_pre_hook(lambda mod, args: current.__setitem__(0, type(mod).__name__))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return dict(per_type)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_worker(spec: dict) -> dict:
    """Peak resident memory added by one step, measured in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    plain = torch.load(spec["model_path"], weights_only=False)
    model = make_variant(plain, spec["variant"])
    del plain
    x = torch.randn(spec["input_shape"])
    run = step_fn(model, spec["variant"], x)
    run()  # warm-up: one-time kernel caches, auto/tune decisions
    run()
    for p in model.parameters():
        p.grad = None  # as after optimizer.zero_grad(): the step's own gradients count in its peak
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give cached heap back so RSS starts clean
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _proc_status_kb("VmRSS")
    run()
    peak = _proc_status_kb("VmHWM")
    return {"peak_mb": (peak - base) / 1024}


def cpu_peak_memory(model_path: str, regime: Regime, threads: int) -> dict:
    results = {}
    for variant in VARIANTS:
        spec = {"model_path": model_path, "variant": variant, "input_shape": list(regime.input_shape),
                "threads": threads}
        cmd = [sys.executable, __file__, "--memory-worker", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {variant} failed:\n{proc.stderr[-2000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    return results


def cuda_peak_memory(models: dict, x: torch.Tensor, device: torch.device) -> dict:
    results = {}
    for variant, model in models.items():
        run = step_fn(model, variant, x)
        run()
        for p in model.parameters():
            p.grad = None  # as after optimizer.zero_grad(): the step's own gradients count in its peak
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        results[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return results


# -- one regime -----------------------------------------------------------------------------------
def tuned_choices(model: nn.Module) -> dict:
    """What mode="tune" measured: per timed shape, the winner and both forms' seconds."""
    layers = list(svf_layers(model))
    if not layers:
        return {}
    entries = layers[0][1].tune_cache.entries()
    wins = collections.Counter(e["plan"] for e in entries)
    return {"timed_shapes": len(entries), "wins": dict(wins),
            "layer_plans": dict(collections.Counter(p for _, layer in layers for p in layer._plans.values()))}


def run_regime(regime: Regime, device: torch.device, reps: int, tmp: Path, threads: int, infer_reps: int) -> dict:
    print(f"\n[{regime.key}] {regime.title}: building models", flush=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(regime.input_shape, generator=gen).to(device)
    plain = build_plain(regime, device, x)
    sync(device)
    t0 = time.perf_counter()
    make_svf(plain, "auto")
    sync(device)
    decompose_s = time.perf_counter() - t0
    models = {v: make_variant(plain, v) for v in VARIANTS}

    print(f"[{regime.key}] timing training steps ({reps} interleaved rounds, {threads} thread(s))", flush=True)
    steps = stats(interleaved({k: step_fn(m, k, x) for k, m in models.items()}, device, reps), "full")
    plans = collections.Counter(p for _, layer in svf_layers(models["svf_auto"]) for p in layer._plans.values())
    auto_reparam = [n for n, layer in svf_layers(models["svf_auto"]) if "reparam" in layer._plans.values()]

    print(f"[{regime.key}] saved activations per layer type", flush=True)
    saved = {k: saved_activations(models[k], k, x) for k in ("full", "svf_auto", "svf_auto_unfolded", "svf_reparam")}

    print(f"[{regime.key}] timing inference: plain conv+BN vs merged SVF (BN kept / folded) vs cached SVF", flush=True)
    svf = models["svf_auto"]
    eval_models = {"plain": plain, "merged": merge_svf(copy.deepcopy(svf)), "merged_bn_folded": merged_folded(svf),
                   "svf_cached": svf}
    # identical work in plain and merged: only many interleaved rounds separate them from noise
    infer = stats(interleaved({k: infer_fn(m, x) for k, m in eval_models.items()}, device, infer_reps), "plain")
    with torch.no_grad():
        ref = plain(x)
        diffs = {k: (m(x) - ref).abs().max().item() for k, m in eval_models.items() if k != "plain"}
        # float32 noise floor of the plain network itself: its distance to a float64 run
        floor = (copy.deepcopy(plain).double()(x.double()) - ref.double()).abs().max().item()
        ulp = (one_ulp_perturbed(plain)(x) - ref).abs().max().item()

    print(f"[{regime.key}] peak memory per variant", flush=True)
    if device.type == "cuda":
        memory = cuda_peak_memory(models, x, device)
    else:
        path = str(tmp / f"{regime.key}_plain.pt")
        torch.save(plain, path)
        memory = cpu_peak_memory(path, regime, threads)

    return {
        "regime": regime.__dict__,
        "decompose_s": decompose_s,
        "step": steps,
        "peak_memory_mb": memory,
        "saved_activations_mb": saved,
        "auto_plans": dict(plans),
        "auto_reparam_layers": auto_reparam,
        "tune": tuned_choices(models["svf_tune"]),
        "inference": infer,
        "max_abs_diff": diffs,
        "output_abs_max": ref.abs().max().item(),
        "fp32_noise_floor": floor,
        "one_ulp_10pct_diff": ulp,
    }


def decomposition_times(device: torch.device, quick: bool) -> dict:
    out = {}
    for name in ("resnet50",) if quick else ("resnet50", "resnet101"):
        torch.manual_seed(0)
        model = create_backbone(name, output_stride=8).to(device)
        sync(device)
        t0 = time.perf_counter()
        apply_svf(model, SVFConfig(target_modules=list(STAGES)))
        sync(device)
        out[name] = time.perf_counter() - t0
        print(f"decomposition {name} layer2-4: {out[name]:.2f} s", flush=True)
    return out


# -- report ---------------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.+)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(result: dict) -> dict:
    checks = {}
    for r in result["regimes"]:
        k, s, m, i = r["regime"]["key"], r["step"], r["peak_memory_mb"], r["inference"]
        best = min(s["svf_reparam"]["median_s"], s["svf_factorized"]["median_s"])
        checks[f"{k}: auto / best(reparam, factorized) step"] = (ratio(s["svf_auto"]["median_s"], best), 1.05)
        checks[f"{k}: tune / best(reparam, factorized) step"] = (ratio(s["svf_tune"]["median_s"], best), 1.03)
        checks[f"{k}: SVF auto / full fine-tune step (per-round median)"] = (
            s["svf_auto"]["ratio_median"], 0.65 if k == "a" else 1.0)
        checks[f"{k}: SVF auto / full fine-tune peak memory"] = (ratio(m["svf_auto"], m["full"]), 0.75 if k == "a" else None)
        checks[f"{k}: merged (BN folded) / plain conv+BN inference"] = (i["merged_bn_folded"]["ratio_median"], 0.95)
        checks[f"{k}: merged (BN kept) / plain inference"] = (i["merged"]["ratio_median"], 1.02)
        checks[f"{k}: max |merged (BN folded) - plain|"] = (r["max_abs_diff"]["merged_bn_folded"],
                                                           max(10 * r["one_ulp_10pct_diff"], 1e-4))
    if "resnet101" in result["decomposition_s"]:
        checks["ResNet-101 decomposition (s)"] = (result["decomposition_s"]["resnet101"], 20.0)
    return checks


def markdown(result: dict) -> str:
    mach = result["machine"]
    lines = [
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
        f"device {mach['device']}" + (f" ({mach['gpu']})" if "gpu" in mach else "")
        + f", load average at start {mach['load_average_start']}, end {result.get('load_average_end')}; "
        f"{result['reps']} interleaved rounds",
        "",
        "| regime | variant | step ms (median) | min-max ms | x full (per-round median, min-max) | peak step memory MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["regimes"]:
        k, s, m = r["regime"]["key"], r["step"], r["peak_memory_mb"]
        for v in VARIANTS:
            st = s[v]
            lines.append(
                f"| ({k}) | {v} | {1e3 * st['median_s']:.1f} | {1e3 * st['min_s']:.0f}-{1e3 * st['max_s']:.0f} | "
                f"{st['ratio_median']:.3f} ({st['ratio_min']:.2f}-{st['ratio_max']:.2f}) | {m[v]:.0f} |")
    lines += ["", "| regime | variant | saved activations MB per layer type (parameters/buffers excluded) |", "|---|---|---|"]
    for r in result["regimes"]:
        for v, per in r["saved_activations_mb"].items():
            text = ", ".join(f"{t} {mb:.0f}" for t, mb in sorted(per.items(), key=lambda kv: -kv[1]))
            lines.append(f"| ({r['regime']['key']}) | {v} | total {sum(per.values()):.0f}: {text} |")
    lines += ["", "| regime | inference | ms (median) | x plain conv+BN (per-round median, min-max) | max abs diff vs plain |",
              "|---|---|---:|---:|---:|"]
    for r in result["regimes"]:
        for v, st in r["inference"].items():
            diff = r["max_abs_diff"].get(v)
            lines.append(f"| ({r['regime']['key']}) | {v} | {1e3 * st['median_s']:.1f} | {st['ratio_median']:.3f} "
                         f"({st['ratio_min']:.2f}-{st['ratio_max']:.2f}) | {'' if diff is None else f'{diff:.2e}'} |")
    for r in result["regimes"]:
        k = r["regime"]["key"]
        lines.append(
            f"\n({k}) float32 noise floor (plain fp32 vs fp64) {r['fp32_noise_floor']:.2e}; 1 ulp on 10% of the "
            f"weights moves the output {r['one_ulp_10pct_diff']:.2e}; max abs output {r['output_abs_max']:.3g}. "
            f"auto plans {r['auto_plans']}; auto chose reparam for: {', '.join(r['auto_reparam_layers']) or 'none'}; "
            f"tune: {r['tune']}")
    lines += ["", "| decomposition (apply_svf, layer2-4) | seconds |", "|---|---:|"]
    for name, sec in result["decomposition_s"].items():
        lines.append(f"| {name} | {sec:.2f} |")
    lines += ["", "| check | value | target | |", "|---|---:|---:|---|"]
    for name, (value, target) in result["checks"].items():
        status = "" if target is None else ("met" if value <= target else "MISSED")
        tgt = "" if target is None else f"<= {target:.3g}"
        lines.append(f"| {name} | {value:.3g} | {tgt} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer rounds (bench-quick)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--reps", type=int, help="interleaved rounds (default 9, quick 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine a second spinning thread "
                             "adds more noise than speed)")
    parser.add_argument("--regimes", default="a,b", help="comma list of regimes to run")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (5 if args.quick else 9)
    wanted = set(args.regimes.split(","))
    result = {"machine": machine(device), "quick": args.quick, "reps": reps, "regimes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for regime in regimes(args.quick):
            if regime.key in wanted:
                infer_reps = (2 if args.quick else 3) * reps
                result["regimes"].append(run_regime(regime, device, reps, Path(tmp), args.threads, infer_reps))
    result["decomposition_s"] = decomposition_times(device, args.quick)
    result["load_average_end"] = load_average()
    result["checks"] = summarize(result)
    text = markdown(result)
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(result, checks={k: {"value": v, "target": t} for k, (v, t) in result["checks"].items()})
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
