"""Few-shot episodes: the episodic loss, per-class IoU over novel classes, protocol scoring of a checkpoint."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.engine.adapt.run import Adaptation
from svfseg.engine.data import eval_dataset, eval_protocol, heldout_base_fold, train_dataset
from svfseg.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum
from svfseg.engine.evaluator import evaluation_loop, predictions_at_original_size
from svfseg.engine.model import MERGED_FORMAT, describe
from svfseg.engine.resolved import ResolvedRun
from svfseg.engine.runfolder import RunFolder
from svfseg.engine.runtime import autocast, to_device, unwrap
from svfseg.engine.state import Resume
from svfseg.engine.tasks.base import EvalSet, Task, TestOptions, ValResult
from svfseg.engine.losses import fewshot_loss, valid_pixel_count
from svfseg.metrics import IoUAccumulator
from svfseg.regimes import NO_ADAPTATION, adapt_trains
from svfseg.results import STD_NOTE, markdown_table, pct, summarize_runs

logger = logging.getLogger(__name__)


def forward_episode(model: nn.Module, batch: dict, device: torch.device):
    """Call a few-shot model on a collated batch; models with ``uses_class_ids`` also get the class ids."""
    args = to_device(batch, ("query_img", "support_imgs", "support_masks"), device)
    if getattr(unwrap(model), "uses_class_ids", False):
        return model(*args, class_ids=torch.as_tensor(batch["class_id"]).to(device))
    return model(*args)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    class_ids: Sequence[int],
    device: torch.device,
    info: Optional[DistInfo] = None,
    amp: str = "off",
    batch_size: int = 1,
    workers: int = 0,
    progress: bool = False,
    desc: str = "eval",
    vis_dir: Optional[Path] = None,
    num_vis: int = 0,
    upstream_padding: bool = False,
    empty_class: str = "drop",
    per_episode: bool = False,
) -> dict:
    """Score a few-shot model on fixed episodes.

    Intersections and unions are summed per class over all episodes (integers), so the result
    does not depend on the batch size, and under DDP each process scores every W-th episode
    and the sums are all-reduced: exactly the single-process result.

    Args:
        model: few-shot model (eval mode is set here and restored afterwards).
        dataset: evaluation episodes (items with ``query_label_orig`` and ``query_valid_hw``).
        class_ids: classes mIoU averages over (the fold's novel classes).
        device: where to run.
        info: process-group info (None: single process).
        amp: ``train.amp`` mode.
        batch_size: episodes per forward pass.
        workers: DataLoader workers.
        progress: show a tqdm bar (main process).
        desc: bar label.
        vis_dir: where to write overlay PNGs of the first ``num_vis`` episodes.
        num_vis: number of overlays.
        upstream_padding: score with PFENet/BAM's geometry (the dataset must have been built
            with it too: ``eval.upstream_padding``).
        empty_class: how a class without episodes counts (see :meth:`IoUAccumulator.compute`).
        per_episode: also return each episode's counts (``per_episode``: dataset index, class,
            [inter_fg, union_fg, inter_bg, union_bg]), for paired bootstraps over episodes.

    Returns:
        :meth:`IoUAccumulator.compute` plus ``seconds`` and ``episode_fingerprint`` (and ``per_episode``).
    """
    info = info or DistInfo(device=device)
    acc = IoUAccumulator(class_ids)
    records: list = []

    def on_batch(net: nn.Module, batch: dict, indices: Sequence[int]) -> None:
        logits = forward_episode(net, batch, device)
        labels = batch["query_label_orig"]
        preds = predictions_at_original_size(logits, batch["query_valid_hw"], [tuple(x.shape) for x in labels],
                                             upstream=upstream_padding)
        for b, (pred, gt) in enumerate(zip(preds, labels)):
            counts = acc.update(pred.cpu(), gt, int(batch["class_id"][b]))
            if per_episode:
                records.append([int(indices[b]), int(batch["class_id"][b]), *[int(v) for v in counts]])
            if vis_dir is not None and indices[b] < num_vis:
                from svfseg.engine.vis import save_episode_overlay

                save_episode_overlay(Path(vis_dir) / f"episode_{indices[b]:05d}_class{int(batch['class_id'][b])}.png",
                                     batch, b, pred, gt)

    def running() -> dict:
        r = acc.compute()
        return {"mIoU": f"{100 * r['miou']:.1f}", "FB": f"{100 * r['fb_iou']:.1f}"}

    seconds = evaluation_loop(model, dataset, on_batch, info=info, device=device, amp=amp, batch_size=batch_size,
                              workers=workers, progress=progress, desc=desc, postfix=running)
    acc.load_tensor(all_reduce_sum(acc.as_tensor(), info))
    result = acc.compute(empty_class)
    result["seconds"] = seconds
    episodes = getattr(dataset, "episodes", None)
    result["episode_fingerprint"] = getattr(episodes, "fingerprint", None)
    if per_episode:
        result["per_episode"] = sorted(all_gather_objects(records, info))
    return result


def protocol_runs(cfg: ExperimentConfig, protocol: str) -> list[tuple[int, int]]:
    """(seed, episode count) pairs of a protocol, with ``eval.seeds``/``eval.num_episodes`` overrides."""
    runs = eval_protocol(cfg, protocol).runs(cfg.data.benchmark)
    if cfg.eval.seeds:
        runs = [(s, runs[0][1]) for s in cfg.eval.seeds]
    if cfg.eval.num_episodes:
        runs = [(s, cfg.eval.num_episodes) for s, _ in runs]
    return runs


class FewShotTask(Task):
    """Episodes of the fold's base classes in training; mIoU over its novel classes in testing."""

    name = "fewshot"

    def train_data(self, run: ResolvedRun) -> Dataset:
        return train_dataset(run)

    def eval_set(self, run: ResolvedRun, folder: RunFolder, info: DistInfo,
                 resume: Optional[Resume] = None) -> Optional[EvalSet]:
        """The validation episodes checkpoints are selected on, fixed in a file in the run folder.

        ``train.select_on=test_fold`` (what the published methods do) or ``last`` validates on the test
        fold's novel classes; ``base_heldout`` on val-split episodes of base classes (the novel
        classes of fold ``(fold+1) % 4``), so the test fold is never looked at before testing.
        A resume reads the run's file back when ``resume`` says it is there; a fresh run makes new
        episodes (a file found in the run folder is an earlier run's, `train --overwrite`, made perhaps
        with other settings) and leaves the writing to the engine (``save_to``).
        ``train.val_episodes_file`` is read when it exists, else made (every process makes the same
        episodes from the seed; the main one writes them).
        """
        from svfseg.data.episodes import EpisodeList

        cfg, bench = run.cfg, run.bench
        if not cfg.train.val_every:
            return None
        on = "base_heldout" if cfg.train.select_on == "base_heldout" else "test_fold"
        fold = heldout_base_fold(cfg.fold, bench.num_folds) if on == "base_heldout" else cfg.fold
        if cfg.train.val_episodes_file:
            path = Path(cfg.train.val_episodes_file)
            saved = path if path.exists() else None
        else:
            path = folder.val_episodes(on)
            saved = resume.validation_file(on) if resume is not None else None
        if saved is not None:
            ds, save_to = eval_dataset(run, fold=fold, episodes=EpisodeList.load(saved)), None
        else:
            ds = eval_dataset(run, fold=fold, seed=cfg.train.val_seed, count=cfg.train.val_episodes)
            save_to = path
        logger.info("validation (%s): %d fixed episodes %s %s (fingerprint %s)", on, len(ds),
                    "to be kept in" if save_to else "from", path, ds.episodes.fingerprint)
        return EvalSet(ds, bench.split(fold).novel, on, save_to=save_to)

    def loss(self, model, batch, cfg, info, dtype):
        device = info.device
        target = batch["query_mask"].to(device, non_blocking=device.type == "cuda")
        normalizer = None
        if info.distributed:
            # Divide the summed CE by the global pixel count (x world size, since DDP averages the
            # gradients) so W processes compute exactly the gradient of one process on the batch.
            normalizer = all_reduce_sum(valid_pixel_count(target), info) / info.world_size
        with autocast(device, dtype):
            out = forward_episode(model, batch, device)
        logits, aux = (out.logits, tuple(out.aux_logits)) if hasattr(out, "logits") else (out, ())
        loss, parts = fewshot_loss(logits, aux, target, aux_weight=cfg.train.aux_weight, normalizer=normalizer)
        stats = torch.stack([loss.detach(), parts["main"], parts["aux"]]).float()
        if info.distributed:
            # Each process's share is normalised by global pixels / W, so the sum over the W
            # processes is W times the batch loss.
            stats = all_reduce_sum(stats, info) / info.world_size
        return loss, stats

    def validate(self, model, val, cfg, info) -> ValResult:
        r = evaluate(model, val.dataset, class_ids=val.class_ids, device=info.device, info=info, amp=cfg.train.amp,
                     batch_size=cfg.eval.batch_size, workers=cfg.data.workers, progress=cfg.train.progress,
                     desc=f"val ({val.on})", upstream_padding=cfg.eval.upstream_padding,
                     empty_class=eval_protocol(cfg).empty_class)
        return ValResult(
            row={"on": val.on, "miou": r["miou"], "fb_iou": r["fb_iou"], "episodes": r["episodes"]},
            best={"on": val.on, "miou": r["miou"], "fb_iou": r["fb_iou"],
                  "per_class": {str(k): v for k, v in r["per_class"].items()},
                  "episode_fingerprint": r["episode_fingerprint"]},
            message=("step %d: val (%s) mIoU %.2f FB-IoU %.2f over %d episodes%s",
                     val.on, 100 * r["miou"], 100 * r["fb_iou"], r["episodes"]))

    def results_folder(self, cfg: ExperimentConfig, options: TestOptions) -> str:  # noqa: D102 - see Task
        adapt = f"_adapt-{cfg.adapt.params}" if adapt_trains(cfg.adapt.params) else ""
        return f"test_{'file' if options.episodes else options.protocol or cfg.eval.protocol}_{cfg.shot}shot{adapt}"

    def score(self, checkpoint, model, run: ResolvedRun, state, options: TestOptions, out_dir: Path,
              info: DistInfo) -> dict:
        """Every run of the protocol (or the one episode file) on the loaded checkpoint."""
        cfg = run.cfg
        protocol, episodes, save_vis = options.protocol or cfg.eval.protocol, options.episodes, options.save_vis
        classes = run.bench.split(cfg.fold).novel
        runs = [(None, None)] if episodes else protocol_runs(cfg, protocol)
        # An episode file is scored with the empty-class rule of the config's protocol.
        proto = eval_protocol(cfg, None if episodes else protocol)
        results = []
        adaptation = Adaptation.prepare(model, run, info) if adapt_trains(cfg.adapt.params) else None
        for i, (seed, count) in enumerate(runs):
            ds = (eval_dataset(run, episodes=episodes) if episodes
                  else eval_dataset(run, seed=seed, count=count, order=proto.order))
            name = f"episode seed {seed}" if seed is not None else Path(episodes).name
            if adaptation is not None and adaptation.choice.steps:
                r = adaptation.score(ds, classes, cfg, info, desc=f"test {name} (adapt {cfg.adapt.params})",
                                     empty_class=proto.empty_class)
            else:  # the plain test (also when the validation chose not to adapt)
                r = evaluate(model, ds, class_ids=classes, device=info.device, info=info, amp=cfg.train.amp,
                             batch_size=cfg.eval.batch_size, workers=cfg.data.workers, progress=cfg.train.progress,
                             desc=f"test {name}", vis_dir=out_dir / "vis" if save_vis and i == 0 else None,
                             num_vis=save_vis, upstream_padding=cfg.eval.upstream_padding,
                             empty_class=proto.empty_class, per_episode=options.per_episode or adaptation is not None)
                r["seconds_per_episode"] = r["seconds"] / max(r["episodes"], 1)
            r.update(seed=ds.episodes.seed, episode_count=len(ds), order=ds.episodes.order,
                     dataset_fingerprint=ds.episodes.dataset_fingerprint)
            logger.info("%s: mIoU %.2f  FB-IoU %.2f  (%d episodes, fingerprint %s)", name, 100 * r["miou"],
                        100 * r["fb_iou"], r["episodes"], r["episode_fingerprint"])
            results.append(r)
        if save_vis and info.is_main:
            logger.info("%d overlays in %s", save_vis, out_dir / "vis")
        out = _assemble(checkpoint, run, state, model, protocol if not episodes else "file", results)
        out["empty_class"] = proto.empty_class
        out["order"] = results[0]["order"]
        out["adapt"] = adaptation.record() if adaptation is not None else {"params": NO_ADAPTATION}
        return out

    def headline(self, results: dict) -> str:  # noqa: D102 - see Task
        return "wrote results.json and results.md"

    def markdown(self, results: dict) -> str:
        return results_markdown(results)


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
        protocol: a name in ``svfseg.data.episodes.PROTOCOLS`` (default ``cfg.eval.protocol``); ignored with
            ``episodes``.
        episodes: an episode file to use instead of a protocol.
        save_vis: overlay PNGs to write (from the first run).
        out_dir: output folder (default: next to the checkpoint, ``test_<protocol>_<K>shot``).
        info: process-group info (episodes are sharded across processes).

    Returns:
        The results dict (also written to ``results.json``).
    """
    return FewShotTask().test(checkpoint, cfg, TestOptions(protocol=protocol, episodes=episodes, save_vis=save_vis,
                                                           out_dir=out_dir), info or DistInfo())


def _assemble(checkpoint, run: ResolvedRun, state: dict, model, protocol: str, results: list[dict]) -> dict:
    cfg, bench = run.cfg, run.bench
    names = bench.class_names
    classes = bench.split(cfg.fold).novel
    per_class_mean = {str(c): _mean([r["per_class"][c] for r in results]) for c in classes}
    runs = [{"seed": r["seed"], "episodes": r["episodes"], "episode_fingerprint": r["episode_fingerprint"],
             "dataset_fingerprint": r.get("dataset_fingerprint"),
             "miou": r["miou"], "fb_iou": r["fb_iou"], "seconds": r["seconds"],
             "seconds_per_episode": r.get("seconds_per_episode"),
             "per_class": {str(c): v for c, v in r["per_class"].items()},
             **({"per_episode": r["per_episode"]} if "per_episode" in r else {})} for r in results]
    return {
        "checkpoint": str(checkpoint), "step": state.get("step"),
        "benchmark": cfg.data.benchmark, "fold": cfg.fold, "shot": cfg.shot, "protocol": protocol,
        "train_seed": cfg.seed, "num_folds": bench.num_folds,
        "model": cfg.model.name, "backbone": cfg.model.backbone,
        "regime": cfg.model.regime,
        "merged": state.get("format") == MERGED_FORMAT, "describe": describe(model, run),
        "novel_classes": list(classes), "class_names": {str(c): names[c - 1] for c in classes},
        "runs": runs,
        "summary": {"miou": summarize_runs(r["miou"] for r in results),
                    "fb_iou": summarize_runs(r["fb_iou"] for r in results)},
        "per_class_mean": per_class_mean,
    }


def _mean(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _rules_note(out: dict) -> str:
    """How the queries were walked and how a class without episodes counted (results since issue 20)."""
    parts = []
    if out.get("order"):
        parts.append(f"queries walked {'in list order' if out['order'] == 'list' else 'in seeded permutations'}")
    if out.get("empty_class"):
        parts.append("a class without episodes " + ("scores 0 (PFENet/BAM)" if out["empty_class"] == "zero"
                                                      else "is left out of mIoU"))
    return "; " + ", ".join(parts) if parts else ""


def _adapt_note(adapt: dict) -> list[str]:
    """The results.md paragraph on test-time adaptation (none without it)."""
    if not adapt_trains(adapt.get("params", NO_ADAPTATION)):
        return []
    c = adapt["chosen"]
    how = ("as given" if c["source"] == "given" else
           f"chosen on {c['val_episodes']} base-class validation episodes (fold {c['val_fold']}'s classes; "
           + ", ".join(f"{k}: {pct(v)}" for k, v in c["trials"].items()) + ")")
    what = "no adaptation (the plain test)" if not c["steps"] else f"{c['steps']} {adapt['optimizer']} steps at lr {c['lr']:g}"
    return [f"Adapted on each episode's supports: **{adapt['params']}** ({adapt['trainable']:,} values), {what}, {how}.",
            ""]


def results_markdown(out: dict) -> str:
    """The Markdown report of one ``svfseg test`` run."""
    s = out["summary"]
    lines = [
        f"# {out['model']} / {out['backbone']} ({out['regime']}) on {out['benchmark']} fold {out['fold']}, "
        f"{out['shot']}-shot",
        "",
        f"checkpoint `{out['checkpoint']}` (step {out['step']}), protocol **{out['protocol']}**, "
        f"scored at the original label size; mIoU over the fold's novel classes {out['novel_classes']}"
        + _rules_note(out) + ".",
        "",
    ]
    lines += _adapt_note(out.get("adapt") or {})
    rows = [[f"episode seed {r['seed']}", str(r["episodes"]), f"`{r['episode_fingerprint']}`", pct(r["miou"]),
             pct(r["fb_iou"])] for r in out["runs"]]
    if len(out["runs"]) > 1:
        rows.append([f"**mean ± std ({STD_NOTE})**", "", "", f"**{pct(s['miou']['mean'])} ± {pct(s['miou']['std'])}**",
                     f"{pct(s['fb_iou']['mean'])} ± {pct(s['fb_iou']['std'])}"])
        rows.append(["best", "", "", pct(s["miou"]["best"]), pct(s["fb_iou"]["best"])])
    lines += [markdown_table(["run", "episodes", "episode fingerprint", "mIoU (%)", "FB-IoU (%)"], rows), ""]
    iou = "IoU (%)" + (" (mean over runs)" if len(out["runs"]) > 1 else "")
    lines.append(markdown_table(["class", "name", iou],
                                [[c, out["class_names"][c], pct(v)] for c, v in out["per_class_mean"].items()]))
    return "\n".join(lines) + "\n"
