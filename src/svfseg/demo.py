"""`svfseg demo`: synthetic-5i end to end on the CPU, backbone frozen vs SVF, same seed and episodes.

The few-shot model is PFENet on EfficientNet-Lite0 with its ImageNet weights. PFENet rather
than the ASPP baseline because its training-free prior mask, computed from the backbone's last
stage, is exactly the part SVF can adapt while the frozen regime cannot; and its head is the
most widely used one, so the demo exercises the configuration most users will run.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


logger = logging.getLogger(__name__)

DEMO_MARKER = "demo_results.json"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (the full demo and ``--quick`` differ only here)."""

    n_train: int
    n_val: int
    image_size: int
    steps: int
    batch_size: int
    eval_episodes: int
    vis: int


FULL = DemoPlan(n_train=2000, n_val=500, image_size=160, steps=240, batch_size=8, eval_episodes=1000, vis=8)
QUICK = DemoPlan(n_train=120, n_val=60, image_size=64, steps=3, batch_size=2, eval_episodes=10, vis=2)


def recipe_path(head: str) -> Path:
    """The demo's recipe, ``configs/synthetic/<head>_efficientnet_lite0.yaml`` (shipped inside the package)."""
    path = Path(__file__).resolve().parent / "configs" / "synthetic" / f"{head}_efficientnet_lite0.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"demo recipe {path} is missing (a broken install?)")
    return path


def plan_overrides(plan: DemoPlan) -> list[str]:
    """The sizes of ``plan`` as overrides of the recipe (the FULL plan repeats the recipe's values)."""
    return [f"data.train_crop={plan.image_size}", f"data.test_size={plan.image_size}",
            f"train.steps_per_epoch={plan.steps}", f"train.batch_size={plan.batch_size}"]


def run_overrides(root: Path, out: Path, regime: str, seed: int = 0) -> list[str]:
    """What differs between the demo's runs and between machines: names, folders, regime, seed."""
    return [f"name={regime}", f"output_dir={out}", f"data.root={root}", f"seed={seed}", f"model.regime={regime}"]


def demo_config(plan: DemoPlan, root: Path, out: Path, head: str, regime: str, seed: int = 0):
    """The config of one demo run: the recipe file, then the plan's sizes, then the run's own keys."""
    from svfseg.config import load_config

    return load_config(recipe_path(head), [*plan_overrides(plan), *run_overrides(root, out, regime, seed)])


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg demo`."""
    parser.add_argument("--quick", action="store_true", help="tiny version for tests (under a minute)")
    parser.add_argument("--root", type=Path, default=None,
                        help="synthetic-5i folder (default data/synthetic-5i, or data/synthetic-5i-quick)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo[-quick])")
    parser.add_argument("--head", choices=("pfenet", "baseline"), default="pfenet", help="few-shot head")
    parser.add_argument("--steps", type=int, default=None, help="training steps per regime (default: plan)")
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs")
    return parser


def run_demo_cli(args: argparse.Namespace) -> int:
    """Entry point of `svfseg demo`."""
    plan = QUICK if args.quick else FULL
    if args.steps or args.episodes:
        plan = DemoPlan(**{**plan.__dict__, "steps": args.steps or plan.steps,
                           "eval_episodes": args.episodes or plan.eval_episodes})
    suffix = "-quick" if args.quick else ""
    root = args.root or Path(f"data/synthetic-5i{suffix}")
    out = args.out or Path(f"runs/demo{suffix}")
    run_demo(plan, root=root, out=out, head=args.head, seed=args.seed)
    return 0


def _stage(i: int, n: int, text: str) -> None:
    print(f"\n[{i}/{n}] {text}", flush=True)


def _clear_previous(out: Path) -> None:
    # Only folders this demo wrote before are removed (they hold its marker or run folders).
    if not out.exists():
        return
    if (out / DEMO_MARKER).exists() or all(p.name in ("frozen", "svf", "episodes.json") for p in out.iterdir()):
        for name in ("frozen", "svf"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / DEMO_MARKER).unlink(missing_ok=True)
        (out / "episodes.json").unlink(missing_ok=True)
    else:
        raise FileExistsError(f"{out} exists and was not written by `svfseg demo`; choose another --out")


def run_demo(plan: DemoPlan, *, root: Path, out: Path, head: str = "pfenet", seed: int = 0) -> dict:
    """Generate data, train frozen and SVF, evaluate both on the same episodes, print the table.

    Args:
        plan: sizes (FULL or QUICK).
        root: synthetic-5i folder (generated once, then reused).
        out: output folder (run folders ``frozen/`` and ``svf/``, results JSON/Markdown).
        head: "pfenet" or "baseline".
        seed: seed of both runs (same episodes, same augmentation, same head initialisation).

    Returns:
        The results dict (also in ``out/demo_results.json``).
    """
    from svfseg.data.synthetic import generate_synthetic
    from svfseg.engine.data import eval_dataset, novel_classes
    from svfseg.engine.run import train_run
    from svfseg.engine.tasks.fewshot import score_checkpoint

    t_total = time.perf_counter()
    root, out = Path(root), Path(out)
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 5
    _stage(1, n, f"synthetic-5i at {root} ({plan.n_train} train + {plan.n_val} val images, {plan.image_size} px; "
                 f"generated once, about a minute; reused afterwards)")
    t = time.perf_counter()
    generate_synthetic(root, seed=0, n_train=plan.n_train, n_val=plan.n_val, size=plan.image_size)
    t_data = time.perf_counter() - t
    cfgs = {r: demo_config(plan, root, out, head, r, seed) for r in ("frozen", "svf")}
    episodes_path = out / "episodes.json"
    eval_ds = eval_dataset(cfgs["frozen"], seed=0, count=plan.eval_episodes)
    eval_ds.episodes.save(episodes_path)
    classes = novel_classes(cfgs["frozen"])
    print(f"  {len(eval_ds)} fixed test episodes on the novel classes {list(classes)} -> {episodes_path} "
          f"(fingerprint {eval_ds.episodes.fingerprint}); recipe {recipe_path(head)}", flush=True)

    rows = {}
    for i, regime in enumerate(("frozen", "svf")):
        cfg = cfgs[regime]
        label = "backbone frozen" if regime == "frozen" else "SVF (singular values of layer2-4 + head train)"
        _stage(2 + i, n, f"meta-train {head} on EfficientNet-Lite0, {label}: {plan.steps} steps x "
                         f"{plan.batch_size} episodes")
        # The same calls as `svfseg train` and `svfseg test --episodes`.
        res = train_run(cfg, argv=["svfseg", "demo"])
        print(f"  trained in {res.seconds:.0f}s; evaluating on the {len(eval_ds)} episodes", flush=True)
        scores = score_checkpoint(res.best_checkpoint, cfg, episodes=episodes_path, save_vis=plan.vis,
                                  out_dir=res.run_dir)
        rows[regime] = _row(regime, res, scores)
        print(f"  mIoU {100 * rows[regime]['miou']:.2f}  FB-IoU {100 * rows[regime]['fb_iou']:.2f}", flush=True)

    _stage(5, n, "results")
    result = {"head": head, "backbone": "efficientnet_lite0", "fold": 0, "shot": 1, "seed": seed,
              "plan": plan.__dict__, "data_root": str(root), "episodes_file": str(episodes_path),
              "episode_fingerprint": eval_ds.episodes.fingerprint, "data_seconds": t_data,
              "rows": rows, "total_seconds": time.perf_counter() - t_total}
    table = demo_table(result)
    (out / "demo_results.md").write_text(table + "\n")
    (out / DEMO_MARKER).write_text(json.dumps(result, indent=1))
    print(table)
    print(_verdict(rows))
    print(_next_steps(out, result))
    return result


def _row(regime: str, res, scores: dict) -> dict:
    """One table row: scores, trainable parameters and what a user would ship for the run."""
    from safetensors.torch import save_file

    from svfseg.engine.model import load_for_inference

    run_dir = Path(res.run_dir)
    model, _, _ = load_for_inference(res.best_checkpoint)
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    trained_file = run_dir / "trained_params.safetensors"
    save_file(trained, str(trained_file))
    s_file = None
    if regime == "svf":
        from svfseg.svf import save_svf

        s_file = run_dir / "singular_values.safetensors"
        save_svf(s_file, model.backbone, metadata={"source": "svfseg demo"})
    run = scores["runs"][0]
    return {"miou": run["miou"], "fb_iou": run["fb_iou"], "per_class": run["per_class"], "episodes": run["episodes"],
            "trainable_params": sum(t.numel() for t in trained.values()),
            "s_checkpoint": str(s_file) if s_file else None,
            "s_checkpoint_bytes": s_file.stat().st_size if s_file else None,
            "trained_params_bytes": trained_file.stat().st_size, "train_seconds": res.seconds,
            "eval_seconds": run["seconds"], "vis_dir": str(run_dir / "vis"), "run_dir": str(run_dir)}


def _size(n: Optional[int]) -> str:
    if n is None:
        return "–"
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def demo_table(result: dict) -> str:
    """Markdown table of the demo's two runs."""
    head = ("| backbone regime | mIoU (%) | FB-IoU (%) | trainable params | S-checkpoint | head+S weights "
            "| train time | eval time |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for regime, r in result["rows"].items():
        name = "frozen" if regime == "frozen" else "SVF"
        lines.append(f"| {name} | {100 * r['miou']:.2f} | {100 * r['fb_iou']:.2f} | {r['trainable_params']:,} "
                     f"| {_size(r['s_checkpoint_bytes'])} | {_size(r['trained_params_bytes'])} "
                     f"| {r['train_seconds']:.0f} s | {r['eval_seconds']:.0f} s |")
    p = result["plan"]
    lines.append(f"\n{result['head']} on EfficientNet-Lite0 (ImageNet), synthetic-5i fold 0, 1-shot, "
                 f"{p['steps']} steps x {p['batch_size']} episodes per regime, same seed; both scored on the same "
                 f"{result['rows']['svf']['episodes']} episodes (fingerprint {result['episode_fingerprint']}). "
                 f"Total wall time {result['total_seconds']:.0f} s.")
    return "\n".join(lines)


def _verdict(rows: dict) -> str:
    d = 100 * (rows["svf"]["miou"] - rows["frozen"]["miou"])
    if math.isnan(d):
        return "\nNo comparison: a score is undefined."
    if d > 0:
        return (f"\nSVF scores {d:.2f} mIoU points above the frozen backbone on these episodes, from one "
                f"training seed: rerun with other --seed values before reading much into a small gap.")
    return (f"\nSVF does NOT beat the frozen backbone here ({d:+.2f} mIoU points). This short CPU run is a "
            f"smoke test of the pipeline, not a reproduction of the paper; see README.")


def _next_steps(out: Path, result: dict) -> str:
    vis = ", ".join(r["vis_dir"] for r in result["rows"].values())
    return f"""
Outputs: {out / DEMO_MARKER} and {out / 'demo_results.md'}; overlays in {vis};
training curves in {out}/frozen/curves.png and {out}/svf/curves.png.

Next, on real data (GPU recommended):
  svfseg prepare pascal --voc VOCdevkit/VOC2012 --sbd SBD --out data/pascal
  svfseg train --config configs/pascal/pfenet_resnet50.yaml fold=0 model.weights=pretrained/resnet50_v2.pth
  svfseg test --checkpoint runs/pascal_pfenet_resnet50_deep_svf_fold0_1shot/best.pt --protocol bam
  (the same with model.regime=frozen for the frozen baseline; COCO: svfseg prepare coco --coco COCO2014 --out
  data/coco and configs/coco/; several GPUs: torchrun --nproc_per_node 4 -m svfseg train ...)
  svfseg report runs/*
"""
