"""A run's SVF forms plan: which form each SVD layer geometry computes with, fixed for the whole run.

Where it comes from, in order: the plan recorded in the checkpoint a run resumes from; the file
``svf.plan`` names; otherwise it is measured on the run's first step (rank 0 times both forms of every
layer geometry on the first batch and sends the plan to the other ranks). It is then frozen, written to
the run folder (``svf_forms.json``) and into every checkpoint, so that a run, its resume and its ranks
compute with the same forms, and ``svf.plan=RUN/svf_forms.json`` repeats them elsewhere without timing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from svfseg.engine.distributed import DistInfo, broadcast_object
from svfseg.engine.runfolder import RunFolder, write_text_atomic
from svfseg.svf import FormsPlan, NothingToPlan, forms_plan, plan_forms, use_plan

logger = logging.getLogger(__name__)

#: The plan's key in ``last.pt`` / ``best.pt`` (its file in the run folder: ``RunFolder.forms``).
CHECKPOINT_KEY = "svf_forms"


def initial_forms(model: nn.Module, plan_file: Optional[str], resume_from: Optional[dict]) -> Optional[FormsPlan]:
    """The plan a run starts with, installed into ``model``: the checkpoint's, else ``svf.plan``'s; None otherwise.

    None also when the model has no SVD layer whose form is planned (mode "auto"; other regimes).

    Raises:
        FileNotFoundError, ValueError: ``svf.plan`` is missing or not a forms plan (one line, naming it).
    """
    if forms_plan(model) is None:
        return None
    recorded = (resume_from or {}).get(CHECKPOINT_KEY)
    if recorded is not None:
        plan = FormsPlan.from_dict(recorded, where="the resumed checkpoint's svf forms plan")
        logger.info("svf forms: following the plan recorded in the checkpoint (%d layer geometries)", len(plan))
        return use_plan(model, plan)
    if plan_file:
        try:
            plan = FormsPlan.load(plan_file)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"svf.plan: {e}") from None
        logger.info("svf forms: following svf.plan=%s (%d layer geometries; nothing is timed)", plan_file, len(plan))
        return use_plan(model, plan)
    if resume_from is not None:
        logger.info("svf forms: the checkpoint records no plan (written before plans were); measuring on the "
                    "next step")
    return None


def needs_measuring(model: nn.Module, plan: Optional[FormsPlan]) -> bool:
    """The run has "auto" SVD layers and no plan yet: the first step measures one."""
    return plan is None and forms_plan(model) is not None


def measure_forms(model: nn.Module, run_forward: Callable[[], object], info: DistInfo) -> FormsPlan:
    """Rank 0 measures the plan on ``run_forward`` (one forward of a batch, single-process: no collective);
    every rank then follows it. The other ranks wait for it and time nothing."""
    data = None
    if info.is_main:
        if info.distributed and _syncs_batchnorm(model):
            # a training SyncBatchNorm would wait for ranks that are not running this forward
            logger.info("svf forms: a training SyncBatchNorm keeps rank 0 from measuring alone; the cost model "
                        "chooses every form")
            data = FormsPlan(frozen=True).to_dict()
        else:
            try:
                data = plan_forms(model, run=run_forward).to_dict()
            except NothingToPlan as e:  # e.g. every planned layer runs under no_grad in this model's forward
                logger.info("svf forms: %s; the cost model chooses every form", e)
                data = FormsPlan(frozen=True).to_dict()
    data = broadcast_object(data, info)
    return use_plan(model, FormsPlan.from_dict(data, where="the svf forms plan from rank 0"))


def write_forms(run_dir: Path, plan: FormsPlan) -> Path:
    """``svf_forms.json`` in the run folder (atomic): what ``svf.plan`` takes to repeat these forms."""
    return write_text_atomic(RunFolder(run_dir).forms, plan.to_json())


def _syncs_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules())
