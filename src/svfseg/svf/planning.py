"""A model's forms plan: measured on one forward (`plan_forms`), read (`forms_plan`), installed (`use_plan`)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from svfseg.svf.base import SVFLayer
from svfseg.svf.inject import svf_layers
from svfseg.svf.plan import FormsPlan

logger = logging.getLogger(__name__)

#: Modes whose training form comes from the plan ("tune": the older name of "auto").
PLANNED_MODES = ("auto", "tune")


class NothingToPlan(ValueError):
    """`plan_forms` found no "auto" SVD layer with a training form to choose."""


def planned_layers(model: nn.Module) -> list[SVFLayer]:
    """The SVD layers of ``model`` whose training form follows a forms plan, in module order.

    Mode "auto" with S trainable and U, Vh frozen: a layer whose U or Vh trains always runs the
    rebuilt-weight form (the factorized Function has no gradient for them), one with S frozen has
    nothing to choose.
    """
    return [layer for _, layer in svf_layers(model)
            if layer.mode in PLANNED_MODES and layer.S.requires_grad and not layer._factor_matrices_train()]


def forms_plan(model: nn.Module) -> FormsPlan | None:
    """The forms plan the model's "auto" layers follow; None when it has none.

    Layers of separate `apply_svf` calls hold separate plans: they are merged into one, which
    every such layer then follows (frozen if any of them was).
    """
    layers = planned_layers(model)
    plans = list({id(layer.forms_plan): layer.forms_plan for layer in layers}.values())
    if not plans:
        return None
    if len(plans) == 1:
        return plans[0]
    merged = FormsPlan(frozen=any(p.frozen for p in plans))
    for plan in plans:
        merged.forms.update(plan.forms)
        merged.seconds.update(plan.seconds)
        merged.measured_on = merged.measured_on or plan.measured_on
    return use_plan(model, merged)


def use_plan(model: nn.Module, plan: FormsPlan) -> FormsPlan:
    """Makes every "auto" SVD layer of ``model`` follow ``plan`` (returned); other modes are left alone.

    Raises:
        TypeError: ``plan`` is not a `FormsPlan`.
    """
    if not isinstance(plan, FormsPlan):
        raise TypeError(f"use_plan: expected a FormsPlan, found {type(plan).__name__}")
    for layer in planned_layers(model):
        layer.forms_plan = plan
    return plan


@contextlib.contextmanager
def _state_untouched(model: nn.Module) -> Iterator[None]:
    """Leaves the RNG and BatchNorm running statistics as they were (a planning forward is not a step)."""
    stats = [(m, [t.detach().clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)])
             for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None]
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for module, saved in stats:
                    for t, value in zip((module.running_mean, module.running_var, module.num_batches_tracked), saved):
                        t.copy_(value)


def plan_forms(model: nn.Module, example_input: Any = None, *, run: Callable[[], Any] | None = None,
               reps: int = 3) -> FormsPlan:
    """Measures the model's forms plan on one forward, then freezes it and installs it.

    Every "auto" SVD layer reached with a graph to S times both forms on its input (forward +
    backward to S and to the input, ``reps`` calls each after a warm-up; equal geometries once)
    and keeps the faster. The forward's output is discarded (no backward); the RNG and BatchNorm
    running statistics are left as they were, so planning does not change what training computes.

    Args:
        model: a model after `apply_svf` (mode "auto", S trainable).
        example_input: what a training call passes: a tensor (``model(x)``), a tuple of positional
            arguments, or a dict of keywords. Same shapes, dtype, device, autocast and memory
            layout as in training: the plan is keyed on them.
        run: instead of ``example_input``, a callable that runs the forward (e.g. the loss of a batch).
        reps: timed calls per form.

    Returns:
        The frozen plan (`FormsPlan.save` writes it; `use_plan` installs it elsewhere).

    Raises:
        NothingToPlan: the model has no "auto" SVD layer training S (and only S), or none was called
            with a graph to S.
        ValueError: neither or both of ``example_input`` and ``run``.
    """
    layers = planned_layers(model)
    if not layers:
        raise NothingToPlan(f"plan_forms: {type(model).__name__} has no SVD layer in mode 'auto' whose S trains "
                            f"(and not U or Vh: those run the rebuilt-weight form); apply_svf with "
                            f"SVFConfig(mode='auto') first")
    if (example_input is None) == (run is None):
        raise ValueError("plan_forms: give example_input or run=, not both or neither")
    if run is None:
        if isinstance(example_input, dict):
            run = lambda: model(**example_input)  # noqa: E731
        elif isinstance(example_input, tuple):
            run = lambda: model(*example_input)  # noqa: E731
        else:
            run = lambda: model(example_input)  # noqa: E731
    before = [layer.forms_plan for layer in layers]
    plan = use_plan(model, FormsPlan(reps=reps))
    t0 = time.perf_counter()
    try:
        with _state_untouched(model), torch.enable_grad():
            run()
    except BaseException:
        for layer, old in zip(layers, before):
            layer.forms_plan = old
        raise
    if not plan.forms:
        for layer, old in zip(layers, before):
            layer.forms_plan = old
        raise NothingToPlan("plan_forms: no 'auto' SVD layer was called with a graph to S during the forward (is "
                            "the forward run under no_grad / inference_mode?)")
    logger.info("svf forms: measured %d layer geometries in %.1f s: %s", len(plan), time.perf_counter() - t0,
                ", ".join(f"{form} {n}" for form, n in sorted(plan.counts().items())))
    return plan.freeze()
