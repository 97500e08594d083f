"""SVF cost benchmark: a training step of each form side by side, the forms plan against the per-layer best.

Three regimes (random weights, BN statistics calibrated then frozen, as in the paper):
  (a) ResNet-50 bottlenecks: deep stem, output stride 8, layer2-4 decomposed, batch 2 x 3 x 321 x 321;
  (b) small: ResNet-50 7x7 stem, output stride 32, batch 2 x 3 x 224 x 224;
  (c) the demo's recipe: EfficientNet-Lite0, its svf.stages decomposed, channels_last, one step's
      backbone batch (8 episodes x (query + support) at 112 px).
Rows: frozen backbone (no grad, forward only); full fine-tune of the same stages (every conv weight,
BN frozen but applied as a separate op, as any full fine-tune does); SVF with the frozen BNs folded
into the SVD layers, in each fixed form (reparam, factorized), with the old cost model's choice per
layer (cost_model), with the library default (auto: each layer geometry's forms timed 3 times on the
first training call, then kept) and with the per-layer best (each geometry's faster form by 15 timed
calls per form); SVF auto without folding. The loss is the mean square of the last stage's output.
Variants run interleaved round by round (the order reversed every other round) so load on a shared
machine hits them alike; every row reports the median, the spread (min-max) and the median of the
per-round ratios to the full fine-tune step of the same round. "per-layer ms" adds up, over the
model's SVD layers, the per-layer best's timings of the form each variant computes with (what the
forms cost in isolation). Peak memory, saved activations per layer type, merged-SVF vs plain
conv+BN inference and the decomposition time of ResNet-50 and ResNet-101 as before.

Targets (issue 27): auto within 5% of the per-layer best on (a) and (c); auto <= 0.82x of full
fine-tuning on (a) on 2 idle cores. Kept from issue 14: SVF peak memory (a) <= 0.75x full; merged
inference with BN folded <= 0.95x plain conv+BN, max abs difference at float32 rounding level; (b)
SVF auto <= 1.0x full.

    python benchmarks/bench_svf.py [--quick] [--device cpu|cuda] [--json out.json] [--reps N] [--threads N]
                                   [--regimes a,b,c] [--no-extras]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from svf_cases import (FORM_VARIANTS, VARIANTS, Regime, build_plain, infer_fn, interleaved, layer_forms, make_svf,
                       make_variant, regime_input, regimes, stats, step_fn, sync)
from svf_memory import cpu_peak_memory, cuda_peak_memory, memory_worker, saved_activations
from svfseg.models.backbones import create_backbone
from svfseg.svf import SVFConfig, apply_svf, fold_conv_bn, forms_plan, merge_svf

#: Variants whose peak memory is measured (the others compute with the same forms as one of these).
MEMORY_VARIANTS = ("frozen", "full", "svf_reparam", "svf_factorized", "svf_auto", "svf_auto_unfolded")


def merged_folded(svf: torch.nn.Module) -> torch.nn.Module:
    """The deployment export: SVD layers merged, every frozen BN folded into its conv."""
    model = merge_svf(copy.deepcopy(svf), fold_bn=True)
    return fold_conv_bn(model, model.conv_bn_pairs())


@torch.no_grad()
def one_ulp_perturbed(plain: torch.nn.Module, stages, fraction: float = 0.1) -> torch.nn.Module:
    """Copy of the plain model with ``fraction`` of the stages' conv weights moved by one ulp.

    It shows how far any weight change at float32 rounding level moves this network's
    output: the floor for a merge that is not bit-identical.
    """
    model = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(0)
    for stage in stages:
        for module in getattr(model, stage).modules():
            if isinstance(module, torch.nn.Conv2d):
                w = module.weight
                flip = torch.rand(w.shape, generator=gen).to(w.device) < fraction
                up = torch.rand(w.shape, generator=gen).to(w.device) < 0.5
                toward = torch.where(up, torch.inf, -torch.inf).to(w.dtype)
                w.copy_(torch.where(flip, torch.nextafter(w, toward), w))
    return model


def per_layer_ms(models: dict, x: torch.Tensor) -> tuple[dict, dict]:
    """Per form variant: the per-layer best's timings of the forms it computes with, summed over its layers (ms);
    and per variant how many layers compute with each form."""
    seconds = forms_plan(models["svf_per_layer_best"]).seconds
    sums, counts = {}, {}
    for v in FORM_VARIANTS:
        used = layer_forms(models[v], x)
        sums[v] = 1e3 * sum(seconds[key][form] for _, key, form in used if key in seconds)
        counts[v] = {f: sum(1 for *_, form in used if form == f) for f in ("reparam", "factorized")}
    return sums, counts


def run_regime(regime: Regime, device: torch.device, reps: int, tmp: Path, threads: int, infer_reps: int,
               extras: bool) -> dict:
    print(f"\n[{regime.key}] {regime.title}: building models", flush=True)
    x = regime_input(regime, device)
    plain = build_plain(regime, device, x)
    sync(device)
    t0 = time.perf_counter()
    make_svf(plain, regime, "auto")
    sync(device)
    decompose_s = time.perf_counter() - t0
    models = {v: make_variant(plain, regime, v, x) for v in VARIANTS}

    print(f"[{regime.key}] timing training steps ({reps} interleaved rounds, {threads} thread(s))", flush=True)
    steps = stats(interleaved({k: step_fn(m, k, x) for k, m in models.items()}, device, reps), "full")
    layer_ms, layer_counts = per_layer_ms(models, x)
    out = {"regime": regime.__dict__, "decompose_s": decompose_s, "step": steps, "per_layer_ms": layer_ms,
           "layer_forms": layer_counts, "auto_plan": forms_plan(models["svf_auto"]).to_dict(),
           "best_plan": forms_plan(models["svf_per_layer_best"]).to_dict()}
    if not extras:
        return out

    print(f"[{regime.key}] saved activations per layer type", flush=True)
    out["saved_activations_mb"] = {k: saved_activations(models[k], k, x)
                                   for k in ("full", "svf_auto", "svf_auto_unfolded", "svf_reparam")}

    print(f"[{regime.key}] timing inference: plain conv+BN vs merged SVF (BN kept / folded) vs cached SVF", flush=True)
    svf = models["svf_auto"]
    eval_models = {"plain": plain, "merged": merge_svf(copy.deepcopy(svf)), "merged_bn_folded": merged_folded(svf),
                   "svf_cached": svf}
    # identical work in plain and merged: only many interleaved rounds separate them from noise
    out["inference"] = stats(interleaved({k: infer_fn(m, x) for k, m in eval_models.items()}, device, infer_reps),
                             "plain")
    with torch.no_grad():
        ref = plain(x)
        out["max_abs_diff"] = {k: (m(x) - ref).abs().max().item() for k, m in eval_models.items() if k != "plain"}
        # float32 noise floor of the plain network itself: its distance to a float64 run
        out["fp32_noise_floor"] = (copy.deepcopy(plain).double()(x.double()) - ref.double()).abs().max().item()
        out["one_ulp_10pct_diff"] = (one_ulp_perturbed(plain, regime.stages)(x) - ref).abs().max().item()
        out["output_abs_max"] = ref.abs().max().item()

    print(f"[{regime.key}] peak memory per variant", flush=True)
    if device.type == "cuda":
        out["peak_memory_mb"] = cuda_peak_memory({k: models[k] for k in MEMORY_VARIANTS}, x, device)
    else:
        path = str(tmp / f"{regime.key}_plain.pt")
        torch.save(plain, path)
        out["peak_memory_mb"] = cpu_peak_memory(__file__, path, regime, MEMORY_VARIANTS, threads)
    return out


def decomposition_times(device: torch.device, quick: bool) -> dict:
    out = {}
    for name in ("resnet50",) if quick else ("resnet50", "resnet101"):
        torch.manual_seed(0)
        model = create_backbone(name, output_stride=8).to(device)
        sync(device)
        t0 = time.perf_counter()
        apply_svf(model, SVFConfig(target_modules=["layer2", "layer3", "layer4"]))
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
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "load_average_start": load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(result: dict) -> dict:
    """check -> (value, target or None)."""
    checks = {}
    for r in result["regimes"]:
        k, s = r["regime"]["key"], r["step"]
        auto, best = s["svf_auto"]["median_s"], s["svf_per_layer_best"]["median_s"]
        checks[f"{k}: auto / per-layer best step"] = (ratio(auto, best), 1.05 if k in ("a", "c") else None)
        checks[f"{k}: auto / full fine-tune step (per-round median)"] = (
            s["svf_auto"]["ratio_median"], {"a": 0.82, "b": 1.0}.get(k))
        checks[f"{k}: auto / cost model step"] = (ratio(auto, s["svf_cost_model"]["median_s"]), None)
        per = r["per_layer_ms"]  # the same timings for every variant: load moves them together
        checks[f"{k}: auto / per-layer best, per-layer ms"] = (ratio(per["svf_auto"], per["svf_per_layer_best"]), None)
        checks[f"{k}: auto / factorized, per-layer ms"] = (ratio(per["svf_auto"], per["svf_factorized"]), None)
        if "peak_memory_mb" in r:
            m, i = r["peak_memory_mb"], r["inference"]
            checks[f"{k}: SVF auto / full fine-tune peak memory"] = (
                ratio(m["svf_auto"], m["full"]), 0.75 if k == "a" else None)
            checks[f"{k}: merged (BN folded) / plain conv+BN inference"] = (i["merged_bn_folded"]["ratio_median"], 0.95)
            checks[f"{k}: merged (BN kept) / plain inference"] = (i["merged"]["ratio_median"], 1.02)
            checks[f"{k}: max |merged (BN folded) - plain|"] = (r["max_abs_diff"]["merged_bn_folded"],
                                                               max(10 * r["one_ulp_10pct_diff"], 1e-4))
    if "resnet101" in result.get("decomposition_s", {}):
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
        "| regime | variant | step ms (median) | min-max ms | x full (per-round median, min-max) | per-layer ms "
        "| layers reparam / factorized | peak step MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["regimes"]:
        k, s = r["regime"]["key"], r["step"]
        for v in VARIANTS:
            st, mem = s[v], r.get("peak_memory_mb", {}).get(v)
            per = r["per_layer_ms"].get(v)
            counts = r["layer_forms"].get(v)
            lines.append(
                f"| ({k}) | {v} | {1e3 * st['median_s']:.1f} | {1e3 * st['min_s']:.0f}-{1e3 * st['max_s']:.0f} | "
                f"{st['ratio_median']:.3f} ({st['ratio_min']:.2f}-{st['ratio_max']:.2f}) | "
                f"{'' if per is None else f'{per:.1f}'} | "
                f"{'' if counts is None else str(counts['reparam']) + ' / ' + str(counts['factorized'])} | "
                f"{'' if mem is None else f'{mem:.0f}'} |")
    if any("saved_activations_mb" in r for r in result["regimes"]):
        lines += ["", "| regime | variant | saved activations MB per layer type (parameters/buffers excluded) |",
                  "|---|---|---|"]
        for r in result["regimes"]:
            for v, per in r.get("saved_activations_mb", {}).items():
                text = ", ".join(f"{t} {mb:.0f}" for t, mb in sorted(per.items(), key=lambda kv: -kv[1]))
                lines.append(f"| ({r['regime']['key']}) | {v} | total {sum(per.values()):.0f}: {text} |")
        lines += ["", "| regime | inference | ms (median) | x plain conv+BN (per-round median, min-max) "
                      "| max abs diff vs plain |", "|---|---|---:|---:|---:|"]
        for r in result["regimes"]:
            for v, st in r.get("inference", {}).items():
                diff = r["max_abs_diff"].get(v)
                shown = "" if diff is None else f"{diff:.2e}"
                lines.append(f"| ({r['regime']['key']}) | {v} | {1e3 * st['median_s']:.1f} | {st['ratio_median']:.3f} "
                             f"({st['ratio_min']:.2f}-{st['ratio_max']:.2f}) | {shown} |")
        for r in result["regimes"]:
            if "fp32_noise_floor" in r:
                lines.append(
                    f"\n({r['regime']['key']}) float32 noise floor (plain fp32 vs fp64) {r['fp32_noise_floor']:.2e}; "
                    f"1 ulp on 10% of the weights moves the output {r['one_ulp_10pct_diff']:.2e}; max abs output "
                    f"{r['output_abs_max']:.3g}.")
    if result.get("decomposition_s"):
        lines += ["", "| decomposition (apply_svf, layer2-4) | seconds |", "|---|---:|"]
        lines += [f"| {name} | {sec:.2f} |" for name, sec in result["decomposition_s"].items()]
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
    parser.add_argument("--regimes", default="a,b,c", help="comma list of regimes to run")
    parser.add_argument("--no-extras", action="store_true",
                        help="training steps only: no memory, inference or decomposition measurements")
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
                result["regimes"].append(run_regime(regime, device, reps, Path(tmp), args.threads, infer_reps,
                                                    not args.no_extras))
    if not args.no_extras:
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
