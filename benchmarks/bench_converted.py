"""CPU time of `svfseg test` on a converted published model: seconds per episode at 473 px, extrapolated to 1,000.

No published file is needed: a stand-in upstream checkpoint with the published files' names, shapes and
dtypes is made from the manifests in tests/fixtures/upstream/ (random weights), converted with
`svfseg convert`, and scored as `svfseg test --protocol pfenet` scores it (the recipe's geometry:
upstream padding to a 473 px square, batch 1, the recipe's channels_last) on a Pascal-layout root of
500 x 375 px images (Pascal's usual size). A few episodes are timed after one warm-up episode and the
time per episode is multiplied by 1,000: an extrapolation, not a 1,000-episode run. The data loading
(JPEG decode, resize, padding) is inside the timed loop, as in `svfseg test`.

    python benchmarks/bench_converted.py --episodes 4 --threads 1
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "upstream"
#: label -> (format, manifest): the published models' architectures.
MODELS = {"PFENet ResNet-50": ("pfenet", "pfenet_resnet50_deep"), "PFENet VGG16-BN": ("pfenet", "pfenet_vgg16_bn"),
          "BAM ResNet-50": ("bam", "bam_resnet50_deep_pascal_1shot")}


def pascal_root(root: Path, n: int = 10) -> Path:
    """Val images of 500 x 375 px, image k holding one 150 px square of class (k % 5) + 1 (fold 0's novel)."""
    from svfseg.data.io import write_label

    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for k in range(n):
        name = f"bench_{k:03d}"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = np.zeros((375, 500), np.uint8)
        label[100:250, 150:300] = k % 5 + 1
        write_label(root / "SegmentationClassAug" / f"{name}.png", label)
        lines.append(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n")
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def converted(fmt: str, manifest: str, tmp: Path) -> Path:
    """A stand-in upstream file of ``manifest``'s shapes (runnable BN statistics), converted."""
    from svfseg.convert import FORMATS, Manifest, convert_checkpoint

    up = Manifest.load(FIXTURES / f"{manifest}.json").fake_state(seed=0, keymap=FORMATS[fmt])
    up = {k: v.abs() + 1 if k.endswith("running_var") else v * 0.05 if k.endswith("weight") and v.dim() == 4 else v
          for k, v in up.items()}
    src = tmp / f"{manifest}.pth"
    torch.save({"state_dict": up}, src)
    return convert_checkpoint(src, fmt, tmp / f"{manifest}.pt").out


def time_per_episode(checkpoint: Path, root: Path, episodes: int) -> float:
    from svfseg.engine.data import eval_dataset
    from svfseg.engine.model import checkpoint_config, load_for_inference_run
    from svfseg.engine.resolved import resolve_run
    from svfseg.config import config_with_overrides, to_dict
    from svfseg.engine.tasks.fewshot import evaluate

    cfg = config_with_overrides(to_dict(checkpoint_config(checkpoint)), [f"data.root={root}", "data.workers=0"])
    model, run, _ = load_for_inference_run(checkpoint, resolve_run(cfg))
    cfg = run.cfg
    ds = eval_dataset(run, seed=321, count=episodes + 1)
    novel = tuple(run.bench.split(cfg.fold).novel)
    kw = dict(class_ids=novel, device=torch.device("cpu"), batch_size=1, upstream_padding=cfg.eval.upstream_padding)
    evaluate(model, torch.utils.data.Subset(ds, [0]), **kw)  # warm-up: oneDNN picks its kernels
    timed = torch.utils.data.Subset(ds, list(range(1, episodes + 1)))
    t = time.perf_counter()
    evaluate(model, timed, **kw)
    return (time.perf_counter() - t) / episodes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=4, help="timed episodes per model (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU {torch.backends.cpu.get_cpu_capability()},"
          f" load average {os.getloadavg()[0]:.2f}; {args.episodes} timed episodes per model, 473 px, 1-shot\n")
    print("| model | s / episode | 1,000 episodes (extrapolated) |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = pascal_root(tmp / "pascal")
        for label in args.models.split(","):
            fmt, manifest = MODELS[label]
            s = time_per_episode(converted(fmt, manifest, tmp), root, args.episodes)
            print(f"| {label} | {s:.2f} | {s * 1000 / 60:.0f} min |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
