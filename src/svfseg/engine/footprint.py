"""What a run trained: trainable counts, peak memory, step-1 gradient scale, how far the backbone moved.

The movement diagnostic answers "did the backbone actually change?": singular values report
``|S - S0| / |S0|`` element by element (mean and max per stage); every other trained backbone
tensor its relative change ``||p - p0|| / ||p0||`` (mean and max over the tensors of a stage;
element-wise ratios of near-zero biases would be meaningless). The gradient scale at the first
step (``lr x |g| / |p|``, the relative change one plain SGD step makes) says why something
barely moves in a short budget.
"""
from __future__ import annotations

import logging
import os
import resource
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from svfseg.engine.runfolder import RunFolder, write_atomic, write_json_atomic
from svfseg.svf import singular_value_parameters

logger = logging.getLogger(__name__)


def _stage(name: str) -> str:
    return name.split(".")[0]


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux ``clear_refs``); False where that is unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process since the last reset (``VmHWM``), else ``ru_maxrss``."""
    peak = _status_kb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Footprint:
    """Snapshot of a model's trainable backbone tensors at the start of a run, compared at its end.

    A run that was stopped and resumed measures movement against the weights of step 0 (written by
    :meth:`write_initial` when the run starts, read back by the resume: ``initial``), and its summary
    adds the earlier segments' seconds, peak memory and step-1 gradient scale (``earlier``, stored in
    ``last.pt``).

    Args:
        model: The few-shot model (unwrapped), before the first step.
        device: Where it trains (CUDA: peak memory from the allocator; else peak RSS).
        start_step: The step it starts from.
        earlier: :meth:`segments` of the checkpoint resumed from (None: a fresh run).
        initial: The trained backbone tensors at step 0 (``engine.state.Resume.initial_backbone``);
            None, or tensors that do not match: movement is measured from ``start_step``.
    """

    def __init__(self, model: nn.Module, device: torch.device, start_step: int = 0,
                 earlier: Optional[dict] = None, initial: Optional[dict] = None):
        self.device = device
        self.start_step = start_step
        groups = model.parameter_groups() if hasattr(model, "parameter_groups") else []
        self.counts = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
        backbone = getattr(model, "backbone", None)
        named = list(backbone.named_parameters()) if backbone is not None else []
        self.backbone_numel = sum(p.numel() for _, p in named)
        self.params = {n: p for n, p in named if p.requires_grad}
        # Singular values move elementwise (|S-S0|/|S0|); trained U / Vh, like any tensor, by norm.
        s_ids = {id(p) for _, p in singular_value_parameters(backbone)} if backbone is not None else set()
        self.singular = {n for n, p in self.params.items() if id(p) in s_ids}
        self.start = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        self.start_from = start_step
        self.earlier = dict(earlier or {})
        if initial is not None:
            self._measure_from(initial)
        self.gradient_scale: dict = dict(self.earlier.get("gradient_scale_step1") or {})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.rss_reset = reset_peak_rss()
        # The process's resident size when training starts (model, data index, earlier runs' freed
        # but unreturned memory): peak minus this is what the steps themselves added.
        self.rss_at_start = _status_kb("VmRSS")

    def _measure_from(self, initial: dict) -> None:
        """Step 0's tensors as the reference, when they are the trained tensors (else: measured from here)."""
        if set(initial) == set(self.start) and all(initial[n].shape == self.start[n].shape for n in initial):
            self.start, self.start_from = initial, 0
        else:
            logger.warning("the step-0 backbone tensors do not match the trained tensors; movement is measured "
                           "from step %d", self.start_step)

    def write_initial(self, path: str | os.PathLike) -> None:
        """Save the trained tensors as they are now (a fresh run's step 0) to ``path`` (atomic)."""
        if not self.params:
            return
        from safetensors.torch import save_file

        tensors = {n: t.contiguous() for n, t in self.start.items()}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))

    def segments(self, seconds: float) -> dict:
        """What the next segment adds to (stored in ``last.pt``): seconds so far, peak memory, step-1 gradients."""
        peaks = [v for v in (self.earlier.get("peak_memory_bytes"), self.peak_memory_bytes()) if v]
        return {"seconds": float(self.earlier.get("seconds") or 0.0) + seconds,
                "peak_memory_bytes": max(peaks) if peaks else None, "gradient_scale_step1": self.gradient_scale,
                "count": int(self.earlier.get("count") or 0) + 1}

    @torch.no_grad()
    def observe_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Record, per stage, mean ``|g|``, mean ``|p|`` and ``lr x |g| / |p|`` of the trained backbone tensors."""
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        acc: dict = defaultdict(lambda: [0.0, 0.0, 0, 0.0])
        for n, p in self.params.items():
            if p.grad is None:
                continue
            a = acc[_stage(n)]
            a[0] += float(p.grad.abs().sum())
            a[1] += float(p.detach().abs().sum())
            a[2] += p.numel()
            a[3] = lr_of.get(id(p), 0.0)
        self.gradient_scale = {s: {"mean_abs_grad": g / n, "mean_abs_value": v / n, "lr": lr,
                                   "relative_step": lr * g / max(v, 1e-12)}
                               for s, (g, v, n, lr) in acc.items() if n}

    @torch.no_grad()
    def movement(self) -> dict:
        """Per stage ``{"kind", "mean", "max", "tensors"}`` of how far the trained backbone moved."""
        per: dict = defaultdict(list)
        kinds: dict = {}
        for n, p in self.params.items():
            now, old = p.detach().float().cpu(), self.start[n].float()
            if n in self.singular:
                rel = (now - old).abs() / old.abs().clamp_min(1e-12)
                per[_stage(n)].append((rel.sum().item(), rel.numel(), rel.max().item()))
                kinds[_stage(n)] = "elementwise |S-S0|/|S0|"
            else:
                r = ((now - old).norm() / old.norm().clamp_min(1e-12)).item()
                per[_stage(n)].append((r, 1, r))
                kinds.setdefault(_stage(n), "tensor ||p-p0||/||p0||")
        out = {}
        for s, rows in per.items():
            total, count = sum(r[0] for r in rows), sum(r[1] for r in rows)
            out[s] = {"kind": kinds[s], "mean": total / count, "max": max(r[2] for r in rows), "tensors": len(rows)}
        return out

    def peak_memory_bytes(self) -> Optional[int]:
        """Peak memory while training: CUDA allocator peak, else the process's peak RSS."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    def summary(self, run_dir: str | os.PathLike | RunFolder) -> dict:
        """The summary; writes ``trained_backbone.safetensors`` (the trained backbone tensors) unless most trained."""
        adapter = None
        if self.params:
            n_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
            if sum(p.numel() for p in self.params.values()) * 2 > self.backbone_numel:
                # Most of the backbone trained: the checkpoint is the artefact; no second copy.
                adapter = {"file": None, "bytes": n_bytes}
            else:
                from safetensors.torch import save_file

                path = RunFolder(run_dir).trained_backbone
                tensors = {n: p.detach().cpu().contiguous() for n, p in self.params.items()}
                write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
                adapter = {"file": path.name, "bytes": path.stat().st_size}
        move = self.movement()
        overall = None
        if move:
            overall = max(v["mean"] for v in move.values())
        return {"trainable": {**self.counts, "total": sum(self.counts.values()),
                              "backbone": sum(p.numel() for p in self.params.values())},
                "adapter": adapter, "movement": move, "movement_from_step": self.start_from,
                "movement_max_stage_mean": overall,
                "gradient_scale_step1": self.gradient_scale,
                "peak_memory_bytes": self.segments(0.0)["peak_memory_bytes"],
                "peak_memory_bytes_this_segment": self.peak_memory_bytes(), "rss_at_start_bytes": self.rss_at_start,
                "segments": int(self.earlier.get("count") or 0) + 1,
                "peak_memory_kind": "cuda_allocated" if self.device.type == "cuda" else
                ("peak_rss_since_fit" if self.rss_reset else "peak_rss_process")}


def write_trainable(run_dir: str | os.PathLike | RunFolder, model: nn.Module) -> dict:
    """``trainable.json``: trainable parameters per group of ``model`` (written when a run starts)."""
    groups = model.parameter_groups() if hasattr(model, "parameter_groups") else []
    counts = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
    counts["total"] = sum(counts.values())
    counts["regime"] = getattr(model, "regime", None)
    folder = RunFolder(run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder.trainable, counts)
    return counts
