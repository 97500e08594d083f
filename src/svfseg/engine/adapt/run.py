"""The adaptation of one `svfseg test`: the adapter built once, its settings chosen once, then every run scored."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.data.benchmark import Benchmark
from svfseg.engine.adapt.adapter import EpisodeAdapter
from svfseg.engine.adapt.score import AdaptChoice, adapted_evaluation, choose_adaptation
from svfseg.engine.distributed import DistInfo
from svfseg.models.fewshot import FewShotModel


@dataclass
class Adaptation:
    """An :class:`EpisodeAdapter` for a loaded model and the :class:`AdaptChoice` it runs with."""

    adapter: EpisodeAdapter
    choice: AdaptChoice
    settings: dict
    prepare_seconds: float

    @classmethod
    def prepare(cls, model: FewShotModel, cfg: ExperimentConfig, bench: Benchmark, info: DistInfo) -> Adaptation:
        """Build the working copy (decomposed once if needed) and choose steps/lr (``cfg.adapt``)."""
        t0 = time.perf_counter()
        adapter = EpisodeAdapter(model, cfg.adapt, policy=model.svf_policy or cfg.svf, lora=model.lora or cfg.lora)
        t1 = time.perf_counter()
        choice = choose_adaptation(adapter, cfg, bench, info, progress=cfg.train.progress)
        return cls(adapter, choice, cfg.adapt.to_dict(), prepare_seconds=t1 - t0)

    def score(self, dataset: Dataset, class_ids: Sequence[int], cfg: ExperimentConfig, info: DistInfo, *,
              desc: str, empty_class: str) -> dict:
        """One run's result (as ``evaluate`` returns it, with ``per_episode`` and ``seconds_per_episode``)."""
        steps = self.choice.steps
        r = adapted_evaluation(self.adapter, dataset, class_ids=class_ids, counts=[steps], lr=self.choice.lr,
                               seed=cfg.adapt.seed, info=info, amp=cfg.train.amp, progress=cfg.train.progress,
                               desc=desc, upstream_padding=cfg.eval.upstream_padding, empty_class=empty_class)[steps]
        r["episode_fingerprint"] = getattr(getattr(dataset, "episodes", None), "fingerprint", None)
        return r

    def record(self) -> dict:
        """What results.json says of the adaptation: the settings, the choice, what trained, the costs."""
        return {**self.settings, "chosen": dataclasses.asdict(self.choice), "chosen_label": self.choice.label(),
                "trainable": self.adapter.trainable_count, "prepare_seconds": self.prepare_seconds}
