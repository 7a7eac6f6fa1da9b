"""Truncated SVD layers: channel SVD (low_rank_matrix) and spatial SVD of conv kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from norton.decomposition.svd import (
    low_rank_matrix,
    spatial_svd,
    spatial_svd_max_rank,
    spatial_svd_to_tensor,
)
from norton.errors import UserError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_rank_matrix_full_rank_is_exact_and_error_matches(dtype):
    torch.manual_seed(0)
    m = torch.randn(20, 12, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    left, right, error = low_rank_matrix(m, 12)
    assert left.shape == (20, 12) and right.shape == (12, 12) and left.dtype == dtype
    assert _rel(left @ right, m) < tol and float(error) < tol
    for rank in (1, 4, 7):
        left, right, error = low_rank_matrix(m, rank)
        assert abs(_rel(left @ right, m) - float(error)) < 10 * tol


def test_low_rank_matrix_is_optimal_and_monotone():
    torch.manual_seed(1)
    m = torch.randn(30, 25, dtype=torch.float64)
    errors = [float(low_rank_matrix(m, r)[2]) for r in range(1, 26)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    # Eckart-Young: no other rank-5 product does better, e.g. a perturbed optimum
    left, right, error = low_rank_matrix(m, 5)
    assert _rel((left + 1e-3 * torch.randn_like(left)) @ right, m) > float(error)
    # equal scale on both sides: the singular values are split as square roots
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1))


def test_low_rank_matrix_batched_equals_one_by_one():
    torch.manual_seed(2)
    m = torch.randn(3, 10, 8)
    left, right, error = low_rank_matrix(m, 3)
    for b in range(3):
        l1, r1, e1 = low_rank_matrix(m[b], 3)
        assert torch.allclose(left[b] @ right[b], l1 @ r1, atol=1e-5)
        assert torch.allclose(error[b], e1, atol=1e-6)


def test_low_rank_matrix_zero_matrix_has_zero_error():
    left, right, error = low_rank_matrix(torch.zeros(4, 3), 2)
    assert float(error) == 0 and not (left @ right).any()


@pytest.mark.parametrize("shape", [(8, 5, 3, 3), (6, 4, 5, 3), (7, 3, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_svd_full_rank_convolution_is_exact(shape, dtype):
    torch.manual_seed(3)
    n, c, kh, kw = shape
    w = torch.randn(shape, dtype=dtype)
    x = torch.randn(2, c, 11, 9, dtype=dtype)
    rank = spatial_svd_max_rank(shape)
    vertical, horizontal, error = spatial_svd(w, rank)
    assert vertical.shape == (rank, c, kh, 1) and horizontal.shape == (n, rank, 1, kw)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert float(error) < tol
    # stride and padding split between the two convolutions
    reference = F.conv2d(x, w, stride=(2, 1), padding=(1, 2))
    two_step = F.conv2d(F.conv2d(x, vertical, stride=(2, 1), padding=(1, 0)), horizontal, padding=(0, 2))
    assert _rel(two_step, reference) < tol


def test_spatial_svd_error_matches_reconstruction_and_decreases():
    torch.manual_seed(4)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    previous = 2.0
    for rank in range(1, spatial_svd_max_rank(w.shape) + 1):
        vertical, horizontal, error = spatial_svd(w, rank)
        assert abs(_rel(spatial_svd_to_tensor(vertical, horizontal), w) - float(error)) < 1e-10
        assert float(error) < previous
        previous = float(error)


def test_spatial_svd_recovers_a_separable_kernel_at_its_rank():
    torch.manual_seed(5)
    vertical = torch.randn(2, 6, 3, 1, dtype=torch.float64)
    horizontal = torch.randn(10, 2, 1, 3, dtype=torch.float64)
    w = spatial_svd_to_tensor(vertical, horizontal)
    assert float(spatial_svd(w, 2)[2]) < 1e-10
    assert float(spatial_svd(w, 1)[2]) > 1e-3


def test_spatial_svd_batched_equals_one_by_one():
    torch.manual_seed(6)
    w = torch.randn(3, 8, 4, 3, 3)
    vertical, horizontal, error = spatial_svd(w, 5)
    assert vertical.shape == (3, 5, 4, 3, 1) and horizontal.shape == (3, 8, 5, 1, 3) and error.shape == (3,)
    for b in range(3):
        v1, h1, e1 = spatial_svd(w[b], 5)
        assert torch.allclose(spatial_svd_to_tensor(vertical[b], horizontal[b]), spatial_svd_to_tensor(v1, h1), atol=1e-5)
        assert torch.allclose(error[b], e1, atol=1e-6)


def test_spatial_svd_keeps_half_precision_dtype():
    w = torch.randn(4, 3, 3, 3).to(torch.bfloat16)
    vertical, horizontal, _ = spatial_svd(w, 2)
    assert vertical.dtype == horizontal.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: low_rank_matrix(torch.randn(5, 4), 0), "SVD rank must be in \\[1, 4\\]"),
        (lambda: low_rank_matrix(torch.randn(5, 4), 5), "SVD rank must be in \\[1, 4\\]"),
        (lambda: low_rank_matrix(torch.randn(5), 1), "shape \\(M, K\\)"),
        (lambda: low_rank_matrix(torch.randn(5, 4), 2.0), "whole number"),
        (lambda: spatial_svd(torch.randn(4, 3, 3), 1), "shape \\(N, C, k_h, k_w\\)"),
        (lambda: spatial_svd(torch.randn(1, 1, 4, 3, 3, 3), 1), "got shape"),
        (lambda: spatial_svd(torch.randn(4, 3, 3, 3), 10), "spatial SVD rank must be in \\[1, 9\\]"),
        (lambda: spatial_svd(torch.full((4, 3, 3, 3), float("nan")), 1), "NaN"),
        (lambda: spatial_svd([[1.0]], 1), "torch.Tensor"),
    ],
)
def test_bad_input_is_a_one_line_user_error(call, match):
    with pytest.raises(UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
