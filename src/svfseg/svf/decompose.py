"""Pure functions: weight -> per-group SVD factors, factors -> weight, exactness checks."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch


class SVDFactors(NamedTuple):
    """Per-group singular value decomposition of a layer weight.

    Attributes:
        U: (groups, out/groups, rank) left singular vectors.
        S: (groups, rank) singular values, descending within each group.
        Vh: (groups, rank, in/groups * prod(kernel)) right singular vectors (transposed).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def grouped_matrix_shape(weight_shape: Sequence[int], groups: int = 1) -> tuple[int, int, int]:
    """Returns (groups, out/groups, in/groups * prod(kernel)) for a conv or linear weight.

    Args:
        weight_shape: (out, in/groups, *kernel) for convs, (out, in) for Linear.
        groups: number of conv groups.

    Returns:
        The shape of the stacked per-group matrices.
    """
    if len(weight_shape) < 2:
        raise ValueError(f"expected a weight with >= 2 dims (out, in, *kernel), found {tuple(weight_shape)}")
    out = weight_shape[0]
    if groups < 1 or out % groups:
        raise ValueError(f"out channels {out} are not divisible by groups={groups}")
    return groups, out // groups, math.prod(weight_shape[1:])


def full_rank(weight_shape: Sequence[int], groups: int = 1) -> int:
    """Returns the rank kept by `decompose_weight`: min(out/groups, in/groups * prod(kernel))."""
    _, m, n = grouped_matrix_shape(weight_shape, groups)
    return min(m, n)


def floored_rank(rank: int, multiple: int = 1) -> int:
    """``rank`` floored to a multiple of ``multiple``, at least 1 (1: ``rank`` itself).

    ``multiple=4`` is the SVF authors' rule (their svf.py ``round_to_nearest`` at ratio 1): a 3x3 conv
    from 3 channels (27 columns) keeps rank 24, so its rebuilt weight, and the features after it, change.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"rank multiple: expected an int >= 1, found {multiple!r}")
    return max(1, rank // multiple * multiple)


@torch.no_grad()
def decompose_weight(
    weight: torch.Tensor, groups: int = 1, svd_dtype: torch.dtype = torch.float64, rank_multiple: int = 1
) -> SVDFactors:
    """Decomposes a conv/linear weight, one SVD per group: exactly (full rank) unless ``rank_multiple`` > 1.

    Args:
        weight: (out, in/groups, *kernel) or (out, in) tensor.
        groups: conv groups; group i owns out channels [i*out/groups, (i+1)*out/groups).
        svd_dtype: dtype the SVD is computed in; the factors come back in weight.dtype.
        rank_multiple: keep the leading ``floored_rank(r, rank_multiple)`` singular triplets (lossy
            where that is below r; 1 keeps them all).

    Returns:
        SVDFactors with rank r = min(out/groups, in/groups * prod(kernel)), floored as above.
    """
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating point weight, found {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf values")
    g, m, n = grouped_matrix_shape(weight.shape, groups)
    mats = weight.detach().reshape(g, m, n).to(svd_dtype)
    u, s, vh = _svd(mats)
    r = floored_rank(s.shape[-1], rank_multiple)
    u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
    dtype = weight.dtype
    return SVDFactors(u.to(dtype).contiguous(), s.to(dtype).contiguous(), vh.to(dtype).contiguous())


def _svd(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices, fed to LAPACK in its fast orientation.

    LAPACK's divide-and-conquer SVD is several times slower on wide row-major matrices
    (a 512 x 4608 conv weight: 1.5 s vs 0.4 s on one core); decomposing the transpose and
    swapping the factors gives the same exact decomposition.
    """
    m, n = mats.shape[-2:]
    if n > m:
        u, s, vh = torch.linalg.svd(mats.mT, full_matrices=False)
        return vh.mT, s, u.mT
    return torch.linalg.svd(mats, full_matrices=False)


def rebuild_weight(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, weight_shape: Sequence[int]
) -> torch.Tensor:
    """Rebuilds W = U diag(S) Vh per group and reshapes it to the layer's weight shape.

    Differentiable in S (and U, Vh); the cost is out * rank * in/groups * prod(kernel).

    Args:
        U: (groups, out/groups, rank).
        S: (groups, rank).
        Vh: (groups, rank, in/groups * prod(kernel)).
        weight_shape: (out, in/groups, *kernel) or (out, in).

    Returns:
        Weight tensor of shape ``weight_shape``.
    """
    return torch.matmul(U * S.unsqueeze(-2), Vh).reshape(weight_shape)


@torch.no_grad()
def relative_error(weight: torch.Tensor, factors: SVDFactors) -> float:
    """Returns ||W - rebuild(factors)||_F / ||W||_F (0 for W = 0).

    The rebuild runs in the factors' dtype, as the layers' forward does; norms in float64.
    """
    U, S, Vh = factors
    w = weight.detach()
    diff = torch.linalg.vector_norm((rebuild_weight(U, S, Vh, w.shape) - w).double()).item()
    norm = torch.linalg.vector_norm(w.double()).item()
    return diff / norm if norm > 0 else diff


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative reconstruction tolerance for a weight dtype: 1e-5 for float32 and wider."""
    return max(1e-5, 20.0 * torch.finfo(dtype).eps)


def check_exact(
    weight: torch.Tensor, factors: SVDFactors, tol: float | None = None, where: str = "weight"
) -> float:
    """Raises when the factors do not reproduce the weight within a relative tolerance.

    Args:
        weight: original weight.
        factors: its decomposition.
        tol: relative Frobenius tolerance; default from `default_tolerance`.
        where: name used in the error message (e.g. the module name).

    Returns:
        The measured relative error.
    """
    tol = default_tolerance(weight.dtype) if tol is None else tol
    err = relative_error(weight, factors)
    if not err <= tol:
        raise ValueError(
            f"{where}: SVD reconstruction relative error {err:.3g} exceeds the tolerance {tol:.3g}"
        )
    return err
