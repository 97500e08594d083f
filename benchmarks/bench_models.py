"""Few-shot model costs: training step time / peak memory per backbone regime, eval throughput.

PFENet + ResNet-50 deep stem (output stride 8), 1 x 3 x 473 x 473, 1-shot, random weights.
BAM rows are opt-in (``--models pfenet,bam``): each BAM row costs about 1.2-1.7x a PFENet row
on CPU, so by default the full run stays PFENet only. BAM gets the Pascal fold-0 base classes
(random 16-way base learner) and the episode's class id in training.

Two kinds of measurement:
- isolated rows: each configuration in its own subprocess (clean peak memory: RSS on CPU,
  max allocated on CUDA), rounds interleaved so machine load hits all configurations alike;
- paired groups: the configurations being compared live in ONE subprocess and take turns
  step by step (order flipped every round), so the ratios (the targets) do not depend on
  load drifting between subprocesses. Ratios are medians of per-round ratios.

Targets: SVF training step <= 1.0x the full fine-tune step; merged-SVF eval within 3% of
frozen-backbone eval.

    python benchmarks/bench_models.py [--quick] [--device cpu|cuda] [--json out.json] [--threads N]
    python benchmarks/bench_models.py --models pfenet,bam   # add the BAM rows (opt-in)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    model: str
    task: str  # "train" | "eval"
    backbone_mode: str  # "frozen" | "svf" | "train"
    merged: bool = False
    batch_backbone: bool = True
    replicate: int = 0  # a second copy of a configuration shows the measurement noise

    @property
    def label(self) -> str:
        mode = "svf-merged" if self.merged else self.backbone_mode
        extra = "" if self.batch_backbone else " (separate q/s passes)"
        extra += f" (replicate {self.replicate})" if self.replicate else ""
        return f"{self.model} {self.task} {mode}{extra}"


def default_rows(model: str) -> list[Row]:
    """Isolated rows measured for one model name (add models with --models)."""
    return [Row(model, "train", mode) for mode in ("frozen", "svf", "train")] + [
        Row(model, "eval", "frozen"),
        Row(model, "eval", "frozen", batch_backbone=False),
        Row(model, "eval", "svf"),
        Row(model, "eval", "svf", merged=True),
    ]


def default_pairs(model: str) -> dict[str, list[Row]]:
    """Groups timed turn by turn in one process; the first row of a group is the reference."""
    return {
        f"{model} train": [Row(model, "train", "train"), Row(model, "train", "svf"), Row(model, "train", "frozen")],
        f"{model} eval": [
            Row(model, "eval", "frozen"),
            Row(model, "eval", "svf", merged=True),
            Row(model, "eval", "svf"),
            Row(model, "eval", "frozen", batch_backbone=False),
            Row(model, "eval", "frozen", replicate=1),
        ],
    }


# -- worker (runs in a subprocess) -------------------------------------------------------------
def _peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _loss(out, target):
    import torch.nn.functional as F

    loss = F.cross_entropy(out.logits, target, ignore_index=255)
    if out.aux_logits:
        loss = loss + sum(F.cross_entropy(a, target, ignore_index=255) for a in out.aux_logits) / len(out.aux_logits)
    return loss


def _make_step(row: Row, spec: dict):
    """Build the model of ``row``; return (one-iteration callable, trainable parameter count)."""
    import torch

    from svfseg.models import create_model, export_merged

    device, size = spec["device"], spec["size"]
    torch.manual_seed(0)
    # BAM needs its base classes (Pascal fold 0: 15 -> a 16-way base learner, random weights here).
    extra = {"base_classes": tuple(range(6, 21))} if row.model == "bam" else {}
    model = create_model(
        row.model, backbone="resnet50_deep", regime={"train": "full"}.get(row.backbone_mode, row.backbone_mode),
        batch_backbone=row.batch_backbone,
        **extra,
    )
    if row.merged:
        model = export_merged(model, inplace=True)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 3, size, size, generator=gen).to(device)
    supports = torch.randn(1, 1, 3, size, size, generator=gen).to(device)
    masks = torch.randint(0, 2, (1, 1, size, size), generator=gen).to(device)
    target = torch.randint(0, 2, (1, size, size), generator=gen).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Models that leave the episode's class out of something in training (BAM) get its id.
    kw = {"class_ids": torch.tensor([6], device=device)} if getattr(model, "uses_class_ids", False) else {}

    if row.task == "train":
        model.train()
        groups = [{"params": g["params"], "lr": 1e-3 * g["lr_mult"]} for g in model.parameter_groups()]
        opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            _loss(model(query, supports, masks, **kw), target).backward()
            opt.step()
    else:
        model.eval()

        def run():
            with torch.no_grad():
                model(query, supports, masks)

    def step() -> tuple[float, float]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - c

    return step, trainable


def worker(spec: dict) -> dict:
    """Build the given rows, warm each up once, then time ``steps`` turns of each."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rows = [Row(**r) for r in spec["rows"]]
    steps, trainable = [], []
    for row in rows:
        step, n = _make_step(row, spec)
        step()  # warm-up: allocator, oneDNN primitives, SVD weight caches
        steps.append(step)
        trainable.append(n)
    wall: list[list[float]] = [[] for _ in rows]
    cpu: list[list[float]] = [[] for _ in rows]
    for rnd in range(spec["steps"]):
        order = range(len(rows)) if rnd % 2 == 0 else reversed(range(len(rows)))
        for i in order:
            w, c = steps[i]()
            wall[i].append(w)
            cpu[i].append(c)
    return {
        "rows": [asdict(r) for r in rows],
        "wall_s": wall,
        "cpu_s": cpu,
        "trainable_params": trainable,
        "peak_mb": _peak_memory_mb(spec["device"]),
        "threads": torch.get_num_threads(),
    }


# -- parent ------------------------------------------------------------------------------------
def run_worker(rows: list[Row], steps: int, args) -> dict:
    spec = {
        "rows": [asdict(r) for r in rows],
        "device": args.device,
        "size": args.size,
        "steps": steps,
        "threads": args.threads,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {[r.label for r in rows]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def primary_metric(device: str) -> str:
    """CPU time on a CPU device (robust to time-slicing on a shared machine), else wall time."""
    return "cpu_s" if device == "cpu" else "wall_s"


def summarise_rows(results: dict[Row, list[dict]], metric: str) -> list[dict]:
    out = []
    for row, runs in results.items():
        times = [t for r in runs for t in r[metric][0]]
        wall = [t for r in runs for t in r["wall_s"][0]]
        med = statistics.median(times)
        out.append(
            {
                **asdict(row),
                "label": row.label,
                "metric": metric,
                "median_s": med,
                "min_s": min(times),
                "wall_median_s": statistics.median(wall),
                "per_s": 1.0 / med,
                "peak_mb": max(r["peak_mb"] for r in runs),
                "trainable_params": runs[0]["trainable_params"][0],
                "samples": len(times),
            }
        )
    return out


def summarise_pair(name: str, result: dict, metric: str) -> dict:
    rows = [Row(**r) for r in result["rows"]]
    ref, ref_wall = result[metric][0], result["wall_s"][0]
    out = {"group": name, "reference": rows[0].label, "metric": metric, "rows": []}
    for row, times, wall in zip(rows, result[metric], result["wall_s"]):
        out["rows"].append(
            {
                "label": row.label,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "ratio_to_reference": statistics.median([t / r for t, r in zip(times, ref)]),
                "wall_ratio_to_reference": statistics.median([t / r for t, r in zip(wall, ref_wall)]),
            }
        )
    return out


def targets(pairs: list[dict]) -> dict[str, dict]:
    """The two stated targets, read from the paired groups."""
    found = {}
    for group in pairs:
        by = {r["label"]: r for r in group["rows"]}
        model = group["group"].split()[0]
        svf = by.get(f"{model} train svf")
        if svf and group["reference"] == f"{model} train train":
            ratio = svf["ratio_to_reference"]
            found[f"{model}: svf step / full fine-tune step"] = {
                "value": ratio,
                "target": "<= 1.0",
                "met": ratio <= 1.0,
            }
        merged = by.get(f"{model} eval svf-merged")
        if merged and group["reference"] == f"{model} eval frozen":
            ratio = merged["ratio_to_reference"]
            found[f"{model}: merged eval / frozen eval"] = {
                "value": ratio,
                "target": "within 3%",
                "met": abs(ratio - 1.0) <= 0.03,
            }
        replicate = by.get(f"{model} eval frozen (replicate 1)")
        if replicate and group["reference"] == f"{model} eval frozen":
            found[f"{model}: frozen eval replicate / frozen eval (noise floor)"] = {
                "value": replicate["ratio_to_reference"],
                "target": "1.0 up to noise",
                "met": None,
            }
    return found


def machine_info(args) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": args.device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    info["threads"] = args.threads or torch.get_num_threads()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 1-2 timed steps, 257 px input")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--models",
        default="pfenet",
        help="comma-separated registered model names (default pfenet; BAM rows are opt-in: pfenet,bam)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of isolated rows")
    parser.add_argument("--steps", type=int, default=2, help="timed iterations per isolated subprocess")
    parser.add_argument("--pair-steps", type=int, default=6, help="timed turns per configuration in paired groups")
    parser.add_argument("--size", type=int, default=473, help="input side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)")
    parser.add_argument("--pairs-only", action="store_true", help="skip the isolated rows")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.rounds, args.steps, args.pair_steps, args.size = 1, 1, 2, 257
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    metric = primary_metric(args.device)

    rows = [row for m in models for row in default_rows(m)]
    results: dict[Row, list[dict]] = {row: [] for row in rows}
    for rnd in range(0 if args.pairs_only else args.rounds):
        for row in rows:
            r = run_worker([row], args.steps, args)
            results[row].append(r)
            print(
                f"round {rnd + 1}/{args.rounds} {row.label:<45} "
                f"{statistics.median(r[metric][0]) * 1e3:9.0f} ms ({metric})  peak {r['peak_mb']:7.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    table = summarise_rows({k: v for k, v in results.items() if v}, metric)
    pairs = []
    for m in models:
        for name, group in default_pairs(m).items():
            pairs.append(summarise_pair(name, run_worker(group, args.pair_steps, args), metric))
            print(f"paired group {name} done", file=sys.stderr, flush=True)
    found = targets(pairs)
    machine = machine_info(args)

    what = "CPU time per step (process_time)" if metric == "cpu_s" else "wall time per step"
    isolated = "skipped" if args.pairs_only else f"{args.rounds} round(s) x {args.steps} step(s)"
    print(
        f"\nFew-shot models, ResNet-50 deep stem OS8, 1 x 3 x {args.size}^2, 1-shot, {args.device}, "
        f"{machine['threads']} thread(s); {what}; isolated: {isolated}"
    )
    if table:
        print(
            f"{'configuration (isolated subprocess)':<47}{'median ms':>11}{'min ms':>9}{'wall ms':>9}{'per s':>8}"
            f"{'peak MB':>9}{'trainable':>12}"
        )
    for r in table:
        print(
            f"{r['label']:<47}{r['median_s'] * 1e3:11.0f}{r['min_s'] * 1e3:9.0f}{r['wall_median_s'] * 1e3:9.0f}"
            f"{r['per_s']:8.2f}{r['peak_mb']:9.0f}{r['trainable_params']:12,d}"
        )
    for group in pairs:
        print(f"\npaired ({args.pair_steps} turns each, one process): {group['group']}, reference {group['reference']}")
        print(f"{'configuration':<47}{'median ms':>11}{'min ms':>9}{'ratio':>8}{'wall ratio':>11}")
        for r in group["rows"]:
            print(
                f"{r['label']:<47}{r['median_s'] * 1e3:11.0f}{r['min_s'] * 1e3:9.0f}"
                f"{r['ratio_to_reference']:8.3f}{r['wall_ratio_to_reference']:11.3f}"
            )
    print()
    for k, v in found.items():
        verdict = "" if v["met"] is None else ": met" if v["met"] else ": NOT met"
        print(f"{k}: {v['value']:.3f} (target {v['target']}{verdict})")
    if args.json:
        with open(args.json, "w") as f:
            summary = {"machine": machine, "args": vars(args), "rows": table, "pairs": pairs, "targets": found}
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
