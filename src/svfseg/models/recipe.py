"""What a registered model needs from an experiment config: constructor keywords, other runs' checkpoints, its task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from svfseg.config import ExperimentConfig


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

    def model_kwargs(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Constructor keywords derived from the config (beyond ``model.head``)."""
        return {}

    def dependencies(self, cfg: ExperimentConfig) -> list[Dependency]:
        """Checkpoints of other runs the model is built from (see :class:`Dependency`)."""
        return []
