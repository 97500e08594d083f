"""Few-shot model costs: training step time / peak memory per backbone regime, eval throughput.

PFENet + ResNet-50 deep stem (output stride 8), 1 x 3 x 473 x 473, 1-shot, random weights.
Every measurement runs in its own subprocess (clean peak memory); configurations are
interleaved round by round so load on a shared machine hits them alike; medians reported.

Targets: SVF training step <= 1.0x the full fine-tune step; merged-SVF eval within 3% of
frozen-backbone eval.

    python benchmarks/bench_models.py [--quick] [--device cpu|cuda] [--json out.json]
    python benchmarks/bench_models.py --models pfenet,bam   # rows for more registered models
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

    @property
    def label(self) -> str:
        mode = "svf-merged" if self.merged else self.backbone_mode
        extra = "" if self.batch_backbone else " (separate q/s passes)"
        return f"{self.model} {self.task} {mode}{extra}"


def default_rows(models: list[str]) -> list[Row]:
    """Rows measured for each model name (add models with --models)."""
    rows = []
    for m in models:
        rows += [Row(m, "train", mode) for mode in ("frozen", "svf", "train")]
        rows += [
            Row(m, "eval", "frozen"),
            Row(m, "eval", "frozen", batch_backbone=False),
            Row(m, "eval", "svf"),
            Row(m, "eval", "svf", merged=True),
        ]
    return rows


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


def worker(spec: dict) -> dict:
    """Build one model, time ``steps`` iterations after one warm-up, return the figures."""
    import torch

    from svfseg.models import create_model, export_merged

    row = Row(**spec["row"])
    device, size, steps = spec["device"], spec["size"], spec["steps"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = create_model(
        row.model, backbone="resnet50_deep", backbone_mode=row.backbone_mode, batch_backbone=row.batch_backbone
    )
    if row.merged:
        model = export_merged(model, inplace=True)
    model.to(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 3, size, size, generator=gen).to(device)
    supports = torch.randn(1, 1, 3, size, size, generator=gen).to(device)
    masks = torch.randint(0, 2, (1, 1, size, size), generator=gen).to(device)
    target = torch.randint(0, 2, (1, size, size), generator=gen).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if row.task == "train":
        model.train()
        groups = [{"params": g["params"], "lr": 1e-3 * g["lr_mult"]} for g in model.parameter_groups()]
        opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            _loss(model(query, supports, masks), target).backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(query, supports, masks)

    times = []
    for i in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i > 0:  # first iteration is warm-up (allocator, weight caches)
            times.append(time.perf_counter() - t)
    return {
        "row": asdict(row),
        "times_s": times,
        "peak_mb": _peak_memory_mb(device),
        "build_s": build_s,
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
    }


# -- parent ------------------------------------------------------------------------------------
def run_row(row: Row, args) -> dict:
    spec = {"row": asdict(row), "device": args.device, "size": args.size, "steps": args.steps}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {row.label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict[Row, list[dict]]) -> list[dict]:
    out = []
    for row, runs in results.items():
        times = [t for r in runs for t in r["times_s"]]
        med = statistics.median(times)
        out.append(
            {
                **asdict(row),
                "label": row.label,
                "median_s": med,
                "min_s": min(times),
                "per_s": 1.0 / med,
                "peak_mb": max(r["peak_mb"] for r in runs),
                "trainable_params": runs[0]["trainable_params"],
                "samples": len(times),
            }
        )
    return out


def ratios(rows: list[dict]) -> dict[str, float]:
    by = {(r["model"], r["task"], r["backbone_mode"], r["merged"], r["batch_backbone"]): r for r in rows}
    found = {}
    for model in sorted({r["model"] for r in rows}):
        svf, full = by.get((model, "train", "svf", False, True)), by.get((model, "train", "train", False, True))
        if svf and full:
            found[f"{model}: svf step / full fine-tune step (target <= 1.0)"] = svf["median_s"] / full["median_s"]
        merged, frozen = by.get((model, "eval", "svf", True, True)), by.get((model, "eval", "frozen", False, True))
        if merged and frozen:
            found[f"{model}: merged eval time / frozen eval time (target within 3%)"] = (
                merged["median_s"] / frozen["median_s"]
            )
        unmerged = by.get((model, "eval", "svf", False, True))
        if unmerged and frozen:
            found[f"{model}: unmerged svf eval time / frozen eval time"] = unmerged["median_s"] / frozen["median_s"]
        separate = by.get((model, "eval", "frozen", False, False))
        if separate and frozen:
            found[f"{model}: batched q+s backbone eval time / separate passes"] = (
                frozen["median_s"] / separate["median_s"]
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 timed step each, 257 px input")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--models", default="pfenet", help="comma-separated registered model names")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one subprocess per row each)")
    parser.add_argument("--steps", type=int, default=2, help="timed iterations per subprocess (after 1 warm-up)")
    parser.add_argument("--size", type=int, default=473, help="input side in pixels")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.rounds, args.steps, args.size = 1, 1, 257
    rows = default_rows([m.strip() for m in args.models.split(",") if m.strip()])
    results: dict[Row, list[dict]] = {row: [] for row in rows}
    for rnd in range(args.rounds):
        for row in rows:
            results[row].append(run_row(row, args))
            r = results[row][-1]
            print(
                f"round {rnd + 1}/{args.rounds} {row.label:<45} "
                f"{statistics.median(r['times_s']) * 1e3:9.0f} ms  peak {r['peak_mb']:7.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    table = summarise(results)
    found = ratios(table)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": args.device,
    }
    try:
        import torch

        machine["torch"] = torch.__version__
        machine["threads"] = torch.get_num_threads()
        if args.device.startswith("cuda"):
            machine["gpu"] = torch.cuda.get_device_name(args.device)
    except Exception:  # noqa: BLE001 - the table is still useful without these fields
        pass
    print(f"\nPFENet-style few-shot models, ResNet-50 deep stem OS8, 1 x 3 x {args.size}^2, 1-shot, {args.device}")
    print(f"{'configuration':<47}{'median ms':>11}{'min ms':>9}{'per s':>8}{'peak MB':>9}{'trainable':>12}")
    for r in table:
        print(
            f"{r['label']:<47}{r['median_s'] * 1e3:11.0f}{r['min_s'] * 1e3:9.0f}{r['per_s']:8.2f}"
            f"{r['peak_mb']:9.0f}{r['trainable_params']:12,d}"
        )
    for k, v in found.items():
        print(f"{k}: {v:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": table, "ratios": found}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
