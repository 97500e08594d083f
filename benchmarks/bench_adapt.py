"""Test-time adaptation speed: seconds per episode of each ``adapt.params`` beside the plain test, 1- and 5-shot.

The model is the demo's (PFENet on EfficientNet-Lite0, synthetic-5i, 112 px): ``--checkpoint``
(default ``runs/demo/svf/best.pt`` when `make demo` has run, else the demo recipe's model with a
random head: speed only). Every setup adapts for ``--steps`` optimiser steps at a fixed lr on the
same episodes and predicts the query, as ``svfseg test --adapt P --adapt-steps N --adapt-lr LR``
does (no choice on validation here); "plain" is `svfseg test`'s scoring (batches of 8). ``svf`` is
timed one episode at a time and with ``adapt.parallel`` episodes per batched pass.

Setups run in interleaved rounds (round r times every setup once), so each ratio is the median of
per-round ratios measured side by side; the one-off preparation of the working copy (an SVD of the
stages for ``svf`` on a model trained otherwise; LoRA adapters) is reported apart.

    python benchmarks/bench_adapt.py            # ~10 min on 2 idle cores
    python benchmarks/bench_adapt.py --quick    # 64 px, 4 episodes, 1 round
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "svfseg" / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
DEMO_CHECKPOINT = ROOT / "runs" / "demo" / "svf" / "best.pt"
#: (label, adapt.params, adapt.parallel)
SETUPS = (("svf (one at a time)", "svf", 1), ("svf", "svf", 4), ("svf (8 per pass)", "svf", 8), ("bn", "bn", 1),
          ("bitfit", "bitfit", 1), ("lora", "lora", 1), ("head", "head", 1), ("full", "full", 1))


def load(checkpoint: Path | None, root: Path, size: int, shot: int):
    """(model, cfg, resolved run) of the checkpoint, or of the demo recipe with a random head."""
    from svfseg.config import config_with_overrides, load_config, to_dict
    from svfseg.engine.model import build_model, checkpoint_config, load_for_inference_run
    from svfseg.engine.resolved import resolve_run

    overrides = [f"data.root={root}", f"data.test_size={size}", f"data.train_crop={size}", f"shot={shot}",
                 "train.progress=false"]
    if checkpoint is not None:
        cfg = config_with_overrides(to_dict(checkpoint_config(checkpoint)), overrides, str(checkpoint))
        model, resolved, _ = load_for_inference_run(checkpoint, resolve_run(cfg))
        return model.eval(), resolved.cfg, resolved
    cfg = load_config(str(RECIPE), overrides)
    torch.manual_seed(0)
    resolved = resolve_run(cfg)
    model = build_model(resolved).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, resolved


def run(args) -> dict:
    from svfseg.data.synthetic import generate_synthetic
    from svfseg.engine.adapt import EpisodeAdapter, adapted_evaluation
    from svfseg.engine.data import eval_dataset
    from svfseg.engine.distributed import DistInfo
    from svfseg.engine.tasks.fewshot import evaluate
    from svfseg.policies import AdaptSettings

    checkpoint = args.checkpoint if args.checkpoint else (DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; model {checkpoint or 'demo recipe, random head'}; "
          f"{args.size} px, {args.episodes} episodes, {args.steps} steps at lr {args.lr:g}, {args.rounds} rounds",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(Path(tmp) / "syn", seed=0, n_train=40, n_val=120, size=args.size)
        for shot in args.shots:
            model, cfg, resolved = load(checkpoint, root, args.size, shot)
            ds = eval_dataset(resolved, seed=0, count=args.episodes)
            classes = resolved.bench.split(cfg.fold).novel
            adapters, prepare = {}, {}
            for label, params, parallel in SETUPS:
                t = time.perf_counter()
                settings = AdaptSettings(params=params, steps=args.steps, lr=args.lr, parallel=parallel)
                adapters[label] = EpisodeAdapter(model, settings, policy=model.svf_policy or cfg.svf,
                                                 lora=model.lora or cfg.lora)
                prepare[label] = time.perf_counter() - t
            times: dict[str, list[float]] = {"plain": [], **{label: [] for label, _, _ in SETUPS}}
            for r in range(args.rounds + 1):  # round 0 warms oneDNN's kernels and the caches up
                t = time.perf_counter()
                evaluate(model, ds, class_ids=classes, device=torch.device("cpu"), batch_size=cfg.eval.batch_size)
                plain = (time.perf_counter() - t) / len(ds)
                if r:
                    times["plain"].append(plain)
                for label, _, _ in SETUPS:
                    res = adapted_evaluation(adapters[label], ds, class_ids=classes, counts=[args.steps], lr=args.lr,
                                             seed=0, info=DistInfo())[args.steps]
                    if r:
                        times[label].append(res["seconds_per_episode"])
            results[f"{shot}-shot"] = summarize(times, prepare, {k: a.trainable_count for k, a in adapters.items()})
            print_table(shot, results[f"{shot}-shot"])
    return {"size": args.size, "episodes": args.episodes, "steps": args.steps, "lr": args.lr, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "checkpoint": str(checkpoint) if checkpoint else None,
            "results": results}


def summarize(times: dict[str, list[float]], prepare: dict[str, float], trainable: dict[str, int]) -> dict:
    """Median seconds per episode of every setup and the median of its per-round ratios to the plain test."""
    out = {}
    for name, rows in times.items():
        ratios = [a / b for a, b in zip(rows, times["plain"])]
        vs_one = [a / b for a, b in zip(rows, times["svf (one at a time)"])]
        out[name] = {"s_per_episode": statistics.median(rows), "x_plain": statistics.median(ratios),
                     "x_plain_min": min(ratios), "x_plain_max": max(ratios),
                     "x_svf_one_at_a_time": statistics.median(vs_one),
                     "prepare_s": prepare.get(name), "trainable": trainable.get(name)}
    return out


def print_table(shot: int, res: dict) -> None:
    print(f"\n## {shot}-shot\n")
    print("| adapt.params | values adapted | s / episode | x plain test (min-max) | x svf one at a time | prepare s |")
    print("|---|---:|---:|---|---:|---:|")
    for name, r in res.items():
        n = "–" if r["trainable"] is None else f"{r['trainable']:,}"
        prep = "–" if r["prepare_s"] is None else f"{r['prepare_s']:.2f}"
        print(f"| {name} | {n} | {r['s_per_episode']:.3f} | {r['x_plain']:.0f} ({r['x_plain_min']:.0f}-"
              f"{r['x_plain_max']:.0f}) | {r['x_svf_one_at_a_time']:.2f} | {prep} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="a few-shot checkpoint (default: the demo's)")
    p.add_argument("--size", type=int, default=112, help="image size (the demo's: 112)")
    p.add_argument("--episodes", type=int, default=12, help="episodes per setup and round")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after 1 warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--quick", action="store_true", help="64 px, 4 episodes, 1 round")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.episodes, args.rounds = 64, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    out = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
