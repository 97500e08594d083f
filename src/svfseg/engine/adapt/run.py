"""The adaptation of one `svfseg test`: the adapter built once, its settings chosen once, then every run scored."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from torch.utils.data import Dataset

from svfseg.config import ExperimentConfig
from svfseg.engine.adapt.adapter import EpisodeAdapter
from svfseg.engine.adapt.score import AdaptChoice, adapted_evaluation, choose_adaptation, given_adaptation
from svfseg.engine.distributed import DistInfo
from svfseg.engine.resolved import ResolvedRun
from svfseg.models.fewshot import FewShotModel


@dataclass
class Adaptation:
    """An :class:`EpisodeAdapter` for a loaded model and the :class:`AdaptChoice` it runs with."""

    adapter: EpisodeAdapter
    choice: AdaptChoice
    settings: dict
    prepare_seconds: float

    @classmethod
    def prepare(cls, model: FewShotModel, run: ResolvedRun, info: DistInfo) -> Adaptation:
        """Build the working copy (decomposed once if needed) and choose steps/lr (``cfg.adapt``)."""
        cfg = run.cfg
        t0 = time.perf_counter()
        adapter = EpisodeAdapter(model, cfg.adapt, policy=model.svf_policy or cfg.svf, lora=model.lora or cfg.lora)
        t1 = time.perf_counter()
        choice = choose_adaptation(adapter, run, info, progress=cfg.train.progress)
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


@dataclass
class SupportAdaptation:
    """A model adapted once to one set of supports (a user's own images): predict any number of queries with it."""

    adapter: EpisodeAdapter
    choice: AdaptChoice
    seconds: float
    losses: list

    def predict(self, query_img, support_imgs, support_masks):
        """Logits of the adapted model (as the model's own call)."""
        return self.adapter.predict(query_img, support_imgs, support_masks)

    def record(self) -> dict:
        """What was adapted, how it was chosen, how long it took."""
        return {"params": self.adapter.settings.params, "trainable": self.adapter.trainable_count,
                "steps": self.choice.steps, "lr": self.choice.lr, "source": self.choice.source,
                "seconds": self.seconds, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def adapt_to_supports(model: FewShotModel, cfg: ExperimentConfig, support_imgs, support_masks, *, params: str,
                      steps=None, lr=None, progress: bool = False) -> SupportAdaptation:
    """Fine-tune ``params`` of a copy of ``model`` on K supports (K, 3, S, S) / (K, S, S) once, for every query after.

    ``steps``/``lr`` None: chosen on the checkpoint's base-class validation episodes at this K (its
    ``data.root`` must exist), as `svfseg test --adapt` chooses them.
    """
    from svfseg.engine.adapt.score import episode_generator
    from svfseg.engine.resolved import resolve_run
    from svfseg.engine.runtime import progress_bar
    from svfseg.regimes import adapt_name

    settings = dataclasses.replace(cfg.adapt, params=adapt_name(params), steps=steps, lr=lr)
    run_cfg = dataclasses.replace(cfg, shot=int(support_imgs.shape[0]), adapt=settings)
    adapter = EpisodeAdapter(model, settings, policy=model.svf_policy or cfg.svf, lora=model.lora or cfg.lora)
    info = DistInfo(device=support_imgs.device)
    # given steps and lr need no data; chosen ones read the checkpoint's base-class validation episodes
    choice = given_adaptation(settings) or choose_adaptation(adapter, resolve_run(run_cfg), info, progress=progress)
    bar = progress_bar(choice.steps, desc=f"adapt {settings.params}", enabled=progress and choice.steps > 0,
                       unit="step")
    t0 = time.perf_counter()
    adapter.reset()
    losses = adapter.adapt(support_imgs, support_masks, None, steps=choice.steps, lr=choice.lr or 0.0,
                           generator=episode_generator(settings.seed, 0),
                           on_step=(lambda step: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    return SupportAdaptation(adapter, choice, time.perf_counter() - t0, losses)
