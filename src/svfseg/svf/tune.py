"""Timing the two forward forms of an SVD layer on one training call (what a forms plan is measured with)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

FORMS = ("reparam", "factorized")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forms(layer: torch.nn.Module, x: torch.Tensor, reps: int = 3) -> dict[str, Any]:
    """Times forward + backward of both forms of ``layer`` on ``x``; the faster one wins.

    Gradients go through ``torch.autograd.grad`` (nothing accumulates into ``.grad``); the
    forms run interleaved after one warm-up call each, and the medians decide, as
    cudnn.benchmark does for conv algorithms.

    Args:
        layer: an SVD layer whose S requires grad.
        x: the input of the training call being planned.
        reps: timed calls per form.

    Returns:
        {"plan": the faster form, "seconds": {form: median seconds}}.
    """
    runs = {"reparam": layer._forward_reparam, "factorized": layer._forward_factorized}
    xs = x.detach().requires_grad_(x.requires_grad)
    inputs = [layer.S] + ([xs] if xs.requires_grad else [])
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    with torch.enable_grad():
        for r in range(reps + 1):
            for form in FORMS if r % 2 == 0 else FORMS[::-1]:
                _sync(x.device)
                t0 = time.perf_counter()
                y = runs[form](xs)
                torch.autograd.grad(y, inputs, grad_outputs=torch.ones_like(y))
                _sync(x.device)
                if r:  # the first round is the warm-up
                    times[form].append(time.perf_counter() - t0)
    seconds = {form: statistics.median(v) for form, v in times.items()}
    return {"plan": min(seconds, key=seconds.get), "seconds": seconds}
