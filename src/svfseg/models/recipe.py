"""What a registered model needs from a run: constructor keywords, other runs' checkpoints, its task.

Recipes read a `RunFacts` (built by the engine from the experiment config), so that the model
layer imports neither ``svfseg.config`` nor ``svfseg.data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable


@dataclass(frozen=True)
class ClassFacts:
    """The class split of a run's fold: base class ids (increasing) and the benchmark's class count."""

    base: tuple[int, ...]
    num_benchmark_classes: int


@dataclass(frozen=True)
class RunFacts:
    """What a recipe may know of a run (``svfseg.engine.resolved.resolve_run`` builds it once per command).

    Attributes mirror config keys: ``benchmark``/``root``/``convention`` (``data.*``), ``fold``,
    ``shot``, ``output_dir``, ``model``/``backbone``/``backbone_kwargs``/``head``/``base_checkpoint``
    (``model.*``). ``resolve_classes`` gives the fold's class split (from the run's resolved benchmark).
    """

    benchmark: str
    fold: int
    shot: int
    output_dir: str
    model: str
    backbone: str
    convention: str = "interleaved"
    backbone_kwargs: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    base_checkpoint: str | None = None
    resolve_classes: Callable[[], ClassFacts] | None = None

    def classes(self) -> ClassFacts:
        """The fold's class split (ValueError when the engine gave no way to resolve it)."""
        if self.resolve_classes is None:
            raise ValueError(f"{self.model}: the recipe needs the class split of {self.benchmark} fold {self.fold}, "
                             "but these run facts carry none")
        return self.resolve_classes()


@dataclass(frozen=True)
class Dependency:
    """A checkpoint of another run that a model is built from (BAM stage 2: its stage-1 base learner).

    The engine reads the file before the model is built, checks it with ``check`` and passes
    its ``model`` state dict as the constructor keyword ``keyword``; a run refuses to start
    when the file is missing or does not fit.

    Attributes:
        keyword: Constructor keyword that receives the checkpoint's state dict.
        path: The checkpoint file.
        what: What it is, for messages ("the stage-1 base learner").
        how_to_make: The command that writes it, for the missing-file message.
        check: ``check(checkpoint_dict) -> differences``; empty when the checkpoint fits.
    """

    keyword: str
    path: Path
    what: str
    how_to_make: str
    check: Callable[[dict], list[str]]


class ModelRecipe:
    """The default recipe: a few-shot model trained and scored on episodes, needing nothing else.

    Attributes:
        task: The engine task that trains the model (``svfseg.engine.tasks``).
        test_tasks: Tasks ``svfseg test`` may score it with; the first is the default.
    """

    task: str = "fewshot"
    test_tasks: tuple[str, ...] = ("fewshot",)

    def model_kwargs(self, cfg: RunFacts) -> dict[str, Any]:
        """Constructor keywords derived from the run (beyond ``model.head``)."""
        return {}

    def dependencies(self, cfg: RunFacts) -> list[Dependency]:
        """Checkpoints of other runs the model is built from (see :class:`Dependency`)."""
        return []

    def upgrade_description(self, d: Mapping) -> Mapping:
        """A ``describe()`` an older svfseg wrote for this model, in today's terms (default: as it is)."""
        return d


#: Head options added after svfseg 0.1, with the behaviour 0.1 had: a description without them
#: describes a model that had them at these values.
_PRIOR_HEAD_DEFAULTS_01 = {"train_down_query": True, "shot_reduce": "mean"}


class PriorHeadRecipe(ModelRecipe):
    """The prototype-prior heads (baseline, PFENet, BAM): descriptions without the later head options read as 0.1's."""

    def upgrade_description(self, d: Mapping) -> Mapping:  # noqa: D102 - see ModelRecipe
        head = d.get("head")
        if not isinstance(head, Mapping) or "reduce_dim" not in head:
            return d
        return {**d, "head": {**{k: v for k, v in _PRIOR_HEAD_DEFAULTS_01.items() if k not in head}, **head}}
