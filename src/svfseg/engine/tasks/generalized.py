"""The generalized few-shot setting: base and novel classes scored together, for models that predict both."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.engine.distributed import DistInfo, all_reduce_sum
from svfseg.engine.evaluator import at_label_size, evaluation_loop
from svfseg.engine.resolved import ResolvedRun
from svfseg.engine.runtime import to_device, unwrap
from svfseg.engine.tasks.base import Task, TestOptions
from svfseg.metrics import ConfusionMatrix
from svfseg.results import markdown_table, pct

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_generalized(model: nn.Module, dataset: Dataset, *, device: torch.device, tau: float = 0.9,
                         info: Optional[DistInfo] = None, amp: str = "off", workers: int = 0,
                         progress: bool = False) -> dict:
    """Score a model in the generalized setting: base and novel classes at once.

    The model provides ``forward_parts(query, supports, masks)`` (with ``final`` few-shot and
    ``base`` semantic logits) and ``generalized_prediction(final, base, tau)``; both maps are
    cropped to the un-padded extent and resized (bilinear) to the original label size. Base
    classes accumulate over every episode; the novel label of an episode counts for that
    episode's novel class.

    Args:
        model: A model with ``forward_parts`` and ``generalized_prediction``.
        dataset: :class:`~svfseg.data.generalized.GeneralizedEpisodes`.
        device: Where to run.
        tau: Novel-class probability threshold.
        info: Process-group info (episodes are sharded, sums reduced).
        amp: ``train.amp`` mode.
        workers: DataLoader workers.
        progress: Show a progress bar.

    Returns:
        ``miou_base``, ``miou_novel``, ``miou_total`` (means of per-class IoU over the base, the
        novel and all classes), ``per_class`` {benchmark id: IoU}, ``episodes``, ``tau``, ``seconds``.
    """
    from svfseg.models.blocks import resize

    info = info or DistInfo(device=device)
    net = unwrap(model)
    if not hasattr(net, "forward_parts") or not hasattr(net, "generalized_prediction"):
        raise TypeError(f"evaluate_generalized: {type(net).__name__} does not predict base and novel classes "
                        f"(needs forward_parts and generalized_prediction)")
    novel, base = tuple(dataset.novel_classes), tuple(dataset.base_classes)
    nb = len(base)
    slot = {c: nb + 1 + i for i, c in enumerate(novel)}  # the novel label of an episode -> its class's slot
    cm = ConfusionMatrix(nb + 1 + len(novel))
    seen = [0]

    def on_batch(net: nn.Module, batch: dict, indices) -> None:
        parts = net.forward_parts(*to_device(batch, ("query_img", "support_imgs", "support_masks"), device))
        size = batch["query_img"].shape[-2:]
        final, basel = resize(parts.final, size), resize(parts.base, size)
        for b, gt in enumerate(batch["query_label_orig"]):
            hw, size0 = batch["query_valid_hw"][b], tuple(gt.shape)
            pred = net.generalized_prediction(at_label_size(final[b:b + 1], hw, size0),
                                              at_label_size(basel[b:b + 1], hw, size0), tau)[0].cpu()
            k = slot[int(batch["class_id"][b])]
            pred[pred == nb + 1] = k
            target = gt.clone()
            target[target == nb + 1] = k
            cm.update(pred, target)
            seen[0] += 1

    seconds = evaluation_loop(model, dataset, on_batch, info=info, device=device, amp=amp, batch_size=1,
                              workers=workers, progress=progress, desc="test (generalized)")
    cm.mat = all_reduce_sum(cm.mat.reshape(-1), info).reshape(cm.num_classes, cm.num_classes).cpu()
    r = cm.compute(base + novel)
    per = r["per_class"]
    vals = lambda ids: [per[c] for c in ids if not math.isnan(per[c])]  # noqa: E731
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return {"miou_base": mean(vals(base)), "miou_novel": mean(vals(novel)), "miou_total": mean(vals(base + novel)),
            "per_class": per, "episodes": int(all_reduce_sum(torch.tensor([seen[0]]), info).item()), "tau": tau,
            "seconds": seconds}


class GeneralizedTask(Task):
    """Test only: episodes whose query is scored on the base classes and the episode's novel class."""

    name = "generalized"

    def results_folder(self, cfg: ExperimentConfig, options: TestOptions) -> str:  # noqa: D102 - see Task
        return f"test_generalized_{cfg.shot}shot"

    def score(self, checkpoint, model, run: ResolvedRun, state, options: TestOptions, out_dir: Path,
              info: DistInfo, seed: int = 0) -> dict:
        """Generalized-setting score of a checkpoint (episode seed ``seed``)."""
        from svfseg.data.generalized import build_generalized

        cfg, bench = run.cfg, run.bench
        d = cfg.data
        # eval.num_episodes caps the episode count (one per val image otherwise).
        ds = build_generalized(bench, fold=cfg.fold, shot=cfg.shot, seed=seed, test_size=d.test_size,
                               count=cfg.eval.num_episodes)
        r = evaluate_generalized(model, ds, device=info.device, tau=options.tau, info=info, amp=cfg.train.amp,
                                 workers=cfg.data.workers, progress=cfg.train.progress)
        out = {"checkpoint": str(checkpoint), "setting": "generalized", "benchmark": d.benchmark, "fold": cfg.fold,
               "shot": cfg.shot, "seed": seed, "episode_fingerprint": ds.episodes.fingerprint, **r,
               "class_names": list(bench.class_names),
               "per_class": {str(k): v for k, v in r["per_class"].items()}}
        return out

    def headline(self, r: dict) -> str:  # noqa: D102 - see Task
        return (f"generalized: mIoU novel {pct(r['miou_novel'])}  base {pct(r['miou_base'])}  "
                f"total {pct(r['miou_total'])} over {r['episodes']} episodes")

    def markdown(self, r: dict) -> str:
        from svfseg.data.splits import class_names

        names = r.get("class_names") or class_names(r["benchmark"])
        lines = [f"# Generalized setting, {r['benchmark']} fold {r['fold']}, {r['shot']}-shot", "",
                 f"{r['episodes']} episodes (episode seed {r['seed']}), tau {r['tau']}; base and novel classes scored "
                 "together.", "",
                 markdown_table(["score", "%"], [["mIoU novel", pct(r["miou_novel"])], ["mIoU base", pct(r["miou_base"])],
                                                 ["mIoU total", pct(r["miou_total"])]]), "",
                 markdown_table(["class", "IoU %"],
                                [[f"{int(c)} {names[int(c) - 1]}", pct(v)] for c, v in r["per_class"].items()])]
        return "\n".join(lines) + "\n"
