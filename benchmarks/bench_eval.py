"""Scoring speed: seconds per 100 test episodes of the demo's model, before and after the evaluation changes.

The model is the demo's (PFENet on EfficientNet-Lite0 with ImageNet weights, synthetic-5i, 1-shot,
112 px, ``configs/synthetic/pfenet_efficientnet_lite0.yaml``), scored as `svfseg test` scores it
(`evaluate`, batches of ``eval.batch_size``, at the label size). Setups, per regime:

- "before": what test did before this benchmark existed: contiguous tensors, and an SVF layer
  whose ``svf.mode`` is "factorized" ran that form (two convolutions) even without a graph to S;
- "cached weight": every SVF layer without a graph runs one convolution with its cached rebuilt
  weight (what ``SVFLayer.choose_mode`` does now);
- "now": the cached weight plus the recipe's ``train.channels_last``, which `load_for_inference`
  now applies at test time too.

Setups are timed in interleaved rounds (round r scores every setup once on the same episodes), so
the ratios are medians of per-round ratios measured side by side in one run. The mIoU of each
setup is printed too: the changes must not move it beyond float rounding.

    python benchmarks/bench_eval.py            # ~2 min on 2 idle cores
    python benchmarks/bench_eval.py --quick    # 64 px, 48 episodes, 3 rounds
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

RECIPE = Path(__file__).resolve().parents[1] / "src" / "svfseg" / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
SETUPS = ("before", "cached weight", "now")


def factorized_without_graph(layer_cls):
    """The form choice before this benchmark: an explicit "factorized" mode ran even without a graph to S."""
    current = layer_cls.choose_mode

    def choose_mode(self, x):
        if self.mode == "factorized" and not self._factor_matrices_train():
            return "factorized"
        return current(self, x)

    return current, choose_mode


def build(regime: str, root: Path, size: int):
    from svfseg.config import load_config
    from svfseg.engine.model import build_model
    from svfseg.engine.resolved import resolve_run

    cfg = load_config(str(RECIPE), [f"data.root={root}", f"data.train_crop={size}", f"data.test_size={size}",
                                    f"model.regime={regime}"])
    torch.manual_seed(0)
    return cfg, build_model(resolve_run(cfg)).eval()


def score(model, ds, cfg, memory_format) -> tuple[float, float]:
    """(seconds, mIoU) of one pass over ``ds``."""
    from svfseg.engine.tasks.fewshot import evaluate

    model.to(memory_format=memory_format)
    t = time.perf_counter()
    r = evaluate(model, ds, class_ids=tuple(range(1, 6)), device=torch.device("cpu"),
                 batch_size=cfg.eval.batch_size, progress=False)
    return time.perf_counter() - t, r["miou"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=112, help="image size (the demo's: 112)")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after 1 warm-up round)")
    p.add_argument("--regimes", default="frozen,svf")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--quick", action="store_true", help="64 px, 48 episodes, 3 rounds")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.episodes, args.rounds = 64, 48, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from svfseg.data.synthetic import generate_synthetic
    from svfseg.engine.data import eval_dataset
    from svfseg.engine.resolved import resolve_run
    from svfseg.svf.base import SVFLayer

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.size} px, {args.episodes} episodes, "
          f"{args.rounds} rounds", flush=True)
    now_choice, before_choice = factorized_without_graph(SVFLayer)
    forms = {"before": (before_choice, torch.contiguous_format), "cached weight": (now_choice, torch.contiguous_format),
             "now": (now_choice, torch.channels_last)}
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = generate_synthetic(Path(tmp) / "syn", seed=0, n_train=40, n_val=80, size=args.size)
            for regime in args.regimes.split(","):
                cfg, model = build(regime, root, args.size)
                ds = eval_dataset(resolve_run(cfg), seed=0, count=args.episodes)
                times = {name: [] for name in SETUPS}
                mious = {}
                for r in range(args.rounds + 1):
                    for name in SETUPS:
                        SVFLayer.choose_mode, fmt = forms[name]
                        seconds, miou = score(model, ds, cfg, fmt)
                        mious[name] = miou
                        if r:  # round 0 warms the caches and oneDNN's kernels up
                            times[name].append(seconds)
                results[regime] = summarize(times, mious, args.episodes)
                print_regime(regime, results[regime])
    finally:
        SVFLayer.choose_mode = now_choice
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "episodes": args.episodes, "rounds": args.rounds,
                                         "threads": torch.get_num_threads(), "results": results}, indent=1))
    return 0


def summarize(times: dict[str, list[float]], mious: dict[str, float], episodes: int) -> dict:
    """Median seconds per 100 episodes of every setup and its per-round ratio to "before"."""
    out = {}
    for name, rows in times.items():
        ratios = [a / b for a, b in zip(rows, times["before"])]
        out[name] = {"s_per_100": statistics.median(rows) * 100 / episodes, "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "miou": mious[name]}
    return out


def print_regime(regime: str, res: dict) -> None:
    print(f"\n## {regime}\n")
    print("| setup | s / 100 episodes | ratio to before (min-max) | mIoU |")
    print("|---|---:|---|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['s_per_100']:.2f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
              f"| {100 * r['miou']:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
