"""The batched CP tensor type: rebuilding tensors from factors and measuring the fit."""
from __future__ import annotations

import torch

from norton.decomposition.cp_tensor import cp_to_tensor, relative_error


def random_factors(batch=3, shape=(4, 3, 2), rank=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, size, rank, generator=g, dtype=dtype) for size in shape)


def test_cp_to_tensor_is_the_sum_of_rank_one_terms():
    a, b, c = random_factors()
    expected = torch.zeros(3, 4, 3, 2)
    for n in range(3):
        for r in range(5):  # explicit outer products, the definition
            expected[n] += a[n, :, r, None, None] * b[n, None, :, r, None] * c[n, None, None, :, r]
    torch.testing.assert_close(cp_to_tensor((a, b, c)), expected)


def test_cp_to_tensor_keeps_dtype_and_shape():
    factors = random_factors(batch=2, shape=(5, 1, 7), rank=1, dtype=torch.float64)
    tensor = cp_to_tensor(factors)
    assert tensor.shape == (2, 5, 1, 7) and tensor.dtype == torch.float64


def test_relative_error_is_zero_for_the_exact_factors_and_matches_the_definition():
    factors = random_factors()
    tensors = cp_to_tensor(factors)
    torch.testing.assert_close(relative_error(tensors, factors), torch.zeros(3), rtol=0, atol=1e-6)
    noisy = tensors + 0.1 * torch.randn(tensors.shape, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([(noisy[n] - tensors[n]).norm() / noisy[n].norm() for n in range(3)])
    torch.testing.assert_close(relative_error(noisy, factors), expected)


def test_relative_error_of_a_zero_tensor_is_the_absolute_residual_not_nan():
    factors = random_factors(batch=2)
    zeros = torch.zeros(2, 4, 3, 2)
    errors = relative_error(zeros, factors)
    assert torch.isfinite(errors).all()
    torch.testing.assert_close(errors, cp_to_tensor(factors).flatten(1).norm(dim=1))
    zero_factors = tuple(torch.zeros_like(f) for f in factors)
    assert (relative_error(zeros, zero_factors) == 0).all()
