"""SVF cost benchmark: training step time and peak memory per forward form, merge, decomposition.

ResNet-50 with layer2-4 decomposed (random weights, BN frozen as in the paper), two regimes:
  (a) paper-like: deep stem, output stride 8, batch 2 x 3 x 321 x 321;
  (b) small: 7x7 stem, output stride 32, batch 2 x 3 x 224 x 224.
Rows: frozen backbone (no grad, forward only), full fine-tune of layer2-4 (all their conv
weights), SVF reparam / factorized / auto (only S of layer2-4). The loss is the mean square of
the layer4 output. Variants are interleaved round by round so load on a shared machine hits
them alike; medians are reported. Peak memory: on CUDA max_memory_allocated in process, on
CPU the peak resident set of a subprocess during one step (reset through /proc/self/clear_refs).
Also: merged-SVF vs plain inference and their max abs difference, and the decomposition time
(apply_svf on layer2-4) of ResNet-50 and ResNet-101.

Targets: auto within 5% of the faster of reparam/factorized in both regimes; in (a) SVF auto
<= 1.0x full fine-tune; merged inference within 2% of plain, max abs difference < 1e-4;
ResNet-101 decomposition < 20 s.

    python benchmarks/bench_svf.py [--quick] [--device cpu|cuda] [--json out.json] [--reps N]
"""

from __future__ import annotations

import argparse
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
from svfseg.svf import SVFConfig, apply_svf, merge_svf, svf_layers

STAGES = ("layer2", "layer3", "layer4")
SVF_MODES = ("reparam", "factorized", "auto")
VARIANTS = ("frozen", "full", "svf_reparam", "svf_factorized", "svf_auto")


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
            Regime("a", "deep stem, OS8, 1x3x65x65 (quick)", "resnet50_deep", 8, (1, 3, 65, 65)),
            Regime("b", "7x7 stem, OS32, 1x3x64x64 (quick)", "resnet50", 32, (1, 3, 64, 64)),
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


def svf_config(mode: str = "auto") -> SVFConfig:
    return SVFConfig(target_modules=list(STAGES), mode=mode)


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    for _, layer in svf_layers(model):
        layer.mode = mode
        layer.clear_cache()
    return model


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
            p.grad = None
        model(x).float().square().mean().backward()

    return run


def infer_fn(model: nn.Module, x: torch.Tensor):
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def interleaved_medians(fns: dict, device: torch.device, reps: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function, calls interleaved round by round."""
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
    return {k: {"median_s": statistics.median(v), "all_s": v} for k, v in times.items()}


# -- peak memory ----------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_worker(spec: dict) -> dict:
    """Peak resident memory added by one step, measured in this (fresh) process."""
    torch.manual_seed(0)
    model = torch.load(spec["model_path"], weights_only=False)
    if spec["variant"].startswith("svf_"):
        set_mode(model, spec["variant"][4:])
    if spec["variant"] == "full":
        model = make_full(model)
    x = torch.randn(spec["input_shape"])
    run = step_fn(model, spec["variant"], x)
    run()  # warm-up: one-time kernel caches, auto decisions
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


def cpu_peak_memory(model_paths: dict, regime: Regime) -> dict:
    results = {}
    for variant in VARIANTS:
        path = model_paths["svf" if variant.startswith("svf_") else "plain"]
        spec = {"model_path": path, "variant": variant, "input_shape": list(regime.input_shape)}
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        results[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return results


# -- one regime -----------------------------------------------------------------------------------
def run_regime(regime: Regime, device: torch.device, reps: int, tmp: Path) -> dict:
    print(f"\n[{regime.key}] {regime.title}: building models", flush=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(regime.input_shape, generator=gen).to(device)
    plain = build_plain(regime, device, x)
    svf = copy.deepcopy(plain)
    sync(device)
    t0 = time.perf_counter()
    apply_svf(svf, svf_config("auto"))
    sync(device)
    decompose_s = time.perf_counter() - t0
    models = {"frozen": plain, "full": make_full(plain)}
    for mode in SVF_MODES:
        models[f"svf_{mode}"] = set_mode(copy.deepcopy(svf), mode)

    print(f"[{regime.key}] timing training steps ({reps} interleaved rounds)", flush=True)
    steps = interleaved_medians({k: step_fn(m, k, x) for k, m in models.items()}, device, reps)
    plans = {"reparam": 0, "factorized": 0}
    layer_plans = {}
    for name, layer in svf_layers(models["svf_auto"]):
        for plan in layer._plans.values():
            plans[plan] += 1
            layer_plans[name] = plan

    print(f"[{regime.key}] timing inference: plain vs merged SVF vs cached SVF", flush=True)
    merged = merge_svf(copy.deepcopy(models["svf_auto"]))
    eval_models = {"plain": plain, "merged": merged, "svf_cached": models["svf_auto"]}
    # identical work in plain and merged: only many interleaved rounds separate them from noise
    infer = interleaved_medians({k: infer_fn(m, x) for k, m in eval_models.items()}, device, 3 * reps)
    with torch.no_grad():
        ref = plain(x)
        diff_merged = (merged(x) - ref).abs().max().item()
        diff_svf = (models["svf_auto"](x) - ref).abs().max().item()
        # float32 noise floor of the plain network itself: its distance to a float64 run
        floor = (copy.deepcopy(plain).double()(x.double()) - ref.double()).abs().max().item()
        ulp = (one_ulp_perturbed(plain)(x) - ref).abs().max().item()

    print(f"[{regime.key}] peak memory per variant", flush=True)
    if device.type == "cuda":
        memory = cuda_peak_memory(models, x, device)
    else:
        paths = {"plain": str(tmp / f"{regime.key}_plain.pt"), "svf": str(tmp / f"{regime.key}_svf.pt")}
        torch.save(plain, paths["plain"])
        torch.save(svf, paths["svf"])
        memory = cpu_peak_memory(paths, regime)

    return {
        "regime": regime.__dict__,
        "decompose_s": decompose_s,
        "step": {k: v["median_s"] for k, v in steps.items()},
        "step_min": {k: min(v["all_s"]) for k, v in steps.items()},
        "step_all": {k: v["all_s"] for k, v in steps.items()},
        "peak_memory_mb": memory,
        "auto_plans": plans,
        "auto_reparam_layers": [n for n, p in layer_plans.items() if p == "reparam"],
        "inference": {k: v["median_s"] for k, v in infer.items()},
        "inference_min": {k: min(v["all_s"]) for k, v in infer.items()},
        "max_abs_diff": {"merged_vs_plain": diff_merged, "svf_vs_plain": diff_svf},
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
        apply_svf(model, svf_config())
        sync(device)
        out[name] = time.perf_counter() - t0
        print(f"decomposition {name} layer2-4: {out[name]:.2f} s", flush=True)
    return out


# -- report ---------------------------------------------------------------------------------------
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
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(result: dict) -> dict:
    checks = {}
    for r in result["regimes"]:
        k = r["regime"]["key"]
        s = r["step"]
        best = min(s["svf_reparam"], s["svf_factorized"])
        checks[f"{k}: auto / best(reparam, factorized)"] = (ratio(s["svf_auto"], best), 1.05)
        checks[f"{k}: SVF auto / full fine-tune"] = (ratio(s["svf_auto"], s["full"]), 1.0 if k == "a" else None)
        checks[f"{k}: merged / plain inference"] = (ratio(r["inference"]["merged"], r["inference"]["plain"]), 1.02)
        checks[f"{k}: cached SVF / plain inference"] = (
            ratio(r["inference"]["svf_cached"], r["inference"]["plain"]), None)  # fmt: skip
        checks[f"{k}: max |merged - plain|"] = (r["max_abs_diff"]["merged_vs_plain"], 1e-4)
    if "resnet101" in result["decomposition_s"]:
        checks["ResNet-101 decomposition (s)"] = (result["decomposition_s"]["resnet101"], 20.0)
    return checks


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"torch {result['machine']['torch']} ({result['machine']['torch_threads']} threads), "
        f"device {result['machine']['device']}"
        + (f" ({result['machine']['gpu']})" if "gpu" in result["machine"] else ""),
        "",
        "| regime | variant | step (ms, median) | step (ms, min) | x full fine-tune (median) | peak step memory (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["regimes"]:
        k, s, m = r["regime"]["key"], r["step"], r["peak_memory_mb"]
        for v in VARIANTS:
            lines.append(f"| ({k}) {r['regime']['title']} | {v} | {1e3 * s[v]:.1f} | {1e3 * r['step_min'][v]:.1f} | "
                         f"{ratio(s[v], s['full']):.2f} | {m[v]:.0f} |")  # fmt: skip
    lines += ["", "| regime | plain inference (ms) | merged SVF (ms) | cached SVF (ms) | "
              "max abs diff merged vs plain | same, plain fp32 vs fp64 | same, 1 ulp on 10% of "
              "weights | max abs output | auto plans (factorized/reparam) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in result["regimes"]:
        i = r["inference"]
        lines.append(
            f"| ({r['regime']['key']}) | {1e3 * i['plain']:.1f} | {1e3 * i['merged']:.1f} | "
            f"{1e3 * i['svf_cached']:.1f} | {r['max_abs_diff']['merged_vs_plain']:.2e} | "
            f"{r['fp32_noise_floor']:.2e} | {r['one_ulp_10pct_diff']:.2e} | {r['output_abs_max']:.3g} | "
            f"{r['auto_plans']['factorized']}/{r['auto_plans']['reparam']} |"
        )
    for r in result["regimes"]:
        chosen = ", ".join(r["auto_reparam_layers"]) or "none"
        lines.append(f"\n({r['regime']['key']}) auto chose reparam for: {chosen}")
    lines += ["", "| decomposition (apply_svf, layer2-4) | seconds |", "|---|---:|"]
    for name, sec in result["decomposition_s"].items():
        lines.append(f"| {name} | {sec:.2f} |")
    lines += ["", "| check | value | target | |", "|---|---:|---:|---|"]
    for name, (value, target) in result["checks"].items():
        status = "" if target is None else ("ok" if value <= target else "MISSED")
        tgt = "" if target is None else f"<= {target:g}"
        lines.append(f"| {name} | {value:.3g} | {tgt} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, few rounds (smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--reps", type=int, help="interleaved rounds (default 11, quick 2)")
    parser.add_argument("--regimes", default="a,b", help="comma list of regimes to run")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    reps = args.reps or (2 if args.quick else 11)
    wanted = set(args.regimes.split(","))
    result = {"machine": machine(device), "quick": args.quick, "reps": reps, "regimes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for regime in regimes(args.quick):
            if regime.key in wanted:
                result["regimes"].append(run_regime(regime, device, reps, Path(tmp)))
    result["decomposition_s"] = decomposition_times(device, args.quick)
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
