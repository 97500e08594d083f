"""One demo training step per regime, part by part, and each CPU speed option's ratio to today's step.

The step is the demo's: PFENet on EfficientNet-Lite0 (ImageNet weights), synthetic-5i, 1-shot,
8 episodes a step, the recipe ``configs/synthetic/pfenet_efficientnet_lite0.yaml``. "today" is
that recipe as it was before the demo issue (head width 256, ``svf.mode=auto``, contiguous
tensors, float32); every other setup changes one thing (or, for "demo", all that the demo now
uses). Setups are timed in interleaved rounds (round r times every setup once), so load that
hits one round hits all setups alike, and the ratios are medians measured side by side in one run.

Parts of a step (timers, not the profiler, so the parts add up to the step):
- data: reading, augmenting and collating the batch's episodes (main process);
- backbone fwd: the backbone's forward pass (query and supports in one pass);
- head fwd + loss: the rest of the forward pass and the loss;
- head bwd: backward until the first gradient reaches a backbone output (all of backward for frozen);
- backbone bwd: the rest of backward;
- optimiser: SGD step.

    python benchmarks/bench_step.py            # ~5 min on 2 idle cores
    python benchmarks/bench_step.py --quick    # 64 px, 3 rounds, no torch.compile
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "src" / "svfseg" / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
PARTS = ("data", "backbone fwd", "head fwd + loss", "head bwd", "backbone bwd", "optimiser")
#: The step before the demo issue: what the ratios are measured against.
TODAY = ["model.head.reduce_dim=256", "svf.mode=auto", "train.channels_last=false", "train.amp=auto"]  # auto = float32 on the CPU


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def c_compiler() -> str | None:
    """The C compiler inductor would use, if any."""
    return next(filter(None, (shutil.which(c) for c in ("cc", "gcc", "clang"))), None)


def setups_for(regime: str, *, compile_ok: bool, bf16_ok: bool) -> dict[str, list[str]]:
    """Setup name -> overrides on top of TODAY, for one regime."""
    out = {"today": [], "channels_last": ["train.channels_last=true"], "head width 64": ["model.head.reduce_dim=64"]}
    if bf16_ok:
        out["bf16 autocast"] = ["train.amp=bf16"]
    if regime == "svf":
        # (svf.mode=auto, in "today", has measured each layer's forms since issue 27: it was the cost model's choice)
        out.update({f"svf.mode={m}": [f"svf.mode={m}"] for m in ("reparam", "factorized")})
    if compile_ok:
        out["torch.compile"] = ["@compile"]
    out["demo (all kept)"] = ["model.head.reduce_dim=64", "train.channels_last=true"]  # svf.mode=auto: the forms plan
    return out


class StepTimer:
    """Times the parts of one training step by wrapping the model's backbone pass (``extract_features``).

    The wrapper marks the start and end of the backbone's forward and hooks the gradients of its
    outputs: the first gradient to arrive ends the head's backward.
    """

    def __init__(self, model: torch.nn.Module):
        self.marks: dict[str, float] = {}
        inner = model.extract_features

        def timed(*args, **kwargs):
            self.marks["bb_in"] = time.perf_counter()
            feats = inner(*args, **kwargs)
            self.marks["bb_out"] = time.perf_counter()
            for group in (feats.query, feats.support):
                for t in group.values():
                    if t.requires_grad:
                        t.register_hook(self._first_gradient)
            return feats

        model.extract_features = timed

    def _first_gradient(self, grad):
        self.marks.setdefault("grad_at_bb", time.perf_counter())


def one_step(setup: dict, info, task) -> dict[str, float]:
    """Run one training step of ``setup``; seconds per part."""
    from svfseg.data.collate import collate_episodes

    cfg, model, opt, timer = setup["cfg"], setup["model"], setup["opt"], setup["timer"]
    t0 = time.perf_counter()
    i = setup["next"]
    setup["next"] = (i + cfg.train.batch_size) % len(setup["ds"])
    batch = collate_episodes([setup["ds"][(i + k) % len(setup["ds"])] for k in range(cfg.train.batch_size)])
    if cfg.train.channels_last:
        batch["query_img"] = batch["query_img"].contiguous(memory_format=torch.channels_last)
    timer.marks.clear()
    t1 = time.perf_counter()
    loss, _ = task.loss(setup["step_model"], batch, cfg, info, setup["dtype"])
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    opt.step()
    t4 = time.perf_counter()
    m = timer.marks
    bb_in, bb_out = m.get("bb_in", t1), m.get("bb_out", t1)
    grad_at = m.get("grad_at_bb", t3)
    return {"data": t1 - t0, "backbone fwd": bb_out - bb_in, "head fwd + loss": (t2 - t1) - (bb_out - bb_in),
            "head bwd": grad_at - t2, "backbone bwd": t3 - grad_at, "optimiser": t4 - t3}


def build_setup(regime: str, overrides: list[str], root: Path, size: int, batch: int) -> dict:
    from svfseg.config import load_config
    from svfseg.engine.data import train_dataset
    from svfseg.engine.model import build_model
    from svfseg.engine.optim import build_optimizer
    from svfseg.engine.resolved import resolve_run

    use_compile = "@compile" in overrides
    ov = [o for o in overrides if not o.startswith("@")]
    cfg = load_config(str(RECIPE), [f"data.root={root}", f"data.train_crop={size}", f"data.test_size={size}",
                                    f"model.regime={regime}", f"train.batch_size={batch}", *TODAY, *ov])
    run = resolve_run(cfg)
    model = build_model(run)
    model.train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, _ = build_optimizer(model, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                             weight_decay=cfg.optim.weight_decay, lr_mult=cfg.optim.lr_mult, decay_to_pretrained=())
    timer = StepTimer(model)
    step_model = model
    compile_s = None
    if use_compile:
        step_model = torch.compile(model)
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else None
    return {"cfg": cfg, "model": model, "step_model": step_model, "opt": opt, "timer": timer,
            "ds": train_dataset(run), "next": 0, "dtype": dtype, "compile": use_compile, "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=112, help="image size (the demo's: 112)")
    p.add_argument("--batch", type=int, default=8, help="episodes per step (the demo's: 8)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--regimes", default="frozen,svf,full")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile setups")
    p.add_argument("--quick", action="store_true", help="64 px, 3 rounds, no torch.compile")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.no_compile = 64, 3, True
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from svfseg.data.synthetic import generate_synthetic
    from svfseg.engine.distributed import DistInfo
    from svfseg.engine.tasks import get_task

    cc = c_compiler()
    compile_ok = not args.no_compile and cc is not None
    if not args.no_compile and cc is None:
        print("torch.compile: no C compiler (cc/gcc/clang) found; its setups are skipped")
    bf16_ok = bf16_supported()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if bf16_ok else 'no (bf16 setup skipped)'}, "
          f"C compiler {cc or 'none'}; {args.size} px, {args.batch} episodes/step, {args.rounds} rounds", flush=True)
    info, task = DistInfo(device=torch.device("cpu")), get_task("fewshot")
    results, failures = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(Path(tmp) / "syn", seed=0, n_train=160, n_val=40, size=args.size)
        for regime in args.regimes.split(","):
            setups = {name: build_setup(regime, ov, root, args.size, args.batch)
                      for name, ov in setups_for(regime, compile_ok=compile_ok, bf16_ok=bf16_ok).items()}
            for name, s in list(setups.items()):  # warm-up (compilation happens here)
                t = time.perf_counter()
                try:
                    one_step(s, info, task)
                except Exception as e:  # noqa: BLE001 - inductor raises assorted errors on CPU graphs
                    if not s["compile"]:
                        raise
                    reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                    print(f"{regime}: torch.compile failed, setup dropped ({type(e).__name__}: {reason})")
                    failures[f"{regime}/{name}"] = f"{type(e).__name__}: {reason}"
                    del setups[name]
                    continue
                if s["compile"]:
                    s["compile_s"] = time.perf_counter() - t
                one_step(s, info, task)
            times = {name: [] for name in setups}
            for _ in range(args.rounds):
                for name, s in setups.items():
                    times[name].append(one_step(s, info, task))
            results[regime] = summarize(times, setups)
            print_regime(regime, results[regime])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "batch": args.batch, "rounds": args.rounds,
                                         "threads": torch.get_num_threads(), "results": results,
                                         "failures": failures}, indent=1))
    return 0


def summarize(times: dict[str, list[dict]], setups: dict) -> dict:
    """Median seconds per part and per step for every setup, and each step's ratio to today's (same round)."""
    out = {}
    today = [sum(t.values()) for t in times["today"]]
    for name, rows in times.items():
        totals = [sum(t.values()) for t in rows]
        ratios = [a / b for a, b in zip(totals, today)]
        out[name] = {"step_s": statistics.median(totals),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "parts_s": {k: statistics.median(t[k] for t in rows) for k in PARTS},
                     "compile_s": setups[name]["compile_s"]}
    return out


def print_regime(regime: str, res: dict) -> None:
    print(f"\n## {regime}\n")
    print("| setup | step (s) | ratio to today (min-max) | " + " | ".join(PARTS) + " |")
    print("|---|---|---|" + "---|" * len(PARTS))
    for name, r in res.items():
        parts = " | ".join(f"{r['parts_s'][k]:.3f}" for k in PARTS)
        extra = f" (compiled in {r['compile_s']:.0f} s)" if r["compile_s"] else ""
        print(f"| {name}{extra} | {r['step_s']:.3f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
              f"| {parts} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
