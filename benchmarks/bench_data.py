"""Data-loader throughput: training episodes/s through the full transform chain, and class-index build time.

Training episodes come from a synthetic-5i set generated at 473 px (the Pascal crop), so every
image goes through RandScale, RandRotate, GaussianBlur, HFlip and the 473 crop at full size;
DataLoader with 0 and 2 workers, batch 4 (collate_episodes). Class-index build time is measured on
the default synthetic set (2,000 + 500 images at 160 px) and on the 473-px set, scanning without
the cache, serial and with 2 processes, plus the cached load.

Target: >= 50 training episodes/s at 473 px with 2 workers on 2 cores.

``--probe`` adds a learnability check of synthetic-5i: a training-free 1-shot predictor (cosine
similarity of query features to the support's masked-average prototype, best threshold) with
frozen ImageNet EfficientNet-Lite0 features (layer2 + layer3) versus the same predictor on
pooled RGB. Features well above colour means the benchmark rewards features; well below 100%
leaves room for meta-training.

    python benchmarks/bench_data.py [--quick] [--probe] [--json out.json] [--work DIR]
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


def prototype_probe(root: Path, fold: int, n: int = 100) -> dict[str, float]:
    """mIoU of the training-free 1-shot prototype predictor, ImageNet features vs RGB (best threshold)."""
    import numpy as np
    import torch.nn.functional as F

    from svfseg.models.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0", weights="imagenet").eval()
    ds = build_dataset(root=root, benchmark="synthetic", fold=fold, split="val", shot=1, test_size=320, num_episodes=n)
    ths = np.linspace(0.0, 0.95, 20)
    acc = {k: np.zeros((len(ths), 21, 2)) for k in ("imagenet features", "rgb")}
    for i in range(0, n, 10):
        b = collate_episodes([ds[j] for j in range(i, min(i + 10, n))])
        with torch.no_grad():
            fq = bb.forward_stages(b["query_img"], stages=("layer2", "layer3"))
            fs = bb.forward_stages(b["support_imgs"][:, 0], stages=("layer2", "layer3"))

        def cat(f):
            return torch.cat([f["layer2"], F.interpolate(f["layer3"], size=f["layer2"].shape[-2:], mode="bilinear")], 1)

        pairs = {"imagenet features": (cat(fq), cat(fs)),
                 "rgb": (F.avg_pool2d(b["query_img"], 8), F.avg_pool2d(b["support_imgs"][:, 0], 8))}
        gt = b["query_mask"].numpy()
        for kind, (q, s) in pairs.items():
            m = F.interpolate((b["support_masks"][:, 0] == 1).float()[:, None], size=s.shape[-2:], mode="bilinear")
            proto = (s * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1e-6)
            sim = F.cosine_similarity(q, proto[..., None, None], dim=1)[:, None]
            sim = F.interpolate(sim, size=gt.shape[-2:], mode="bilinear")[:, 0].numpy()
            for ti, t in enumerate(ths):
                for k in range(len(gt)):
                    valid, fg, pred = gt[k] != 255, gt[k] == 1, sim[k] > t
                    acc[kind][ti, int(b["class_id"][k]), 0] += (pred & fg & valid).sum()
                    acc[kind][ti, int(b["class_id"][k]), 1] += ((pred | fg) & valid).sum()
    out = {}
    for kind, a in acc.items():
        cls = [c for c in range(21) if a[0, c, 1] > 0]
        out[kind] = float((a[..., 0] / np.maximum(a[..., 1], 1))[:, cls].mean(1).max())
    return out


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
    ap.add_argument("--probe", action="store_true", help="add the synthetic-5i learnability probe (~1-2 min)")
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

    if args.probe:
        for fold in (0, 2):
            for kind, miou in prototype_probe(root160, fold).items():
                rows.append({"what": f"synthetic fold {fold} training-free 1-shot mIoU, {kind}",
                             "value": round(100 * miou, 1), "unit": "%"})

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
