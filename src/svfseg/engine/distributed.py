"""Process-group setup for DDP (torchrun: NCCL on GPU, gloo on CPU) and small collective helpers."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:local_rank when a GPU is present, else cpu; otherwise ``pref`` as given."""
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise ValueError(f"device '{pref}': expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{pref}' requested but CUDA is not available (use device=cpu or auto)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With a world size of 1 (plain
    ``svfseg train``) no process group is created. The backend is NCCL on GPU, gloo on CPU.

    Args:
        device_pref: the config's ``device`` ("auto", "cpu", "cuda", "cuda:N").

    Returns:
        This process's :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over processes (no-op in a single process). Returns the summed tensor."""
    if not info.distributed:
        return t
    # NCCL needs device tensors; gloo works on CPU tensors.
    comm = t.to(info.device) if info.device.type == "cuda" else t.cpu()
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    return comm.to(t.device)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (picklable) on every process; ``obj`` itself in a single process."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def all_gather_objects(items: list, info: DistInfo) -> list:
    """Every process's ``items`` joined into one list (the list itself in a single process)."""
    if not info.distributed:
        return list(items)
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (after a barrier, so no peer is still talking to this one)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sync_trainable_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """Replace BatchNorm layers that train (affine params with grad, training mode) by SyncBatchNorm.

    Frozen BatchNorm (the backbone's) is left alone: it always runs in eval mode, where
    syncing has nothing to do. SyncBatchNorm needs GPU tensors, so on CPU (gloo) nothing is
    converted and each process normalises with its own batch statistics.
    """
    if not info.distributed or info.device.type != "cuda":
        return model
    count = 0

    def convert(parent: nn.Module) -> None:
        nonlocal count
        for name, child in parent.named_children():
            trains = (isinstance(child, nn.modules.batchnorm._BatchNorm)
                      and not isinstance(child, nn.SyncBatchNorm)
                      and child.affine and child.weight.requires_grad)
            if trains:
                sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
                sync.load_state_dict(child.state_dict())
                sync.weight, sync.bias = child.weight, child.bias  # keep the optimiser's Parameter objects
                sync.train(child.training)
                setattr(parent, name, sync)
                count += 1
            else:
                convert(child)

    convert(model)
    if count:
        logger.info("SyncBatchNorm: %d trainable BatchNorm layers synchronised across %d processes",
                    count, info.world_size)
    return model
