"""Batch collation for episode dicts (variable-size original labels stay a list)."""
from __future__ import annotations

import torch

__all__ = ["collate_episodes", "worker_init_fn"]

_STACK = ("query_img", "query_mask", "support_imgs", "support_masks")


def collate_episodes(batch: list[dict]) -> dict:
    """Stack same-size tensors; ``class_id`` and ``query_valid_hw`` become long tensors ((B,), (B, 2));
    names and ``query_label_orig`` (original sizes differ) become lists."""
    out: dict = {k: torch.stack([b[k] for b in batch]) for k in _STACK}
    out["class_id"] = torch.tensor([b["class_id"] for b in batch], dtype=torch.long)
    out["query_name"] = [b["query_name"] for b in batch]
    out["support_names"] = [b["support_names"] for b in batch]
    if "query_label_orig" in batch[0]:
        out["query_label_orig"] = [b["query_label_orig"] for b in batch]
        out["query_valid_hw"] = torch.tensor([b["query_valid_hw"] for b in batch], dtype=torch.long)
    return out


def worker_init_fn(worker_id: int) -> None:  # noqa: ARG001 - DataLoader passes the id
    """DataLoader ``worker_init_fn``: one torch thread and, in spawned workers, one OpenCV thread.

    Loader workers already run in parallel, so per-op thread pools only oversubscribe the CPU.
    In a *forked* worker OpenCV's thread pool is left alone: its state is copied from the parent
    and resizing it there deadlocked in our benchmark (parent had used cv2 threads before the
    fork). Randomness needs no seeding here: items are seeded by (seed, epoch, index).
    """
    import multiprocessing

    torch.set_num_threads(1)
    if multiprocessing.get_start_method(allow_none=True) in ("spawn", "forkserver"):
        import cv2

        cv2.setNumThreads(1)
