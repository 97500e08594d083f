"""Engine tasks: what a run trains and scores (few-shot episodes, semantic segmentation, the generalized setting).

A model's recipe names its task (``svfseg.models.ModelRecipe.task``); the engine looks it up here.
"""
from __future__ import annotations

from svfseg.engine.tasks.base import EvalSet, Task, TestOptions, ValResult
from svfseg.engine.tasks.fewshot import FewShotTask
from svfseg.engine.tasks.generalized import GeneralizedTask
from svfseg.engine.tasks.semantic import SemanticTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (FewShotTask, SemanticTask, GeneralizedTask)}


def get_task(name: str) -> Task:
    """A new task object of that name (ValueError listing the known tasks otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "EvalSet", "FewShotTask", "GeneralizedTask", "SemanticTask", "Task", "TestOptions", "ValResult",
           "get_task"]
