"""`svfseg compare`'s arguments and entry point."""
from __future__ import annotations

import argparse
from pathlib import Path

from svfseg.compare.plan import ComparePlan, trains_backbone
from svfseg.compare.render import compare_markdown
from svfseg.compare.run import run_compare
from svfseg.compare.variants import expand_arms
from svfseg.regimes import NO_ADAPTATION


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_compare_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg compare`."""
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--regimes", default="frozen,svf,full", help="comma-separated model.regime values")
    p.add_argument("--seeds", default="0,1", type=_ints, help="comma-separated training seeds")
    p.add_argument("--folds", default=["0"], nargs="+", help="folds (default 0)")
    p.add_argument("--shots", default=["1"], nargs="+", help="shots (default 1)")
    p.add_argument("--reference", default="frozen", help="regime the others are compared with")
    p.add_argument("--backbone-lr", default="1", type=_floats,
                   help="grid of lr multipliers for the trained backbone groups, chosen per regime on base-class "
                        "validation episodes (e.g. 1,10,100; one value = no sweep)")
    p.add_argument("--test-episodes", type=int, default=None, help="test episodes per (fold, shot)")
    p.add_argument("--val-episodes", type=int, default=200, help="base-class validation episodes per (fold, shot)")
    p.add_argument("--warm-start", type=int, default=0, metavar="STEPS",
                   help="train the head STEPS steps with the frozen backbone once per (fold, shot), then start every "
                        "cell (frozen included) from that head (default 0: no warm start)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads of every cell")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    p.add_argument("--vary", action="append", default=[], metavar="[REGIME:]KEY=V1|V2",
                   help="extra rows: REGIME (default: every regime that trains the backbone, except the reference) "
                        "once per value of KEY, e.g. --vary 'svf:svf.train=[S]|[U,S]|[S,V]' or "
                        "--vary 'svf:svf.stages=[layer4]|[layer3,layer4]'; repeat for more keys (every combination)")
    p.add_argument("--adapt", default=NO_ADAPTATION, metavar="PARAMS,...",
                   help="also score every cell after fine-tuning on each test episode's own supports: comma-separated "
                        "adapt.params choices (none, svf, bn, bitfit, lora, head, full, or '+' combinations), e.g. "
                        "none,svf,full; steps and lr chosen on the first seed's base-class validation episodes")
    p.add_argument("--force", action="store_true",
                   help="retrain (rescore) the cells an earlier compare into --out made with other settings")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every cell")
    return p


def run_compare_cli(args: argparse.Namespace) -> int:
    """Entry point of `svfseg compare`: runs, then prints the Markdown."""
    # `--folds 0 1 key=value` : argparse hands the overrides after a list option to that option.
    overrides = list(args.overrides)
    lists = {}
    for name in ("folds", "shots"):
        items = [x for x in getattr(args, name) if "=" not in x]
        overrides += [x for x in getattr(args, name) if "=" in x]
        try:
            lists[name] = [int(x) for x in items]
        except ValueError:
            raise ValueError(f"--{name}: expected integers, got {items}") from None
    arms = expand_arms([r for r in args.regimes.split(",") if r], args.reference, args.vary, trains_backbone)
    plan = ComparePlan(config=args.config, regimes=[a.label for a in arms], seeds=args.seeds,
                       folds=lists["folds"], shots=lists["shots"], overrides=overrides, out=args.out,
                       reference=args.reference, backbone_lr=args.backbone_lr, test_episodes=args.test_episodes,
                       val_episodes=args.val_episodes, warm_start=args.warm_start, threads=args.threads,
                       arms={a.label: a for a in arms if a.overrides}, force=args.force,
                       adapt=[NO_ADAPTATION, *[a.strip() for a in args.adapt.split(",") if a.strip()]])
    result = run_compare(plan)
    print(compare_markdown(result))
    return 130 if result.get("stopped") else 0
