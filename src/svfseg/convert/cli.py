"""`svfseg convert` arguments and what it prints."""
from __future__ import annotations

import argparse
from pathlib import Path

from svfseg.convert.converter import BENCHMARKS, FORMATS, RECIPE_SUFFIX, convert_checkpoint

__all__ = ["add_convert_arguments", "run_convert_cli"]

#: The test protocol each upstream method reports its numbers with (their test.py).
PROTOCOL = {"pfenet": "pfenet", "bam": "bam"}


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg convert`."""
    parser.add_argument("--from", dest="fmt", required=True, choices=sorted(FORMATS),
                        help="upstream format: pfenet (dvlab-research/PFENet), bam (chunbolang/BAM stage 2), "
                             "bam_base (BAM's stage-1 PSPNet)")
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="the upstream .pth file")
    parser.add_argument("--backbone", choices=sorted(RECIPE_SUFFIX),
                        help="default: read from the file's keys")
    parser.add_argument("--benchmark", choices=BENCHMARKS,
                        help="what it was trained on (default: BAM's class count says; else pascal)")
    parser.add_argument("--fold", type=int, default=0, help="the fold it was trained for (default 0; upstream "
                                                            "files do not record it)")
    parser.add_argument("--shot", type=int, help="K (default: BAM's K-shot weights say; else 1, and PFENet's "
                                                 "weights serve any K)")
    parser.add_argument("--out", type=Path, required=True, help="the svfseg model file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def run_convert_cli(args: argparse.Namespace) -> int:
    """Run `svfseg convert`; returns the exit status."""
    res = convert_checkpoint(args.checkpoint, args.fmt, args.out, backbone=args.backbone, benchmark=args.benchmark,
                             fold=args.fold, shot=args.shot, overwrite=args.overwrite)
    read = f" (read from the file: {', '.join(res.inferred)})" if res.inferred else ""
    protocol = PROTOCOL.get(args.fmt)
    score = (f"svfseg test --checkpoint {res.out} --protocol {protocol} data.root=data/{res.benchmark}"
             if protocol else f"svfseg test --checkpoint {res.out} data.root=data/{res.benchmark}")
    print(f"converted {args.checkpoint} ({args.fmt}, sha256 {res.sha256[:16]}...) -> {res.out}\n"
          f"model {res.model} on {res.backbone}, {res.benchmark} fold {res.fold}, {res.shot}-shot{read}; "
          f"{res.tensors} tensors\n"
          f"score it: {score}\n"
          f"use it:   svfseg predict --checkpoint {res.out} --support IMG MASK --query Q --out preds\n"
          f"train from it: svfseg train --config configs/{res.benchmark}/{res.model}_"
          f"{RECIPE_SUFFIX[res.backbone]}.yaml fold={res.fold} model.init_from={res.out}")
    return 0
