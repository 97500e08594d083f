"""Training and evaluation engine: tasks, the training loop, the evaluation loop, optimiser, checkpoints, DDP, runs."""
from svfseg.engine.checkpoint import CheckpointMismatch, check_compatible, save_atomic
from svfseg.engine.evaluator import evaluation_loop, predictions_at_original_size
from svfseg.engine.loop import FitResult, NonFiniteLoss, fit
from svfseg.engine.model import build_model, describe, export_merged_checkpoint, load_for_inference
from svfseg.engine.optim import ReferenceDecay, build_optimizer, poly_lr
from svfseg.engine.run import train_run
from svfseg.engine.state import TrainingState
from svfseg.engine.tasks import EvalSet, FewShotTask, SemanticTask, Task, TestOptions, get_task
from svfseg.engine.tasks.fewshot import evaluate, score_checkpoint
from svfseg.engine.testing import score_with_task

__all__ = [
    "CheckpointMismatch", "EvalSet", "FewShotTask", "FitResult", "NonFiniteLoss", "ReferenceDecay", "SemanticTask",
    "Task", "TestOptions", "TrainingState", "build_model", "build_optimizer", "check_compatible", "describe", "evaluate",
    "evaluation_loop", "export_merged_checkpoint", "fit", "get_task", "load_for_inference", "poly_lr",
    "predictions_at_original_size", "save_atomic", "score_checkpoint", "score_with_task", "train_run",
]
