"""CPU thread count vs training speed when several jobs share the machine (the advice behind `--threads`).

PFENet + EfficientNet-Lite0 (SVF on its stages, random weights), 1-shot, batch 4 at 160 px: the
demo's model. For each number of concurrent jobs (1, and the core count), every job is a
subprocess training with T intra-op threads (1, and the core count = torch's default); all jobs
of a setting run at once and each reports its steps/s. Printed: steps/s per job and the ratio
of one thread to the default, side by side.

    python benchmarks/bench_threads.py [--steps 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from svfseg.models import create_model
torch.manual_seed(0)
m = create_model("pfenet", backbone="efficientnet_lite0", regime="svf")
m.train()
opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
g = torch.Generator().manual_seed(0)
q, s = torch.randn(4, 3, 160, 160, generator=g), torch.randn(4, 1, 3, 160, 160, generator=g)
k, t = torch.randint(0, 2, (4, 1, 160, 160), generator=g), torch.randint(0, 2, (4, 160, 160), generator=g)
def step():
    opt.zero_grad(set_to_none=True)
    out = m(q, s, k)
    logits = out.logits if hasattr(out, "logits") else out
    torch.nn.functional.cross_entropy(logits, t).backward()
    opt.step()
for _ in range(2):
    step()
n = int(sys.argv[2]); t0 = time.perf_counter()
for _ in range(n):
    step()
print(n / (time.perf_counter() - t0))
"""


def run_setting(threads: int, jobs: int, steps: int) -> list[float]:
    """Start ``jobs`` trainers at once with ``threads`` threads each; their steps/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(steps)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a benchmark job failed: {out}")
    return [float(o.strip().splitlines()[-1]) for o in out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", type=str)
    ap.add_argument("--quick", action="store_true", help="4 steps")
    ap.add_argument("--device", default="cpu", help="ignored: this benchmark is about CPU threads")
    args = ap.parse_args(argv)
    steps = 4 if args.quick else args.steps
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for jobs in sorted({1, cores}):
        res = {t: run_setting(t, jobs, steps) for t in sorted({1, cores})}
        mean = {t: sum(v) / len(v) for t, v in res.items()}
        rows.append({"jobs": jobs, "steps_per_s": {str(t): v for t, v in res.items()},
                     "ratio_1_thread_vs_default": mean[1] / mean[cores]})
    print(f"{platform.node()}: {cores} cores, load average {load:.2f} at the start, {steps} steps per job")
    print(f"| jobs at once | 1 thread (steps/s per job) | {cores} threads (default) | ratio 1 / default |")
    print("|---|---|---|---|")
    for r in rows:
        one, dflt = r["steps_per_s"]["1"], r["steps_per_s"][str(cores)]
        print(f"| {r['jobs']} | {', '.join(f'{v:.2f}' for v in one)} | {', '.join(f'{v:.2f}' for v in dflt)} "
              f"| {r['ratio_1_thread_vs_default']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "load_start": load, "steps": steps, "rows": rows,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
