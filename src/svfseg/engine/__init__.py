"""Training and evaluation engine: loop, evaluation, optimiser, checkpoints, DDP, run folders."""
from svfseg.engine.checkpoint import CheckpointMismatch, check_compatible, save_atomic
from svfseg.engine.evaluate import evaluate, predictions_at_original_size
from svfseg.engine.model import build_model, describe, export_merged_checkpoint, load_for_inference
from svfseg.engine.optim import ReferenceDecay, build_optimizer, poly_lr
from svfseg.engine.run import train_run
from svfseg.engine.testing import score_checkpoint
from svfseg.engine.train import FitResult, NonFiniteLoss, ValSet, fit

__all__ = [
    "CheckpointMismatch", "FitResult", "NonFiniteLoss", "ReferenceDecay", "ValSet", "build_model",
    "build_optimizer", "check_compatible", "describe", "evaluate", "export_merged_checkpoint", "fit",
    "load_for_inference", "poly_lr", "predictions_at_original_size", "save_atomic", "score_checkpoint",
    "train_run",
]
