"""Pseudo-episodes from an episode's supports alone: leave-one-out, and supports as queries of augmented copies.

The episode's query never enters here: everything is made from the K support images and masks, so
the adaptation cannot see what it is scored on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from svfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from svfseg.labels import IGNORE_LABEL

#: Augmented copies made of the one support of a 1-shot episode (its only pseudo-episodes); one per support
#: for K >= 2 with ``adapt.augment``.
ONE_SHOT_COPIES = 4


@dataclass(frozen=True)
class PseudoEpisode:
    """One pseudo-episode over an image bank: the query's index and its supports' indices."""

    query: int
    supports: tuple[int, ...]


@dataclass
class SupportBank:
    """The images pseudo-episodes are drawn from: the K supports, then their augmented copies.

    Attributes:
        images: (N, 3, H, W) normalised images; the first ``shots`` are the episode's supports.
        masks: (N, H, W) long labels in {0, 1, 255}.
        shots: K.
        episodes: The pseudo-episodes over the bank.
    """

    images: torch.Tensor
    masks: torch.Tensor
    shots: int
    episodes: list[PseudoEpisode]


def plan_pseudo_episodes(shots: int, *, augment: bool, copies: int, fixed_shot: Optional[int] = None) -> list[PseudoEpisode]:
    """The pseudo-episodes of a bank whose images ``shots .. shots + copies - 1`` are augmented copies.

    Copy ``j`` is of support ``j % shots``. K >= 2: each support is the query of the other K - 1
    (leave-one-out); with ``augment`` (and always for K = 1) each copy is the query of the support it
    was made from. ``fixed_shot``: a model built for exactly that many supports (BAM) gets every
    support list cycled to that length.
    """
    out = []
    if shots >= 2:
        out += [PseudoEpisode(i, tuple(j for j in range(shots) if j != i)) for i in range(shots)]
    if shots == 1 or augment:
        out += [PseudoEpisode(shots + j, (j % shots,)) for j in range(copies)]
    if fixed_shot is not None:
        out = [PseudoEpisode(e.query, tuple(e.supports[i % len(e.supports)] for i in range(fixed_shot))) for e in out]
    return out


def copies_for(shots: int, augment: bool) -> int:
    """How many augmented copies a K-shot bank holds."""
    return ONE_SHOT_COPIES if shots == 1 else (shots if augment else 0)


def make_bank(images: torch.Tensor, masks: torch.Tensor, *, augment: bool, generator: torch.Generator,
              fixed_shot: Optional[int] = None) -> SupportBank:
    """The bank of one episode: its K supports (K, 3, H, W) / (K, H, W) and the augmented copies it needs."""
    shots = images.shape[0]
    n = copies_for(shots, augment)
    if n:
        src = torch.arange(n) % shots
        aug_img, aug_mask = augment_pairs(images[src], masks[src], generator)
        images, masks = torch.cat([images, aug_img]), torch.cat([masks, aug_mask])
    return SupportBank(images, masks.long(), shots, plan_pseudo_episodes(shots, augment=augment, copies=n,
                                                                          fixed_shot=fixed_shot))


def _uniform(generator: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def augment_pairs(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random copy of each (image, mask) pair: the training augmentations, on normalised tensors.

    Horizontal flip (p = 0.5), scale 0.8-1.25, rotation within +-10 degrees, a shift up to 10% of the
    side, brightness and contrast within +-20%. Pixels from outside the image are the mean colour
    (0 after normalisation) and ignored (255) in the mask, as the training pipeline pads them.

    Args:
        images: (N, 3, H, W) images normalised with the ImageNet mean/std.
        masks: (N, H, W) labels in {0, 1, 255}.
        generator: The source of randomness (CPU).

    Returns:
        The augmented images and masks, same shapes, dtypes and device.
    """
    n, device = images.shape[0], images.device
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    scale = torch.exp(_uniform(generator, n, math.log(0.8), math.log(1.25)))
    angle = _uniform(generator, n, -10.0, 10.0) * math.pi / 180
    shift = _uniform(generator, 2 * n, -0.1, 0.1).view(n, 2)
    bright = _uniform(generator, n, 0.8, 1.2)
    contrast = _uniform(generator, n, 0.8, 1.2)
    # affine_grid maps output coordinates to input coordinates: the inverse of "scale, rotate, shift"
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1).to(device=device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # masks: sample value + 1 so that the zeros padded in from outside read as "ignore"
    m = F.grid_sample((masks.float() + 1).unsqueeze(1), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False).squeeze(1)
    new_masks = torch.where(m == 0, torch.full_like(m, IGNORE_LABEL), m - 1).to(masks.dtype)
    mean = torch.as_tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    raw = out * std + mean                                      # back to [0, 1] colours
    grey = raw.mean(dim=(1, 2, 3), keepdim=True)
    raw = ((raw - grey) * contrast.to(device).view(n, 1, 1, 1) + grey) * bright.to(device).view(n, 1, 1, 1)
    return ((raw.clamp(0, 1) - mean) / std).to(images.dtype), new_masks
