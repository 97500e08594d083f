"""Command-line entry point: `svfseg demo|compare|prepare|train|test|episodes|predict|report|merge|serve|convert`."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import svfseg

logger = logging.getLogger("svfseg")

EXAMPLES = """examples:
  svfseg demo                                   # the whole pipeline on synthetic-5i, CPU, no download
  svfseg compare --config C --regimes frozen,svf,full --seeds 0,1 --out runs/cmp   # regimes with 95% intervals
  svfseg prepare pascal --voc VOC2012 --sbd SBD --out data/pascal
  svfseg prepare custom --images my/images --masks my/masks --class-names names.txt --out data/mine
  svfseg train --config configs/pascal/pfenet_resnet50.yaml fold=1 shot=5 model.regime=frozen
  torchrun --nproc_per_node 4 -m svfseg train --config configs/coco/pfenet_resnet50.yaml
  svfseg train --resume runs/pascal_pfenet_resnet50_deep_svf_fold1_5shot
  svfseg test --checkpoint runs/RUN/best.pt --protocol bam --save-vis 10
  svfseg episodes --config configs/pascal/pfenet_resnet50.yaml fold=1 --count 1000 --seed 0 --out f1.json
  svfseg predict --checkpoint runs/RUN/best.pt --support cat.jpg cat.png --query q1.jpg --out preds
  svfseg report runs/*
  svfseg merge --checkpoint runs/RUN/best.pt --out model_merged.pt
  svfseg serve                         # web app on 127.0.0.1:7860: the demo's svf and frozen checkpoints
  svfseg convert --from pfenet train_epoch_107.pth --fold 0 --out pfenet_fold0.pt   # a published model
"""


def _setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    root.setLevel(level)


@contextlib.contextmanager
def _tqdm_safe_logging():
    """Route log lines through tqdm so progress bars are not broken up."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover
        yield
        return
    with logging_redirect_tqdm():
        yield


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svfseg", description="Singular Value Fine-tuning for few-shot segmentation.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"svfseg {svfseg.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also: SVFSEG_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="synthetic-5i end to end: frozen vs SVF on EfficientNet-Lite0 (CPU, minutes)")
    from svfseg.demo import add_demo_arguments

    add_demo_arguments(d)

    c = sub.add_parser("compare", help="several backbone regimes x seeds on identical episodes, with 95%% intervals")
    from svfseg.compare import add_compare_arguments

    add_compare_arguments(c)

    pr = sub.add_parser("prepare", help="build a Pascal-layout root from VOC/SBD or COCO (or check one)")
    from svfseg.data.prepare import add_prepare_arguments

    add_prepare_arguments(pr)

    t = sub.add_parser("train", help="meta-train a few-shot model (torchrun for several GPUs)")
    t.add_argument("--config", type=Path, help="recipe YAML (see configs/)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run folder from its last.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds an earlier run (its files are deleted)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. fold=1 optim.lr=0.005")
    _add_threads(t)

    te = sub.add_parser("test", help="evaluate a checkpoint on fixed episodes (JSON + Markdown)")
    te.add_argument("--checkpoint", type=Path, required=True, help="best.pt / last.pt / merged export")
    te.add_argument("--config", type=Path, help="recipe YAML (default: the checkpoint's own config)")
    from svfseg.data.episodes import PROTOCOLS

    te.add_argument("--protocol", choices=sorted(PROTOCOLS), help="episode count + seeds (default eval.protocol)")
    te.add_argument("--episodes", type=Path, help="episode file to use instead of a protocol")
    te.add_argument("--save-vis", type=int, default=0, metavar="N", help="write N overlay PNGs")
    te.add_argument("--out", type=Path, help="output folder (default: next to the checkpoint)")
    te.add_argument("--generalized", action="store_true",
                    help="generalized setting (base + novel classes) instead of episodic mIoU, for models that "
                         "predict both")
    te.add_argument("--tau", type=float, default=0.9, help="generalized setting: novel-class threshold (default 0.9)")
    te.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. shot=5 data.root=...")
    _add_threads(te)
    add_adapt_arguments(te)

    ep = sub.add_parser("episodes", help="write a fixed evaluation episode file (for `svfseg test --episodes`)")
    ep.add_argument("--config", type=Path, required=True, help="recipe YAML (data.root, fold, shot, ...)")
    ep.add_argument("--count", type=int, default=1000, help="number of episodes (default 1000)")
    ep.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    ep.add_argument("--out", type=Path, required=True, help="episode file to write (JSON)")
    ep.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. fold=1 shot=5")
    _add_threads(ep)

    pd = sub.add_parser("predict", help="segment your own images from annotated supports")
    pd.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or merged export")
    pd.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "MASK"), required=True,
                    help="a support image and its binary mask (0/255 or 0/1 PNG); repeat for K shots")
    pd.add_argument("--query", nargs="+", required=True, type=Path, help="query image(s)")
    pd.add_argument("--out", type=Path, required=True, help="output folder")
    pd.add_argument("--size", type=int, help="test size (default: the checkpoint's data.test_size)")
    pd.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _add_threads(pd)
    pd.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    pd.add_argument("--mask-class", type=int, metavar="C",
                    help="support masks are class-index PNGs: the object is the pixels of value C")
    add_adapt_arguments(pd)

    r = sub.add_parser("report", help="gather fold results into the paper's table, paper numbers beside")
    r.add_argument("runs", nargs="+", type=Path, help="run folders or results.json files")
    r.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    r.add_argument("--as-paper", action="store_true",
                   help="the paper's statistic from each run's logs (max over test-fold validations, else best "
                        "of the test seeds; optimistic) instead of the mean over test seeds")

    m = sub.add_parser("merge", help="fold the singular values back: a plain model for deployment")
    m.add_argument("--checkpoint", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never a file of the run)")

    sv = sub.add_parser("serve", help="local web app: segment your own images in the browser (svfseg[serve])")
    from svfseg.serve.cli import add_serve_arguments

    add_serve_arguments(sv)

    cv = sub.add_parser("convert", help="a published PFENet / BAM checkpoint as an svfseg model file")
    from svfseg.convert import add_convert_arguments

    add_convert_arguments(cv)
    return p


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: config key `threads`, else one per core); on a machine "
                             "shared with other jobs use cores / jobs, e.g. 1 on 2 cores with 2 jobs")


def _apply_threads(args, cfg=None) -> None:
    from svfseg.engine.runtime import set_threads

    if args.threads is not None and cfg is not None:
        cfg.threads = args.threads  # recorded in the run's config.yaml
    set_threads(args.threads if args.threads is not None else (cfg.threads if cfg is not None else None))


def cmd_train(args) -> int:
    from svfseg.config import load_config
    from svfseg.engine.run import train_run
    from svfseg.engine.runfolder import RunFolder
    from svfseg.engine.state import resume_config
    from svfseg.results import pct

    if args.resume is not None and args.config is not None:
        raise UsageError("train: --resume continues a run with its own config.yaml; --config would be ignored: "
                         "give one of them (change keys of a resumed run with KEY=VALUE overrides)")
    if args.resume is not None:
        cfg = resume_config(args.resume, args.overrides)
        run_dir = args.resume
    elif args.config is not None:
        cfg = load_config(args.config, args.overrides)
        run_dir = None
    else:
        raise UsageError("train: --config RECIPE.yaml (or --resume RUN_DIR) is required")
    _apply_threads(args, cfg)
    with _tqdm_safe_logging():
        res = train_run(cfg, run_dir=run_dir, argv=getattr(args, "command_line", sys.argv),
                        overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        best = f"best mIoU {pct(res.best['miou'])} at step {res.best['step']}" if res.best else "no validation"
        print(f"{res.status}: step {res.step}/{res.total_steps} in {res.seconds:.0f}s, {best}\n"
              f"run folder: {res.run_dir}\n"
              + (f"next: svfseg test --checkpoint {RunFolder(res.run_dir).best}" if res.status == "finished"
                 else f"continue: svfseg train --resume {res.run_dir}"))
    return 0 if res.status == "finished" else 130


def add_adapt_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--adapt PARAMS``, ``--adapt-steps N``, ``--adapt-lr LR`` of `test` and `predict` (the ``adapt:`` section)."""
    from svfseg.regimes import ADAPT_NAMES

    parser.add_argument("--adapt", metavar="PARAMS", default=None,
                        help=f"fine-tune on each episode's own supports before predicting its query: one of "
                             f"{', '.join(ADAPT_NAMES)} or a '+' combination (svf+head); steps and lr are chosen on "
                             f"base-class validation episodes unless given")
    parser.add_argument("--adapt-steps", type=int, default=None, metavar="N",
                        help="adaptation steps per episode (default: chosen on validation)")
    parser.add_argument("--adapt-lr", type=float, default=None, metavar="LR",
                        help="adaptation learning rate (default: chosen on validation)")
    return parser


def adapt_overrides(args: argparse.Namespace) -> list[str]:
    """The ``adapt.*`` overrides that ``--adapt``, ``--adapt-steps`` and ``--adapt-lr`` stand for."""
    pairs = (("params", args.adapt), ("steps", args.adapt_steps), ("lr", args.adapt_lr))
    return [f"adapt.{key}={value}" for key, value in pairs if value is not None]


def cmd_test(args) -> int:
    from svfseg.config import load_config
    from svfseg.engine.distributed import cleanup, init_distributed
    from svfseg.engine.model import checkpoint_config
    from svfseg.engine.runfolder import results_file, results_markdown
    from svfseg.engine.tasks import TestOptions
    from svfseg.engine.testing import score_with_task

    if args.protocol is not None and args.episodes is not None:
        raise UsageError("test: --protocol makes episodes from its seeds, --episodes reads a file of them; give one")
    if args.save_vis < 0:
        raise UsageError(f"test: --save-vis must be >= 0 (overlay PNGs to write), found {args.save_vis}")
    args.overrides = [*args.overrides, *adapt_overrides(args)]
    cfg = None
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:
        cfg = checkpoint_config(args.checkpoint, args.overrides)  # its metadata only, not the weights
    _apply_threads(args, cfg)
    options = TestOptions(protocol=args.protocol, episodes=args.episodes, save_vis=args.save_vis, out_dir=args.out,
                          tau=args.tau)
    info = init_distributed(cfg.device if cfg else "auto")
    try:
        with _tqdm_safe_logging():
            out, markdown = score_with_task(args.checkpoint, cfg, setting="generalized" if args.generalized else None,
                                            options=options, info=info)
    finally:
        cleanup(info)
    if info.is_main:
        print(markdown)
        if out.get("out_dir"):
            print(f"results: {results_file(out['out_dir'])}, {results_markdown(out['out_dir'])}")
    return 0


def cmd_episodes(args) -> int:
    from svfseg.config import load_config
    from svfseg.engine.data import episode_summary, write_episode_file
    from svfseg.engine.resolved import resolve_run

    from svfseg.data.episodes import MAX_EPISODES

    if not 1 <= args.count <= MAX_EPISODES:
        raise UsageError(f"episodes: --count must be 1 .. {MAX_EPISODES:,} (50x the largest protocol's 20,000), "
                         f"found {args.count:,}")
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"episodes: --out {args.out} exists (runs may have been scored on it); choose another "
                         f"file or pass --overwrite")
    cfg = load_config(args.config, args.overrides)
    _apply_threads(args, cfg)
    run = resolve_run(cfg)
    eps = write_episode_file(run, args.out, seed=args.seed, count=args.count)
    print(f"wrote {args.out}: {len(eps)} episodes, {eps.benchmark} fold {eps.fold} {eps.shot}-shot, "
          f"episode seed {eps.seed}, min_pixels {eps.min_pixels}, query rule {eps.query_rule}\n"
          f"classes (episodes): {episode_summary(run, eps)}\n"
          f"fingerprint {eps.fingerprint} (dataset {eps.dataset_fingerprint})\n"
          + (f"queries from the given list {eps.query_list}\n" if eps.query_list else "")
          + f"use: svfseg test --checkpoint RUN/best.pt --episodes {args.out}")
    return 0


def cmd_predict(args) -> int:
    from svfseg.predict import predict
    from svfseg.results import pct

    _apply_threads(args)
    results = predict(args.checkpoint, [tuple(s) for s in args.support], args.query, args.out, size=args.size,
                      device=args.device, overwrite=args.overwrite, mask_class=args.mask_class, adapt=args.adapt,
                      adapt_steps=args.adapt_steps, adapt_lr=args.adapt_lr, progress=True)
    a = results[0]["adapted"] if results else None
    if a is not None:
        how = ("no adaptation: not adapting scored best on validation" if not a["steps"]
               else f"{a['steps']} steps at lr {a['lr']:g} ({'given' if a['source'] == 'given' else 'chosen on validation'})")
        print(f"adapted {a['params']} ({a['trainable']:,} values) to the {len(args.support)} support(s): {how}, "
              f"{a['seconds']:.1f} s")
    for r in results:
        renamed = " (renamed: another query has the same file name)" if r.get("renamed") else ""
        fg = pct(r["foreground_fraction"], digits=1, unit="%")
        print(f"{r['query']}: {r['mask']} ({fg} foreground), {r['overlay']}{renamed}")
    return 0


def cmd_report(args) -> int:
    from svfseg.report import report

    print(report(args.runs, args.out, as_paper=args.as_paper))
    return 0


def cmd_merge(args) -> int:
    from svfseg.engine.model import check_merge_out, export_merged_checkpoint, nothing_to_merge

    check_merge_out(args.checkpoint, args.out, overwrite=args.overwrite)
    reason = nothing_to_merge(args.checkpoint)
    if reason:
        print(f"nothing to merge: {reason}")
        return 0
    path = export_merged_checkpoint(args.checkpoint, args.out)
    print(f"merged model written to {path} ({path.stat().st_size / 1e6:.1f} MB); use it with "
          f"`svfseg test --checkpoint {path}` or `svfseg predict --checkpoint {path} ...`")
    return 0


def cmd_prepare(args) -> int:
    from svfseg.data.prepare import run_prepare

    return run_prepare(args)


def cmd_serve(args) -> int:
    from svfseg.serve.cli import run_serve_cli

    return run_serve_cli(args)


def cmd_convert(args) -> int:
    from svfseg.convert import run_convert_cli

    return run_convert_cli(args)


def cmd_demo(args) -> int:
    from svfseg.demo import run_demo_cli

    with _tqdm_safe_logging():
        return run_demo_cli(args)


def cmd_compare(args) -> int:
    from svfseg.compare import run_compare_cli

    with _tqdm_safe_logging():
        return run_compare_cli(args)


class UsageError(ValueError):
    """Wrong command-line use."""


COMMANDS = {"train": cmd_train, "test": cmd_test, "predict": cmd_predict, "report": cmd_report,
            "merge": cmd_merge, "prepare": cmd_prepare, "demo": cmd_demo, "serve": cmd_serve,
            "episodes": cmd_episodes, "compare": cmd_compare, "convert": cmd_convert}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (errors print one line, no traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    _take_late_overrides(parser, args, extras)
    args.command_line = ["svfseg", *argv]  # what meta.json records, also when main() is called in-process
    _setup_logging(args.verbose)
    from svfseg.config import ConfigError
    from svfseg.engine.checkpoint import CheckpointError, CheckpointMismatch
    from svfseg.engine.loop import NonFiniteLoss
    from svfseg.engine.runlock import RunLocked
    from svfseg.predict import PredictInputError

    # Anticipated failures print one line (--debug or SVFSEG_DEBUG=1 for the traceback);
    # ValueError covers bad values found deeper down (e.g. a model name the registry does not
    # know), OSError a folder that cannot be written, a full disk, a missing file.
    expected = (ConfigError, CheckpointMismatch, CheckpointError, NonFiniteLoss, PredictInputError, UsageError,
                RunLocked, ValueError, OSError)
    try:
        from svfseg.data.io import DataError

        expected = expected + (DataError,)
    except ImportError:  # pragma: no cover
        pass
    debug = args.debug or os.environ.get("SVFSEG_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except expected as e:
        if debug:
            raise
        print(f"svfseg {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, UsageError)) else 1
    except KeyboardInterrupt:
        print(f"svfseg {args.command}: interrupted", file=sys.stderr)
        return 130


#: A ``key=value`` config override as users type it (``fold=1``, ``optim.lr_mult.svf=10``).
_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def _take_late_overrides(parser: argparse.ArgumentParser, args, extras: Sequence[str]) -> None:
    """Append to ``args.overrides`` the ``key=value`` items argparse left over; refuse anything else.

    argparse fills a ``nargs="*"`` positional from one run of positionals only, so in
    ``episodes --config C fold=1 --count 5 shot=5`` the ``shot=5`` after the option is left over.
    The first run is always the earliest, so appending keeps the order typed (a later override wins).
    """
    late = [x for x in extras if _OVERRIDE.match(x)] if hasattr(args, "overrides") else []
    rest = [x for x in extras if x not in late]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        args.overrides = [*args.overrides, *late]


def error_line(e: BaseException) -> str:
    """The message of an anticipated error; an OSError as ``<file>: <what went wrong>``."""
    if isinstance(e, UnicodeEncodeError) and isinstance(e.object, str) and "surrogates" in e.reason:
        # a file name the file system gave as bytes that are not UTF-8, met while writing text: name it
        start = e.object.rfind("\n", 0, e.start) + 1
        end = e.object.find("\n", e.start)
        where = e.object[start:end if end >= 0 else len(e.object)][:200]
        return (f"expected UTF-8 names, found one that is not UTF-8 in "
                f"'{os.fsencode(where).decode('utf-8', 'backslashreplace')}'; rename that file or folder")
    if isinstance(e, OSError) and type(e).__str__ is OSError.__str__ and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e)
