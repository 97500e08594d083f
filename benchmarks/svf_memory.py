"""Memory of one SVF training step for `bench_svf.py`: activations saved for the backward, peak step memory.

On CUDA the peak is max_memory_allocated; on the CPU it is the peak resident set added by one step
in a fresh subprocess (reset through /proc/self/clear_refs). A helper module (no `bench_` prefix).
"""

from __future__ import annotations

import collections
import ctypes
import json
import re
import subprocess
import sys

import torch
from torch import nn

from svf_cases import Regime, make_variant, regime_input, step_fn, sync


def saved_activations(model: nn.Module, variant: str, x: torch.Tensor) -> dict[str, float]:
    """MB the autograd graph keeps for the backward, per layer type (parameters/buffers excluded).

    Each storage counts once, for the first layer that saves it (a ReLU output that the next
    conv also keeps is the ReLU's).
    """
    if variant == "frozen":
        return {}
    persistent = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    per_type: collections.Counter = collections.Counter()
    current = ["other"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in persistent:
            seen.add(key)
            per_type[current[0]] += storage.nbytes() / 2**20
        return t

    hooks = [m.register_forward_pre_hook(lambda mod, args: current.__setitem__(0, type(mod).__name__))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return dict(per_type)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_worker(spec: dict) -> dict:
    """Peak resident memory added by one step, measured in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    regime = Regime(**{**spec["regime"], "input_shape": tuple(spec["regime"]["input_shape"]),
                       "stages": tuple(spec["regime"]["stages"])})
    plain = torch.load(spec["model_path"], weights_only=False)
    x = regime_input(regime, torch.device("cpu"))
    model = make_variant(plain, regime, spec["variant"], x)
    del plain
    run = step_fn(model, spec["variant"], x)
    run()  # warm-up: one-time kernel caches, the measured forms
    run()
    for p in model.parameters():
        p.grad = None  # as after optimizer.zero_grad(): the step's own gradients count in its peak
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give cached heap back so RSS starts clean
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _proc_status_kb("VmRSS")
    run()
    peak = _proc_status_kb("VmHWM")
    return {"peak_mb": (peak - base) / 1024}


def cpu_peak_memory(script: str, model_path: str, regime: Regime, variants, threads: int) -> dict:
    """Each variant's peak step memory, each in a fresh ``script --memory-worker`` process."""
    results = {}
    for variant in variants:
        spec = {"model_path": model_path, "variant": variant, "regime": regime.__dict__, "threads": threads}
        cmd = [sys.executable, script, "--memory-worker", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {variant} failed:\n{proc.stderr[-2000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    return results


def cuda_peak_memory(models: dict, x: torch.Tensor, device: torch.device) -> dict:
    results = {}
    for variant, model in models.items():
        run = step_fn(model, variant, x)
        run()
        for p in model.parameters():
            p.grad = None  # as after optimizer.zero_grad(): the step's own gradients count in its peak
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        results[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return results
