"""What the SVF authors' rank floor (`svf.rank_multiple=4`) does on synthetic-5i: stem features and mIoU.

Needs the demo's outputs (`make demo`: runs/demo, data/synthetic-5i). EfficientNet-Lite0's stem conv
(3 -> 32, 3x3: 27 columns) is the only layer of that backbone whose rank (27) is not a multiple of 4;
the floor keeps 24 of its singular values.

1. Stem features: the relative change ||f_24(x) - f_27(x)|| / ||f_27(x)|| of the stem (layer0) and of
   the last stage (layer4) over the query images of the demo's test episodes, with the demo's svf
   checkpoint (ImageNet stem; the floor changes only the frozen stem).
2. Test-time mIoU: the demo's svf and frozen checkpoints scored on the demo's 1,000 test episodes as
   trained and with their stem floored afterwards (the authors' network, not retrained).
3. ``--train``: the demo's svf cell (seed 0: its config, warm-start head, 60 steps) trained again with
   svf.rank_multiple=1 and =4, both scored on the same episodes (one seed: a paired difference, no interval).

    python benchmarks/bench_rank_floor.py --demo /path/to/runs/demo --data /path/to/data/synthetic-5i [--train]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def floored_copy(model):
    """``model`` with the rank floor applied to every backbone conv outside the SVF stages (the stem here)."""
    import copy

    from svfseg.models.policy import floor_ranks_outside
    from svfseg.policies import SVFPolicy

    out = copy.deepcopy(model)
    stages = model.svf_policy.stages if model.svf_policy is not None else SVFPolicy().stages
    lossy = floor_ranks_outside(out.backbone, SVFPolicy(stages=tuple(stages), rank_multiple=4))
    return out, lossy


def score(model, cfg, episodes: Path, run) -> float:
    from svfseg.engine.data import eval_dataset
    from svfseg.engine.tasks.fewshot import evaluate

    ds = eval_dataset(run, episodes=str(episodes))
    r = evaluate(model, ds, class_ids=tuple(run.bench.split(cfg.fold).novel), device=torch.device("cpu"),
                 batch_size=cfg.eval.batch_size, upstream_padding=cfg.eval.upstream_padding)
    return 100 * r["miou"]


def load(checkpoint: Path, data: Path):
    from svfseg.config import config_with_overrides, to_dict
    from svfseg.engine.model import checkpoint_config, load_for_inference_run
    from svfseg.engine.resolved import resolve_run

    cfg = config_with_overrides(to_dict(checkpoint_config(checkpoint)), [f"data.root={data}", "data.workers=0"])
    model, run, _ = load_for_inference_run(checkpoint, resolve_run(cfg))
    return model, run.cfg, run


def stem_change(model, floored, cfg, episodes: Path, run, n: int = 200) -> dict[str, float]:
    from svfseg.engine.data import eval_dataset

    ds = eval_dataset(run, episodes=str(episodes))
    sums = {s: [0.0, 0.0] for s in ("layer0", "layer4")}
    with torch.no_grad():
        for i in range(min(n, len(ds))):
            x = ds[i]["query_img"].unsqueeze(0)
            a = model.backbone.forward_stages(x, ("layer0", "layer4"))
            b = floored.backbone.forward_stages(x, ("layer0", "layer4"))
            for s in sums:
                sums[s][0] += (b[s] - a[s]).pow(2).sum().item()
                sums[s][1] += a[s].pow(2).sum().item()
    return {s: (d / r) ** 0.5 for s, (d, r) in sums.items()}


def retrain(demo: Path, data: Path, episodes: Path, rank_multiple: int, out: Path) -> float:
    """The demo's svf seed-0 cell trained again with ``svf.rank_multiple``, scored on the test episodes."""
    from svfseg.config import load_config
    from svfseg.engine.run import train_run

    cell = demo / "runs" / "fold0_1shot" / "svf_lrx1_seed0"
    cfg = load_config(cell / "config.yaml", [
        f"data.root={data}", f"model.init_head={demo / 'runs' / 'fold0_1shot' / 'warm_start' / 'best.pt'}",
        f"train.val_episodes_file={demo / 'episodes' / 'val_base_fold0_1shot.json'}", f"output_dir={out}",
        f"name=rank{rank_multiple}", f"svf.rank_multiple={rank_multiple}", "data.workers=0", "train.progress=false",
        "train.tensorboard=false"])
    train_run(cfg)
    model, cfg, run = load(out / f"rank{rank_multiple}" / "best.pt", data)
    return score(model, cfg, episodes, run)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", type=Path, default=Path("runs/demo"))
    p.add_argument("--data", type=Path, default=Path("data/synthetic-5i"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train", action="store_true", help="also retrain the svf cell with rank_multiple 1 and 4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    episodes = args.demo / "episodes" / "test_fold0_1shot.json"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    for regime in ("svf", "frozen"):
        model, cfg, run = load(args.demo / regime / "best.pt", args.data)
        floored, lossy = floored_copy(model)
        if regime == "svf":
            change = stem_change(model, floored, cfg, episodes, run)
            stem = next(m for n, m in model.backbone.named_modules() if n == lossy[0].split(" ")[0])
            sv = torch.linalg.svdvals(stem.weight.detach().double().flatten(1))
            print(f"floored layers: {lossy}; dropped singular values / largest: "
                  f"{', '.join(f'{v:.1e}' for v in (sv[24:] / sv[0]).tolist())}; relative feature change over 200 "
                  f"test queries: layer0 {change['layer0']:.1e}, layer4 {change['layer4']:.1e}")
        a, b = score(model, cfg, episodes, run), score(floored, cfg, episodes, run)
        print(f"{regime}: test mIoU {a:.2f} as trained, {b:.2f} with the stem floored afterwards ({b - a:+.2f})",
              flush=True)
    if args.train:
        with tempfile.TemporaryDirectory() as tmp:
            r1, r4 = (retrain(args.demo, args.data, episodes, r, Path(tmp)) for r in (1, 4))
        print(f"svf retrained (seed 0): test mIoU {r1:.2f} exact, {r4:.2f} with rank_multiple=4 ({r4 - r1:+.2f})")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
