"""Layer-wise CP (4-way CP-ALS of a whole kernel), with tensorly's parafac as the oracle."""
from __future__ import annotations

import warnings

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from norton.decomposition.layer_cp import LayerCPFactors, layer_cp, layer_cp_max_rank, layer_cp_to_tensor
from norton.errors import UserError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _planted(shape: tuple[int, int, int, int], rank: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, c, kh, kw = shape
    factors = LayerCPFactors(*(torch.randn(size, rank, generator=g, dtype=dtype) for size in (c, kh, kw, n)))
    return layer_cp_to_tensor(factors)


def _tensorly_error(w: torch.Tensor, rank: int) -> float:
    tl.set_backend("pytorch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_eigenvecs larger than the mode": tensorly fills randomly
            cp = parafac(w, rank, init="svd", n_iter_max=100, tol=1e-7, random_state=0)
        return _rel(tl.cp_to_tensor(cp), w)
    finally:
        tl.set_backend("numpy")


def test_factor_shapes_and_formula():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 2, dtype=torch.float64)
    factors, error = layer_cp(w, 4)
    assert [tuple(f.shape) for f in factors] == [(5, 4), (3, 4), (2, 4), (6, 4)]
    rebuilt = layer_cp_to_tensor(factors)
    assert abs(_rel(rebuilt, w) - float(error)) < 1e-10
    n, c, i, j = 5, 3, 2, 1
    manual = sum(
        factors.last[n, r] * factors.first[c, r] * factors.vertical[i, r] * factors.horizontal[j, r] for r in range(4)
    )
    assert torch.allclose(manual, rebuilt[n, c, i, j])
    # balanced: the four columns of each term have equal norms
    norms = torch.stack([f.norm(dim=0) for f in factors])
    assert torch.allclose(norms, norms[:1].expand_as(norms))


@pytest.mark.parametrize(("shape", "rank"), [((8, 6, 3, 3), 3), ((12, 10, 3, 3), 6), ((10, 4, 1, 3), 2)])
def test_planted_cp_kernel_is_recovered(shape, rank):
    w = _planted(shape, rank, seed=1)
    factors, error = layer_cp(w, rank, n_iter_max=500, tol=0)
    assert float(error) < 1e-6
    assert _rel(layer_cp_to_tensor(factors), w) < 1e-6


def test_error_decreases_with_rank_and_max_rank_is_exact():
    torch.manual_seed(2)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    errors = [float(layer_cp(w, r, n_iter_max=300)[1]) for r in (1, 3, 6, 12)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert layer_cp_max_rank(w.shape) == 27
    assert float(layer_cp(w, 27, n_iter_max=500, tol=0)[1]) < 1e-5


@pytest.mark.parametrize(("shape", "rank"), [((16, 8, 3, 3), 10), ((32, 16, 3, 3), 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_not_above_tensorly_parafac_on_random_kernels(shape, rank, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert float(layer_cp(w, rank)[1]) <= _tensorly_error(w, rank) + 1e-4


def test_error_matches_tensorly_parafac_on_planted_kernels():
    # rank-5 kernels plus 10% noise. CP-ALS is non-convex: from different starts either
    # method can stall in a swamp, so the claim is "as good on (almost) every kernel":
    # measured, norton equals tensorly on 7 of these 8 and stalls at 0.137 vs 0.097 on one.
    wins = 0
    for seed in range(8):
        w = _planted((24, 12, 3, 3), 5, seed=seed)
        w = w + 0.1 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(4), dtype=w.dtype)
        wins += float(layer_cp(w, 5)[1]) <= _tensorly_error(w, 5) + 1e-4
    assert wins >= 7


def test_batched_equals_one_by_one():
    torch.manual_seed(5)
    w = torch.randn(3, 8, 6, 3, 3, dtype=torch.float64)
    factors, errors = layer_cp(w, 5)
    assert factors.first.shape == (3, 6, 5) and errors.shape == (3,)
    for b in range(3):
        single, error = layer_cp(w[b], 5)
        assert torch.allclose(layer_cp_to_tensor(factors)[b], layer_cp_to_tensor(single), atol=1e-7)
        assert abs(float(errors[b]) - float(error)) < 1e-9


def test_zero_scaled_deterministic_and_dtypes():
    factors, error = layer_cp(torch.zeros(4, 3, 3, 3), 2)
    assert float(error) == 0 and not layer_cp_to_tensor(factors).any()
    torch.manual_seed(6)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    base, scaled = layer_cp(w, 3), layer_cp(1e5 * w, 3)
    assert abs(float(base[1]) - float(scaled[1])) < 1e-8
    again = layer_cp(w, 3)
    assert all(torch.equal(x, y) for x, y in zip(base[0], again[0], strict=True))
    half, _ = layer_cp(w.to(torch.bfloat16), 3)
    assert all(f.dtype == torch.bfloat16 for f in half)
    single, error32 = layer_cp(w.float(), 3)
    assert single.first.dtype == torch.float32 and error32.dtype == torch.float32


@pytest.mark.parametrize(
    ("weight", "rank", "match"),
    [
        (torch.randn(4, 3, 3, 3), 0, "layer CP rank must be in \\[1, 27\\]"),
        (torch.randn(4, 3, 3, 3), 28, "layer CP rank must be in \\[1, 27\\]"),
        (torch.randn(4, 3, 3, 3), 2.0, "whole number"),
        (torch.randn(4, 3, 3), 2, "got shape"),
        (torch.full((4, 3, 3, 3), float("nan")), 2, "NaN"),
        ("w", 2, "torch.Tensor"),
    ],
)
def test_bad_input_is_a_one_line_user_error(weight, rank, match):
    with pytest.raises(UserError, match=match) as info:
        layer_cp(weight, rank)
    assert "\n" not in str(info.value)
