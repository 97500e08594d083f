"""Shared few-shot ops: resizing, masked average pooling, the prior mask, ASPP and PPM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Added to the mask area in masked average pooling (PFENet's value), so an empty mask gives 0.
MAP_EPS = 5e-4
#: Added to cosine / min-max denominators in the prior mask (PFENet's value).
PRIOR_EPS = 1e-7


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize a (N, C, h, w) tensor to ``size`` (align_corners=True, as PFENet).

    Returns ``x`` itself when it already has that size.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def foreground(masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn label masks in {0, 1, 255} into float foreground masks (1 where the label is 1).

    Args:
        masks: Integer or float masks of any shape; 255 (ignore) counts as background.
        dtype: Floating dtype of the result.

    Returns:
        Tensor of the same shape with values in {0, 1}.
    """
    return (masks == 1).to(dtype)


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float = MAP_EPS) -> torch.Tensor:
    """Average ``feat`` over the pixels where ``mask`` is on (a prototype per image).

    Args:
        feat: Features (N, C, h, w).
        mask: Soft or binary mask (N, 1, H, W); resized to (h, w) when needed.
        eps: Added to the mask area, so an empty mask yields a zero prototype.

    Returns:
        Prototypes (N, C, 1, 1).
    """
    mask = resize(mask.to(feat.dtype), feat.shape[-2:])
    area = mask.sum(dim=(2, 3), keepdim=True) + eps
    return (feat * mask).sum(dim=(2, 3), keepdim=True) / area


def prior_mask(
    query_feat: torch.Tensor,
    support_feat: torch.Tensor,
    support_mask: torch.Tensor,
    eps: float = PRIOR_EPS,
) -> torch.Tensor:
    """Training-free prior: how much each query pixel resembles some support foreground pixel.

    For each shot: cosine similarity of every query pixel with every masked support pixel,
    max over support pixels, then min-max normalised over the query pixels (PFENet). No
    parameters; gradients flow into both feature maps.

    Args:
        query_feat: High-level query features (B, C, h, w).
        support_feat: High-level support features (B, K, C, hs, ws).
        support_mask: Support foreground masks (B, K, H, W); resized to (hs, ws).
        eps: Stabiliser of the cosine and min-max denominators.

    Returns:
        Per-shot priors (B, K, h, w) in [0, 1].
    """
    b, k, c, hs, ws = support_feat.shape
    if query_feat.shape[0] != b or query_feat.shape[1] != c:
        raise ValueError(
            f"prior_mask: query features {tuple(query_feat.shape)} do not match support "
            f"features {tuple(support_feat.shape)} in batch size or channels"
        )
    h, w = query_feat.shape[-2:]
    mask = resize(support_mask.reshape(b * k, 1, *support_mask.shape[-2:]).to(support_feat.dtype), (hs, ws))
    support = support_feat * mask.reshape(b, k, 1, hs, ws)
    # Normalise first, then one matmul per shot: the (hs*ws) x (h*w) similarity matrix is the
    # largest temporary, so shots are looped (as PFENet does) rather than stacked.
    query = query_feat.flatten(2)
    query = query / (query.norm(dim=1, keepdim=True) + eps)
    support = support.flatten(3)
    support = support / (support.norm(dim=2, keepdim=True) + eps)
    priors = []
    for shot in range(k):
        sim = torch.bmm(support[:, shot].transpose(1, 2), query)  # (B, hs*ws, h*w)
        sim = sim.max(dim=1).values
        lo = sim.min(dim=1, keepdim=True).values
        hi = sim.max(dim=1, keepdim=True).values
        priors.append((sim - lo) / (hi - lo + eps))
    return torch.stack(priors, dim=1).reshape(b, k, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as in the SVF authors' baseline and BAM.

    Five parallel branches, each conv + bias + ReLU with ``channels`` outputs: image pooling
    (global average -> 1x1), 1x1, and 3x3 convs with the given dilation rates. Outputs are
    concatenated, so the result has ``channels * (2 + len(rates))`` channels.

    Args:
        channels: Input and per-branch output channels.
        rates: Dilation rates of the 3x3 branches.
    """

    def __init__(self, channels: int = 256, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.image_pool = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
        branches = [nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())]
        for rate in self.rates:
            branches.append(
                nn.Sequential(nn.Conv2d(channels, channels, 3, padding=rate, dilation=rate), nn.ReLU())
            )
        self.branches = nn.ModuleList(branches)
        self.out_channels = channels * (1 + len(branches))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1)


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet): pooled context at several bin sizes, concatenated.

    Each bin: adaptive average pooling -> 1x1 conv (no bias) -> BatchNorm -> ReLU -> bilinear
    upsampling. The input is kept, so the output has
    ``in_channels + reduction_channels * len(bins)`` channels.

    Args:
        in_channels: Input channels.
        reduction_channels: Output channels of each bin branch.
        bins: Output sizes of the adaptive pooling.
    """

    def __init__(self, in_channels: int, reduction_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, reduction_channels, 1, bias=False),
                nn.BatchNorm2d(reduction_channels),
                nn.ReLU(inplace=True),
            )
            for b in self.bins
        )
        self.out_channels = in_channels + reduction_channels * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(resize(stage(x), size) for stage in self.stages)], dim=1)
