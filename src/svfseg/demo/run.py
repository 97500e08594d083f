"""`svfseg demo`: synthetic-5i end to end on the CPU as a `svfseg compare` of frozen, SVF and full fine-tuning.

The few-shot model is PFENet on EfficientNet-Lite0 with its ImageNet weights. PFENet rather
than the ASPP baseline because its training-free prior mask, computed from the backbone's last
stage, is exactly the part SVF can adapt while the frozen regime cannot; and its head is the
most widely used one, so the demo exercises the configuration most users will run. Three
training seeds per regime, one shared head warm start (the head trained once with the frozen
backbone, then every regime, frozen included, fine-tuned from it for the same number of steps),
the backbone lr multiplier chosen per regime on base-class validation episodes (the compare
rule), every regime scored on the same 500 test episodes, and the verdict read off the paired
95% intervals, whatever it is.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from svfseg.demo.adaptation import AdaptPlan, adaptation_markdown, run_adaptation
from svfseg.engine.runfolder import RunFolder, write_atomic
from svfseg.engine.runlock import LOCK_NAME
from svfseg.regimes import regime_spec

logger = logging.getLogger(__name__)

DEMO_MARKER = "demo_results.json"
REGIMES = ("frozen", "svf", "full")
KEPT = ("svf", "frozen")  # the regimes whose first-seed checkpoint the demo keeps (serve, predict)
# What a demo folder may hold (a killed demo is resumed, a finished one replaced; anything else is refused).
_OWN = {DEMO_MARKER, "demo_results.md", "compare.json", "compare.md", "compare.png", "runs", "episodes", "svf",
        "frozen", "adaptation", LOCK_NAME}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo (the full demo and ``--quick`` differ only here)."""

    n_train: int
    n_val: int
    image_size: int
    steps: int
    batch_size: int
    eval_episodes: int
    val_episodes: int
    seeds: tuple[int, ...]
    backbone_lr: tuple[float, ...]
    warm_start: int = 0
    adapt: Optional[AdaptPlan] = None
    adapt_shots: tuple[int, ...] = ()


# One warm start + 3 seeds x (frozen + svf and full with 2 sweep trials on the first seed) = 1 + 11 trainings
# at 112 px, 9 cells x 500 test episodes. From cold, the head needs ~100 steps before it predicts any
# foreground, which is the whole budget of a cell: the shared warm start pays for that once, so every
# cell's steps go into adapting the backbone. Sized from benchmarks/bench_step.py and measured end to
# end (README, "The demo").
# Then the kept SVF checkpoint adapted on each 5-shot episode's supports: singular values and, as the peer, the
# head, each with its steps and lr chosen on 20 base-class validation episodes (lr 1e-3 or 1e-2 x 5 or 10 steps,
# or none: small steps and no adaptation stay candidates; lr 1e-4 scored on validation within 0.2 of none for S
# and below none for the head, and is left out here to save a third of the validation), scored on 100 test
# episodes (~0.7 and ~0.35 s per episode measured in the demo). About 2.5 minutes for the stage; the whole demo
# (set-up done) about 7 minutes on 2 idle Intel Xeon cores. Every other choice of adapt.params is in the
# README's table (`svfseg demo --adapt svf,bn,bitfit,lora,head,full --adapt-shots 1 5 --adapt-episodes 150`).
FULL = DemoPlan(n_train=2000, n_val=500, image_size=112, steps=60, batch_size=8, eval_episodes=500,
                val_episodes=100, seeds=(0, 1, 2), backbone_lr=(1.0, 100.0), warm_start=200,
                adapt=AdaptPlan(params=("svf", "head"), shot=5, test_episodes=100, val_episodes=20,
                               grid_lr=(1e-3, 1e-2)))
QUICK = DemoPlan(n_train=120, n_val=60, image_size=64, steps=2, batch_size=2, eval_episodes=6, val_episodes=4,
                 seeds=(0,), backbone_lr=(1.0,), warm_start=2,
                 adapt=AdaptPlan(params=("svf",), shot=2, test_episodes=4, val_episodes=4, grid_lr=(1e-2,),
                                 grid_steps=(1,)))


def recipe_path(head: str) -> Path:
    """The demo's recipe, ``configs/synthetic/<head>_efficientnet_lite0.yaml`` (shipped inside the package)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / f"{head}_efficientnet_lite0.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"demo recipe {path} is missing (a broken install?)")
    return path


def plan_overrides(plan: DemoPlan, root: Path) -> list[str]:
    """The sizes of ``plan`` and the data folder as overrides of the recipe, for every cell."""
    # No TensorBoard: twelve short runs would spend seconds each starting its writer; the CSV logs and
    # compare.png carry the curves.
    return [f"data.root={root}", f"data.train_crop={plan.image_size}", f"data.test_size={plan.image_size}",
            f"train.steps_per_epoch={plan.steps}", f"train.batch_size={plan.batch_size}", "train.tensorboard=false"]


def compare_plan(plan: DemoPlan, root: Path, out: Path, head: str = "pfenet", progress: bool = True,
                 threads: Optional[int] = None):
    """The :class:`~svfseg.compare.ComparePlan` the demo runs."""
    from svfseg.compare import ComparePlan

    extra = [] if progress else ["train.progress=false"]
    return ComparePlan(config=str(recipe_path(head)), regimes=list(REGIMES), seeds=list(plan.seeds),
                       overrides=[*plan_overrides(plan, root), *extra], out=Path(out),
                       backbone_lr=list(plan.backbone_lr), test_episodes=plan.eval_episodes,
                       val_episodes=plan.val_episodes, warm_start=plan.warm_start, threads=threads)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg demo`."""
    parser.add_argument("--quick", action="store_true", help="tiny version for tests (about a minute)")
    parser.add_argument("--root", type=Path, default=None,
                        help="synthetic-5i folder (default data/synthetic-5i, or data/synthetic-5i-quick)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo[-quick])")
    parser.add_argument("--head", choices=("pfenet", "baseline"), default="pfenet", help="few-shot head")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: plan)")
    parser.add_argument("--episodes", type=int, default=None, help="test episodes (default: plan)")
    parser.add_argument("--seeds", type=_seeds, default=None, help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--warm-start", type=int, default=None, metavar="STEPS",
                        help="steps of the shared head warm start (default: plan; 0 = none)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads of every step, and the data generator's processes "
                             "(default: one per core)")
    parser.add_argument("--adapt", default=None, metavar="PARAMS,...",
                        help="adapt.params rows of the adaptation stage (default svf,head; 'none' skips the stage)")
    parser.add_argument("--adapt-shots", type=int, nargs="+", default=None, metavar="K",
                        help="shots of the adaptation stage (default 5)")
    parser.add_argument("--adapt-episodes", type=int, default=None, metavar="N",
                        help="test episodes of the adaptation stage (default 100)")
    return parser


def _adapt_choices(plan: DemoPlan, args: argparse.Namespace) -> DemoPlan:
    """The plan with ``--adapt`` / ``--adapt-shots`` / ``--adapt-episodes`` applied (one adaptation stage per shot)."""
    from svfseg.regimes import adapt_name, adapt_trains

    adapt = plan.adapt
    if args.adapt is not None:
        try:
            params = tuple(adapt_name(p) for p in args.adapt.split(",") if p.strip() and adapt_trains(p))
        except ValueError as e:
            raise ValueError(f"demo: --adapt: {e}") from None
        adapt = dataclasses.replace(adapt, params=params) if params else None
    if adapt is not None and args.adapt_episodes is not None:
        adapt = dataclasses.replace(adapt, test_episodes=args.adapt_episodes)
    shots = tuple(args.adapt_shots) if args.adapt_shots else ((adapt.shot,) if adapt else ())
    return dataclasses.replace(plan, adapt=adapt, adapt_shots=shots)


def _seeds(text: str) -> tuple[int, ...]:
    # empty or repeated seeds are refused by the compare the demo runs (compare.check_plan_lists)
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None


def run_demo_cli(args: argparse.Namespace) -> int:
    """Entry point of `svfseg demo`."""
    plan = QUICK if args.quick else FULL
    change = {k: v for k, v in (("steps", args.steps), ("eval_episodes", args.episodes), ("seeds", args.seeds),
                                ("warm_start", args.warm_start)) if v is not None}
    if change:
        plan = DemoPlan(**{**plan.__dict__, **change})
    plan = _adapt_choices(plan, args)
    suffix = "-quick" if args.quick else ""
    root = args.root or Path(f"data/synthetic-5i{suffix}")
    out = args.out or Path(f"runs/demo{suffix}")
    run_demo(plan, root=root, out=out, head=args.head, progress=not args.quick, threads=args.threads)
    return 0


def _stage(i: int, n: int, text: str) -> None:
    print(f"\n[{i}/{n}] {text}", flush=True)


def _clear_previous(out: Path) -> None:
    """Replace a finished demo, resume a killed one, refuse a folder the demo did not write (the lock is held)."""
    if not out.exists():
        return
    foreign = [p.name for p in out.iterdir() if p.name not in _OWN]
    if foreign:
        raise FileExistsError(f"{out} holds {foreign[:3]}, not written by `svfseg demo`; choose another --out")
    if (out / DEMO_MARKER).exists():
        for p in out.iterdir():
            if p.name == LOCK_NAME:  # held by this demo: removing it would let a second one in
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def run_demo(plan: DemoPlan, *, root: Path, out: Path, head: str = "pfenet", progress: bool = True,
             threads: Optional[int] = None) -> dict:
    """Generate data, run the compare of frozen / SVF / full, adapt the kept SVF checkpoint on each test episode's
    supports, print the tables and verdicts.

    Args:
        plan: sizes (FULL or QUICK).
        root: synthetic-5i folder (generated once, then reused).
        out: output folder: the compare files, its run folders, and ``svf/best.pt`` and
            ``frozen/best.pt`` (the first seed's checkpoints, at stable paths for ``svfseg predict`` /
            ``serve``, each with a ``SOURCE.json`` naming its cell and test score).
        head: "pfenet" or "baseline".
        progress: progress bars.
        threads: torch CPU threads of everything the demo computes, and the data generator's processes
            (None: torch's default, one per core).

    Returns:
        The results dict (also in ``out/demo_results.json``).
    """
    from svfseg.compare import compare_lock
    from svfseg.engine.runtime import threads_for

    out = Path(out)
    # the lock before anything of out is read or cleared; the threads for the data, every cell, the warm start,
    # the scoring and the adaptation stage
    with compare_lock(out, "svfseg demo") as lock, threads_for(threads):
        return _run_demo_locked(plan, root=Path(root), out=out, head=head, progress=progress, threads=threads,
                                lock=lock)


def _run_demo_locked(plan: DemoPlan, *, root: Path, out: Path, head: str, progress: bool, threads: Optional[int],
                     lock) -> dict:
    from svfseg.compare import compare_markdown, run_compare
    from svfseg.data.synthetic import generate_synthetic

    t_total = time.perf_counter()
    _clear_previous(out)
    n = 4 if plan.adapt is not None and plan.adapt_shots else 3
    _stage(1, n, f"synthetic-5i at {root} ({plan.n_train} train + {plan.n_val} val images, {plan.image_size} px; "
                 f"generated once, about ten seconds; reused afterwards)")
    t = time.perf_counter()
    # --threads N is the CPU budget: the generator's worker processes too (None: its default)
    generate_synthetic(root, seed=0, n_train=plan.n_train, n_val=plan.n_val, size=plan.image_size, workers=threads)
    t_data = time.perf_counter() - t
    cplan = compare_plan(plan, root, out, head, progress, threads)
    warm = (f"a shared head warm start ({plan.warm_start} steps, frozen backbone), then " if plan.warm_start else "")
    _stage(2, n, f"svfseg compare: {warm}{', '.join(REGIMES)} x seeds {list(plan.seeds)}, {plan.steps} steps x "
                 f"{plan.batch_size} episodes each; backbone lr multiplier from {list(plan.backbone_lr)} chosen "
                 f"per regime on {plan.val_episodes} base-class validation episodes; all tested on the same "
                 f"{plan.eval_episodes} episodes (recipe {recipe_path(head)})")
    result = run_compare(cplan, lock=lock)
    stable = {name: _stable_checkpoint(result, out, name, root) for name in KEPT}
    t_compare = time.perf_counter() - t_total - t_data
    stages = []
    if n == 4 and stable["svf"] is not None:
        a = plan.adapt
        _stage(3, n, f"test-time adaptation of the SVF checkpoint at {', '.join(map(str, plan.adapt_shots))}-shot: "
                     f"{', '.join(a.params)} on each episode's own supports (steps and lr chosen on {a.val_episodes} "
                     f"base-class validation episodes; not adapting is a candidate), {a.test_episodes} test episodes")
        for shot in plan.adapt_shots:
            stages.append(run_adaptation(stable["svf"], dataclasses.replace(a, shot=shot), root=root, out=out,
                                         image_size=plan.image_size, progress=progress))
    if stages:
        _record_adapt_choices(out / "svf" / "SOURCE.json", stages[0])
    _stage(n, n, "results")
    demo = {"head": head, "backbone": "efficientnet_lite0", "fold": 0, "shot": 1, "plan": dataclasses.asdict(plan),
            "data_root": str(root), "data_seconds": t_data, "compare": str(out / "compare.json"),
            "svf_checkpoint": str(stable["svf"]) if stable["svf"] else None,
            "frozen_checkpoint": str(stable["frozen"]) if stable["frozen"] else None, "rows": result["rows"],
            "sweeps": result["sweeps"], "adaptation": stages, "compare_seconds": t_compare,
            "total_seconds": time.perf_counter() - t_total}
    md = compare_markdown(result) + "".join("\n" + adaptation_markdown(stage) for stage in stages) + (
        f"\nTotal wall time {demo['total_seconds']:.0f} s (data {t_data:.0f} s, compare {t_compare:.0f} s, "
        f"adaptation {demo['total_seconds'] - t_compare - t_data:.0f} s).\n")
    (out / "demo_results.md").write_text(md)
    (out / DEMO_MARKER).write_text(json.dumps(demo, indent=1, default=str))
    print(md)
    print(_next_steps(out, demo))
    return demo


def _stable_checkpoint(result: dict, out: Path, regime: str, root: Path) -> Optional[Path]:
    """Copy the first seed's ``best.pt`` of ``regime`` to ``out/<regime>/best.pt``, with ``SOURCE.json`` beside it.

    SOURCE.json names the cell it came from and that cell's test score, which `svfseg serve` shows
    beside the checkpoint. The SVF copy also gets its singular values as a safetensors file.
    """
    first = result["seeds"][0]
    cells = [c for c in result["cells"] if c["regime"] == regime and c["seed"] == first
             and c["status"] == "finished"]
    if not cells:
        return None
    cell = cells[0]
    dest = out / regime
    dest.mkdir(parents=True, exist_ok=True)
    src, kept = RunFolder(cell["run_dir"]).best, RunFolder(dest).best
    write_atomic(kept, lambda tmp: shutil.copyfile(src, tmp))
    if regime_spec(regime).singular_values:  # keep the trained singular values as their own file
        from svfseg.engine.model import load_for_inference
        from svfseg.svf import save_svf

        model, _, _ = load_for_inference(src)
        save_svf(dest / "singular_values.safetensors", model.backbone, metadata={"source": f"svfseg demo ({src})"})
    source = {"regime": regime, "cell": cell["run_dir"], "seed": first, "lr_mult": cell.get("lr_mult"),
              "test_miou": cell.get("miou"), "test_fb_iou": cell.get("fb_iou"), "test_episodes": cell.get("episodes"),
              "data_root": str(root), "benchmark": "synthetic", "fold": cell["fold"], "shot": cell["shot"]}
    (dest / "SOURCE.json").write_text(json.dumps(source, indent=1, default=str))
    return kept


def _record_adapt_choices(source_file: Path, stage: dict) -> None:
    """Add the adaptation stage's choices to the SVF checkpoint's SOURCE.json (`svfseg serve` adapts with them)."""
    src = json.loads(source_file.read_text())
    src["adapt"] = {r["adapt"]: {"steps": int(r["steps"]), "lr": r["lr"],
                                 "source": f"chosen by svfseg demo on {stage['plan']['val_episodes']} base-class "
                                           f"validation episodes at {stage['shot']}-shot"}
                    for r in stage["rows"].values()}
    tmp = source_file.with_name(f".{source_file.name}.tmp")
    tmp.write_text(json.dumps(src, indent=1, default=str))
    tmp.replace(source_file)


def _next_steps(out: Path, demo: dict) -> str:
    return f"""
Outputs: {out / 'compare.md'}, {out / 'compare.png'} (mIoU with intervals, training curves), {out / DEMO_MARKER};
the checkpoints {demo['svf_checkpoint']} and {demo['frozen_checkpoint']} (svfseg predict / merge / serve take them;
`svfseg serve` opens both and compares them side by side).

Next, on real data (GPU recommended):
  svfseg prepare pascal --voc VOCdevkit/VOC2012 --sbd SBD --out data/pascal
  svfseg compare --config configs/pascal/pfenet_resnet50.yaml --regimes frozen,svf,bitfit,bn,lora,full \\
      --seeds 0,1,2 --folds 0 1 2 3 --backbone-lr 1,10,100 model.weights=pretrained/resnet50_v2.pth --out runs/cmp
  (single runs: svfseg train --config ... model.regime=svf; svfseg test --checkpoint .../best.pt --protocol bam)
"""
