"""Overlay images: supports with their masks, the query with prediction and ground truth."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from svfseg.labels import IGNORE_LABEL

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
GREEN, RED, BLUE = (0, 200, 0), (230, 30, 30), (40, 90, 255)


def denormalize(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor -> (H, W, 3) uint8."""
    arr = img.detach().float().cpu().permute(1, 2, 0).numpy() * STD + MEAN
    return np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)


def overlay(rgb: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """Blend ``color`` into ``rgb`` where ``mask == 1``; ignored pixels (255) are shown grey-hatched."""
    out = rgb.astype(np.float32).copy()
    fg = mask == 1
    out[fg] = (1 - alpha) * out[fg] + alpha * np.asarray(color, dtype=np.float32)
    out[_boundary(fg)] = np.asarray(color, dtype=np.float32)  # a solid outline keeps thin masks visible
    ign = mask == IGNORE_LABEL
    if ign.any():
        hatch = (np.add.outer(np.arange(mask.shape[0]), np.arange(mask.shape[1])) % 4) == 0
        out[ign & hatch] = 128
    return out.astype(np.uint8)


def _boundary(fg: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the foreground."""
    pad = np.pad(fg, 1, mode="edge")
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return fg & ~inner


def resize_rgb(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.BILINEAR))


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    from PIL import ImageDraw

    im = Image.fromarray(tile)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, 7 * len(text) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))
    return np.asarray(im)


def episode_panel(support_rgbs: Sequence[np.ndarray], support_masks: Sequence[np.ndarray], query_rgb: np.ndarray,
                  pred: np.ndarray, gt: Optional[np.ndarray] = None, height: int = 160) -> np.ndarray:
    """One row: each support with its mask (green), the query with the prediction (red), the query
    with the ground truth (blue) when given; every tile scaled to ``height`` pixels."""
    tiles = [_label(overlay(im, m, GREEN), f"support {i + 1}") for i, (im, m) in enumerate(zip(support_rgbs, support_masks))]
    tiles.append(_label(overlay(query_rgb, pred, RED), "prediction"))
    if gt is not None:
        tiles.append(_label(overlay(query_rgb, gt, BLUE), "ground truth"))
    scaled = []
    for t in tiles:
        w = max(1, round(t.shape[1] * height / t.shape[0]))
        scaled.append(resize_rgb(t, (height, w)))
        scaled.append(np.full((height, 4, 3), 255, np.uint8))
    return np.concatenate(scaled[:-1], axis=1)


def save_episode_overlay(path: Path, batch: dict, b: int, pred: torch.Tensor, gt: Optional[torch.Tensor]) -> Path:
    """Write the overlay PNG of item ``b`` of an evaluation batch.

    The query is shown at the original label size (its valid region, resized), as scored.
    """
    h, w = (int(x) for x in batch["query_valid_hw"][b])
    size = tuple(pred.shape[-2:])
    q = batch["query_img"][b][:, :h, :w]
    q = F.interpolate(q[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    sup = [denormalize(s) for s in batch["support_imgs"][b]]
    smasks = [m.cpu().numpy() for m in batch["support_masks"][b]]
    panel = episode_panel(sup, smasks, denormalize(q), pred.cpu().numpy(),
                          None if gt is None else gt.cpu().numpy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)
    return path
