"""`svfseg test`: score a checkpoint under a protocol (one or several seeds), write JSON + Markdown."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from svfseg.config import ExperimentConfig
from svfseg.engine.data import eval_dataset, novel_classes
from svfseg.engine.distributed import DistInfo, barrier
from svfseg.engine.evaluate import evaluate
from svfseg.engine.model import describe, load_for_inference
from svfseg.metrics import format_pct, summarize_runs

logger = logging.getLogger(__name__)


def protocol_runs(cfg: ExperimentConfig, protocol: str) -> list[tuple[int, int]]:
    """(seed, episode count) pairs of a protocol, with ``eval.seeds``/``eval.num_episodes`` overrides."""
    from svfseg.data.episodes import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    runs = PROTOCOLS[protocol].runs(cfg.data.benchmark)
    if cfg.eval.seeds:
        runs = [(s, runs[0][1]) for s in cfg.eval.seeds]
    if cfg.eval.num_episodes:
        runs = [(s, cfg.eval.num_episodes) for s, _ in runs]
    return runs


def score_checkpoint(
    checkpoint: str | Path,
    cfg: Optional[ExperimentConfig] = None,
    *,
    protocol: Optional[str] = None,
    episodes: Optional[str | Path] = None,
    save_vis: int = 0,
    out_dir: Optional[str | Path] = None,
    info: Optional[DistInfo] = None,
) -> dict:
    """Evaluate a checkpoint on fixed episodes and write ``results.json`` + ``results.md``.

    Args:
        checkpoint: training checkpoint or merged export.
        cfg: config (data root, fold, shot, eval settings); None: the checkpoint's own. The
            checkpoint must describe the same model, fold and class count.
        protocol: "pfenet" | "bam" | "hsnet" (default ``cfg.eval.protocol``); ignored with ``episodes``.
        episodes: an episode file to use instead of a protocol.
        save_vis: overlay PNGs to write (from the first run).
        out_dir: output folder (default: next to the checkpoint, ``test_<protocol>_<K>shot``).
        info: process-group info (episodes are sharded across processes).

    Returns:
        The results dict (also written to ``results.json``).
    """
    info = info or DistInfo()
    model, cfg, state = load_for_inference(checkpoint, cfg, device=info.device)
    protocol = protocol or cfg.eval.protocol
    label = "file" if episodes else protocol
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent / f"test_{label}_{cfg.shot}shot"
    classes = novel_classes(cfg)
    runs = [(None, None)] if episodes else protocol_runs(cfg, protocol)
    results = []
    for i, (seed, count) in enumerate(runs):
        ds = eval_dataset(cfg, episodes=episodes) if episodes else eval_dataset(cfg, seed=seed, count=count)
        name = f"seed {seed}" if seed is not None else Path(episodes).name
        r = evaluate(model, ds, class_ids=classes, device=info.device, info=info, amp=cfg.train.amp,
                     batch_size=cfg.eval.batch_size, workers=cfg.data.workers, progress=cfg.train.progress,
                     desc=f"test {name}", vis_dir=out_dir / "vis" if save_vis and i == 0 else None,
                     num_vis=save_vis)
        r.update(seed=ds.episodes.seed, episode_count=len(ds))
        logger.info("%s: mIoU %.2f  FB-IoU %.2f  (%d episodes, fingerprint %s)", name, 100 * r["miou"],
                    100 * r["fb_iou"], r["episodes"], r["episode_fingerprint"])
        results.append(r)
    out = _assemble(checkpoint, cfg, state, model, protocol if not episodes else "file", results)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(out, indent=1))
        (out_dir / "results.md").write_text(results_markdown(out))
        logger.info("wrote %s and results.md%s", out_dir / "results.json",
                    f" and {save_vis} overlays in {out_dir / 'vis'}" if save_vis else "")
    barrier(info)
    out["out_dir"] = str(out_dir)
    return out


def _assemble(checkpoint, cfg: ExperimentConfig, state: dict, model, protocol: str, results: list[dict]) -> dict:
    from svfseg.data.splits import class_names

    names = class_names(cfg.data.benchmark)
    classes = novel_classes(cfg)
    per_class_mean = {str(c): _mean([r["per_class"][c] for r in results]) for c in classes}
    runs = [{"seed": r["seed"], "episodes": r["episodes"], "episode_fingerprint": r["episode_fingerprint"],
             "miou": r["miou"], "fb_iou": r["fb_iou"], "seconds": r["seconds"],
             "per_class": {str(c): v for c, v in r["per_class"].items()}} for r in results]
    d = describe(model, cfg)
    return {
        "checkpoint": str(checkpoint), "step": state.get("step"),
        "benchmark": cfg.data.benchmark, "fold": cfg.fold, "shot": cfg.shot, "protocol": protocol,
        "model": cfg.model.name, "backbone": cfg.model.backbone,
        "regime": "svf" if cfg.svf.enabled else cfg.model.backbone_mode,
        "merged": state.get("format") == "svfseg-merged-v1", "describe": d,
        "novel_classes": list(classes), "class_names": {str(c): names[c - 1] for c in classes},
        "runs": runs,
        "summary": {"miou": summarize_runs(r["miou"] for r in results),
                    "fb_iou": summarize_runs(r["fb_iou"] for r in results)},
        "per_class_mean": per_class_mean,
    }


def _mean(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def results_markdown(out: dict) -> str:
    """The Markdown report of one ``svfseg test`` run."""
    s = out["summary"]
    lines = [
        f"# {out['model']} / {out['backbone']} ({out['regime']}) on {out['benchmark']} fold {out['fold']}, "
        f"{out['shot']}-shot",
        "",
        f"checkpoint `{out['checkpoint']}` (step {out['step']}), protocol **{out['protocol']}**, "
        f"scored at the original label size; mIoU over the fold's novel classes {out['novel_classes']}.",
        "",
        "| run | episodes | episode fingerprint | mIoU (%) | FB-IoU (%) |",
        "|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        lines.append(f"| seed {r['seed']} | {r['episodes']} | `{r['episode_fingerprint']}` | {format_pct(r['miou'])} "
                     f"| {format_pct(r['fb_iou'])} |")
    if len(out["runs"]) > 1:
        lines.append(f"| **mean ± std** | | | **{format_pct(s['miou']['mean'])} ± {format_pct(s['miou']['std'])}** "
                     f"| {format_pct(s['fb_iou']['mean'])} ± {format_pct(s['fb_iou']['std'])} |")
        lines.append(f"| best | | | {format_pct(s['miou']['best'])} | {format_pct(s['fb_iou']['best'])} |")
    lines += ["", "| class | name | IoU (%)" + (" (mean over runs)" if len(out["runs"]) > 1 else "") + " |",
              "|---|---|---|"]
    for c, v in out["per_class_mean"].items():
        lines.append(f"| {c} | {out['class_names'][c]} | {format_pct(v)} |")
    return "\n".join(lines) + "\n"
