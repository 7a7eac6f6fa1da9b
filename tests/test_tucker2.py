"""Tucker-2 (HOSVD + HOOI on the channel modes), with tensorly's partial_tucker as the oracle."""
from __future__ import annotations

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from norton.decomposition.tucker2 import Tucker2Factors, tucker2, tucker2_max_ranks, tucker2_to_tensor
from norton.errors import UserError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _planted(n: int, c: int, ranks: tuple[int, int], noise: float, seed: int) -> torch.Tensor:
    """A Tucker-2 kernel of multilinear rank ``ranks`` plus Gaussian noise (float64)."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks[1], ranks[0], 3, 3, generator=g, dtype=torch.float64)
    first = torch.linalg.qr(torch.randn(c, ranks[0], generator=g, dtype=torch.float64)).Q
    last = torch.linalg.qr(torch.randn(n, ranks[1], generator=g, dtype=torch.float64)).Q
    w = tucker2_to_tensor(Tucker2Factors(first, core, last))
    return w + noise * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g, dtype=torch.float64)


def _tensorly_error(w: torch.Tensor, ranks: tuple[int, int]) -> float:
    tl.set_backend("pytorch")
    try:
        (core, factors), _ = partial_tucker(w, rank=[ranks[1], ranks[0]], modes=[0, 1], init="svd")
        return _rel(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]), w)
    finally:
        tl.set_backend("numpy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_is_exact_with_orthonormal_factors(dtype):
    torch.manual_seed(0)
    w = torch.randn(12, 7, 3, 3, dtype=dtype)
    factors, error = tucker2(w, tucker2_max_ranks(w.shape))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert factors.first.shape == (7, 7) and factors.core.shape == (12, 7, 3, 3) and factors.last.shape == (12, 12)
    assert all(f.dtype == dtype for f in factors)
    assert error.shape == () and float(error) < tol
    assert _rel(tucker2_to_tensor(factors), w) < tol
    eye = torch.eye(7, dtype=dtype)
    assert torch.allclose(factors.first.T @ factors.first, eye, atol=tol)


def test_shapes_and_error_match_the_reconstruction():
    torch.manual_seed(1)
    w = torch.randn(16, 10, 3, 5)
    factors, error = tucker2(w, (4, 6))
    assert factors.first.shape == (10, 4) and factors.core.shape == (6, 4, 3, 5) and factors.last.shape == (16, 6)
    assert abs(_rel(tucker2_to_tensor(factors), w) - float(error)) < 1e-5
    # W[n, c, i, j] = sum_{q, p} last[n, q] core[q, p, i, j] first[c, p]
    n, c, i, j = 3, 7, 2, 4
    manual = sum(
        factors.last[n, q] * factors.core[q, p, i, j] * factors.first[c, p] for q in range(6) for p in range(4)
    )
    assert torch.allclose(manual, tucker2_to_tensor(factors)[n, c, i, j], atol=1e-5)


def test_error_decreases_with_either_rank():
    torch.manual_seed(2)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    errors = [float(tucker2(w, (r, r))[1]) for r in range(1, 13)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert float(tucker2(w, (6, 8))[1]) < float(tucker2(w, (6, 7))[1]) < float(tucker2(w, (5, 7))[1])


def test_planted_multilinear_rank_is_recovered():
    w = _planted(20, 14, (4, 5), noise=0.0, seed=3)
    assert float(tucker2(w, (4, 5))[1]) < 1e-10
    assert float(tucker2(w, (3, 5))[1]) > 1e-2


def test_hooi_improves_on_hosvd():
    torch.manual_seed(4)
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    hosvd = float(tucker2(w, (5, 6), n_iter_max=0)[1])
    hooi = float(tucker2(w, (5, 6))[1])
    assert hooi < hosvd - 1e-4


@pytest.mark.parametrize(
    ("shape", "ranks", "planted"),
    [((32, 16, 3, 3), (8, 12), False), ((48, 32, 3, 3), (16, 16), False), ((40, 24, 3, 3), (6, 8), True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_not_above_tensorly_partial_tucker(shape, ranks, planted, dtype):
    if planted:
        w = _planted(shape[0], shape[1], ranks, noise=0.3, seed=5).to(dtype)
    else:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    ours = float(tucker2(w, ranks)[1])
    assert ours <= _tensorly_error(w, ranks) + 1e-5


def test_batched_equals_one_by_one():
    torch.manual_seed(6)
    w = torch.randn(3, 16, 8, 3, 3, dtype=torch.float64)
    factors, errors = tucker2(w, (4, 5))
    assert factors.core.shape == (3, 5, 4, 3, 3) and errors.shape == (3,)
    rebuilt = tucker2_to_tensor(factors)
    for b in range(3):
        single, error = tucker2(w[b], (4, 5))
        assert torch.allclose(rebuilt[b], tucker2_to_tensor(single), atol=1e-8)
        assert torch.allclose(errors[b], error, atol=1e-10)


def test_zero_and_scaled_kernels():
    factors, error = tucker2(torch.zeros(6, 4, 3, 3), (2, 3))
    assert float(error) == 0 and not tucker2_to_tensor(factors).any()
    torch.manual_seed(7)
    w = torch.randn(10, 6, 3, 3, dtype=torch.float64)
    base, scaled = tucker2(w, (3, 4)), tucker2(1e6 * w, (3, 4))
    assert torch.allclose(base[1], scaled[1]) and torch.allclose(1e6 * base[0].core, scaled[0].core)


def test_deterministic_and_keeps_input_device_and_low_precision_dtype():
    torch.manual_seed(8)
    w = torch.randn(8, 5, 3, 3)
    a, b = tucker2(w, (3, 4)), tucker2(w, (3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    half, _ = tucker2(w.to(torch.bfloat16), (3, 4))
    assert all(f.dtype == torch.bfloat16 and f.device == w.device for f in half)


@pytest.mark.parametrize(
    ("weight", "ranks", "match"),
    [
        (torch.randn(8, 5, 3, 3), (0, 2), "in_rank must be in \\[1, 5\\]"),
        (torch.randn(8, 5, 3, 3), (6, 2), "in_rank must be in \\[1, 5\\]"),
        (torch.randn(8, 5, 3, 3), (2, 9), "out_rank must be in \\[1, 8\\]"),
        (torch.randn(8, 5, 3, 3), 3, "pair"),
        (torch.randn(8, 5, 3), (2, 2), "got shape \\(8, 5, 3\\)"),
        (torch.full((8, 5, 3, 3), float("inf")), (2, 2), "NaN or inf"),
        (torch.zeros(0, 5, 3, 3), (1, 1), "non-empty"),
    ],
)
def test_bad_input_is_a_one_line_user_error(weight, ranks, match):
    with pytest.raises(UserError, match=match) as info:
        tucker2(weight, ranks)
    assert "\n" not in str(info.value)


def test_rayleigh_ritz_sweeps_reach_the_exact_hooi_fixed_point():
    # later sweeps take one warm-started Rayleigh-Ritz step per factor instead of an eigh:
    # run to convergence, they must land where exact HOOI lands (same start, same basin)
    torch.manual_seed(11)
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    ritz = float(tucker2(w, (5, 6), n_iter_max=500, tol=0.0)[1])
    exact = float(tucker2(w, (5, 6), n_iter_max=500, tol=0.0, exact_sweeps=500)[1])
    assert abs(ritz - exact) < 1e-6


def test_looser_tol_stops_earlier_and_never_beats_a_tighter_one():
    torch.manual_seed(12)
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    errors = [float(tucker2(w, (6, 8), tol=tol, n_iter_max=200)[1]) for tol in (1e-2, 5e-5, 1e-9)]
    assert errors[0] >= errors[1] >= errors[2]
    assert errors[0] > errors[2] + 1e-5  # the loose rule really stopped early


@pytest.mark.parametrize("option", [{"power_steps": 0}, {"exact_sweeps": -1}, {"power_steps": 1.5}])
def test_bad_sweep_options_raise(option):
    with pytest.raises(UserError):
        tucker2(torch.randn(8, 6, 3, 3), (2, 3), **option)
