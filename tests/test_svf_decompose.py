"""Tests for the pure SVD functions: shapes, full rank, exactness, error cases."""

import pytest
import torch
from torch import nn

from svfseg.svf.decompose import (
    SVDFactors,
    check_exact,
    decompose_weight,
    full_rank,
    grouped_matrix_shape,
    rebuild_weight,
    relative_error,
)


def _weight(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "shape, groups, rank",
    [
        ((64, 3, 3, 3), 1, 27),  # deep-stem conv: 27 columns, rank must stay 27
        ((64, 3, 7, 7), 1, 64),
        ((16, 8, 1, 1), 1, 8),
        ((12, 2, 3, 3), 4, 3),  # grouped: per group 3 x 18
        ((8, 1, 3, 3), 8, 1),  # depthwise
        ((10, 7), 1, 7),  # Linear
        ((6, 4, 5), 2, 3),  # Conv1d, groups 2: per group 3 x 20
        ((4, 2, 1, 3, 3), 1, 4),  # Conv3d
    ],
)
def test_full_rank_shapes_and_exactness(shape, groups, rank):
    w = _weight(*shape)
    U, S, Vh = decompose_weight(w, groups)
    g, m, n = grouped_matrix_shape(shape, groups)
    assert full_rank(shape, groups) == rank
    assert U.shape == (g, m, rank) and S.shape == (g, rank) and Vh.shape == (g, rank, n)
    assert U.dtype == S.dtype == Vh.dtype == w.dtype
    rebuilt = rebuild_weight(U, S, Vh, shape)
    assert rebuilt.shape == w.shape
    assert (rebuilt - w).norm() / w.norm() < 1e-6
    # singular values descend within each group and match LAPACK's values
    assert torch.all(S[:, :-1] >= S[:, 1:])
    ref = torch.linalg.svdvals(w.double().reshape(g, m, n)).float()
    torch.testing.assert_close(S, ref, rtol=1e-5, atol=1e-6)


def test_groups_decomposed_independently():
    # block-diagonal structure: group 0's factors only see group 0's weights
    w = _weight(8, 3, 3, 3)
    U, S, Vh = decompose_weight(w, groups=2)
    U0, S0, Vh0 = decompose_weight(w[:4], groups=1)
    torch.testing.assert_close(S[0], S0[0])
    torch.testing.assert_close(rebuild_weight(U[:1], S[:1], Vh[:1], (4, 3, 3, 3)), w[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(512, 64), (64, 512), (32, 32)])
def test_wide_tall_square_orientations_are_orthonormal(shape):
    w = _weight(*shape, seed=3)
    U, S, Vh = decompose_weight(w)
    eye = torch.eye(S.shape[1])
    torch.testing.assert_close(U[0].T @ U[0], eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh[0] @ Vh[0].T, eye, atol=1e-5, rtol=0)
    assert relative_error(w, SVDFactors(U, S, Vh)) < 1e-6


def test_svd_dtype_and_weight_dtype():
    w64 = _weight(20, 5, 3, 3, dtype=torch.float64)
    f = decompose_weight(w64, svd_dtype=torch.float64)
    assert f.S.dtype == torch.float64
    assert relative_error(w64, f) < 1e-12
    f32 = decompose_weight(w64.float(), svd_dtype=torch.float32)
    assert f32.U.dtype == torch.float32
    assert relative_error(w64.float(), f32) < 1e-5


def test_check_exact_accepts_and_rejects():
    w = _weight(16, 4, 3, 3)
    f = decompose_weight(w)
    assert check_exact(w, f) < 1e-6
    bad = SVDFactors(f.U, f.S * 1.01, f.Vh)
    with pytest.raises(ValueError, match=r"layer2\.conv.*relative error"):
        check_exact(w, bad, where="layer2.conv")


def test_bad_weights():
    with pytest.raises(ValueError, match="NaN or Inf"):
        decompose_weight(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        decompose_weight(_weight(8, 2, 3, 3), groups=3)
    with pytest.raises(TypeError, match="floating point"):
        decompose_weight(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=">= 2 dims"):
        decompose_weight(_weight(4))


def test_zero_weight_is_exact():
    w = torch.zeros(6, 3, 3, 3)
    f = decompose_weight(w)
    assert relative_error(w, f) == 0.0


def test_stem_conv_output_unchanged():
    conv = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
    f = decompose_weight(conv.weight)
    assert f.S.shape == (1, 27)
    x = _weight(2, 3, 17, 17, seed=5)
    out = nn.functional.conv2d(x, rebuild_weight(*f, conv.weight.shape), None, 2, 1)
    ref = conv(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
