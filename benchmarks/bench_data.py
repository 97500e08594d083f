"""Data-loader throughput: training episodes/s through the full transform chain, and class-index build time.

Training episodes come from a synthetic-5i set generated at 473 px (the Pascal crop), so every
image goes through RandScale, RandRotate, GaussianBlur, HFlip and the 473 crop at full size;
DataLoader with 0 and 2 workers, batch 4 (collate_episodes). Class-index build time is measured on
the default synthetic set (2,000 + 500 images at 160 px) and on the 473-px set, scanning without
the cache, serial and with 2 processes, plus the cached load.

Target: >= 50 training episodes/s at 473 px with 2 workers on 2 cores.

    python benchmarks/bench_data.py [--quick] [--json out.json] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from svfseg.data import build_dataset, collate_episodes, generate_synthetic, load_class_index, worker_init_fn
from svfseg.data.index import build_class_index


def episodes_per_s(ds, workers: int, n_batches: int, batch: int = 4, init: bool = True) -> float:
    """Items per second over ``n_batches`` batches after one warm-up batch (worker start-up excluded)."""
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_episodes,
                    worker_init_fn=worker_init_fn if (init and workers) else None,
                    persistent_workers=False, generator=torch.Generator().manual_seed(0), drop_last=True)
    it = iter(dl)
    next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t
    del it
    return n_batches * batch / dt


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and images")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated sets (reused)")
    ap.add_argument("--device", default="cpu", help="ignored (the loader runs on CPU)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.gettempdir()) / "svfseg_bench_data"
    n_batches = 10 if args.quick else 40
    rows: list[dict] = []

    gen160_s, root160 = timed(lambda: generate_synthetic(work / "syn160", n_train=2000, n_val=500, size=160))
    n473 = 200 if args.quick else 400
    gen473_s, root473 = timed(lambda: generate_synthetic(work / "syn473", n_train=n473, n_val=100, size=473))
    rows.append({"what": "generate synthetic 2000+500 @160 (0 if cached)", "value": round(gen160_s, 2), "unit": "s"})

    for name, root in (("160px 2000 imgs", root160), (f"473px {n473} imgs", root473)):
        for w in (1, 2):
            s, _ = timed(lambda: build_class_index(root, "train", 20, workers=w, progress=False))
            rows.append({"what": f"class index build, {name}, {w} proc", "value": round(s, 2), "unit": "s"})
        load_class_index(root, "train", 20, progress=False)
        s, _ = timed(lambda: load_class_index(root, "train", 20, progress=False))
        rows.append({"what": f"class index cached load, {name}", "value": round(s, 3), "unit": "s"})

    for shot in (1, 5):
        ds = build_dataset(root=root473, benchmark="synthetic", fold=0, split="train", shot=shot, train_crop=473)
        for workers in (0, 2):
            eps = episodes_per_s(ds, workers, n_batches if shot == 1 else max(4, n_batches // 4))
            rows.append({"what": f"train episodes/s @473, {shot}-shot, {workers} workers", "value": round(eps, 1),
                         "unit": "ep/s"})
        if shot == 1:
            eps = episodes_per_s(ds, 2, n_batches, init=False)
            rows.append({"what": "train episodes/s @473, 1-shot, 2 workers, no worker_init_fn",
                         "value": round(eps, 1), "unit": "ep/s"})
    ds = build_dataset(root=root473, benchmark="synthetic", fold=0, split="val", shot=1, test_size=473)
    rows.append({"what": "val episodes/s @473, 1-shot, 2 workers", "value": round(episodes_per_s(ds, 2, n_batches), 1),
                 "unit": "ep/s"})

    width = max(len(r["what"]) for r in rows)
    print(f"{'measurement':<{width}}  value")
    for r in rows:
        print(f"{r['what']:<{width}}  {r['value']} {r['unit']}")
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "quick": args.quick, "n_train_473": n473}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
