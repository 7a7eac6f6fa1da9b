"""Tests for principal angles and all-pairs filter distances (norton.pruning.angles)."""
import math

import pytest
import torch

from _factories import block_from, random_factors
from norton.errors import UserError
from norton.pruning.angles import pairwise_distance, principal_angles, variance_based_distance


# ------------------------------------------------------------------ principal angles
def test_identical_subspaces_have_zero_angles():
    a = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(1))
    mixing = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)) + 3 * torch.eye(3)
    angles = principal_angles(a, a @ mixing)  # same column space, different basis
    assert angles.shape == (4, 3)
    assert angles.abs().max() < 1e-5


def test_orthogonal_subspaces_have_right_angles():
    eye = torch.eye(6)
    angles = principal_angles(eye[:, :2], eye[:, 2:5])
    assert torch.allclose(angles, torch.full((2,), math.pi / 2), atol=1e-6)


@pytest.mark.parametrize("theta", [0.3, 1.2, 1e-5])
def test_known_angle_between_planes(theta):
    # span(e1, e2) against span(e1, cos t e2 + sin t e3): angles (0, t); 1e-5 checks the sine formula
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, math.cos(theta)], [0.0, math.sin(theta)]])
    angles = principal_angles(x, y)
    assert angles[0].abs() < 1e-7
    assert abs(angles[1].item() - theta) <= 1e-3 * theta


def test_lines_give_the_unsigned_angle_between_vectors():
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(50, 7, 1, generator=g), torch.randn(50, 7, 1, generator=g)
    cosine = torch.nn.functional.cosine_similarity(u[..., 0], v[..., 0], dim=1).abs()
    assert torch.allclose(principal_angles(u, -v)[:, 0], torch.acos(cosine.clamp(max=1)), atol=1e-5)


def test_angles_are_invariant_to_scaling_and_rotating_the_basis():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 12, 3, generator=g), torch.randn(8, 12, 3, generator=g)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    scale = torch.tensor([1e-3, 1.0, 50.0])
    expected = principal_angles(a, b)
    assert torch.allclose(principal_angles(a * scale, b @ q), expected, atol=1e-5)
    assert torch.allclose(principal_angles(b, a), expected, atol=1e-5)


def test_rank_deficient_and_zero_factors_give_finite_angles():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    with_zero_column = torch.cat([a[:, :2], torch.zeros(12, 1)], dim=1)
    with_repeated_column = torch.cat([a[:, :2], a[:, :1] * 2], dim=1)
    reference = principal_angles(a[:, :2], b)  # the 2 angles of the rank-2 subspace
    for deficient in (with_zero_column, with_repeated_column):
        angles = principal_angles(deficient, b)
        assert torch.isfinite(angles).all()
        assert torch.allclose(angles.sort().values[-2:], reference, atol=1e-5)
        assert angles.sort().values[0].abs() < 1e-7  # the missing angle is reported as 0
    zero = principal_angles(torch.zeros(12, 3), b)
    assert torch.equal(zero, torch.zeros(3))


def test_principal_angles_broadcast_and_reject_bad_shapes():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 9, 2, generator=g), torch.randn(9, 4, generator=g)
    batched = principal_angles(a, b)
    assert batched.shape == (5, 2)
    assert torch.allclose(batched[3], principal_angles(a[3], b), atol=1e-6)
    with pytest.raises(UserError, match="same number of rows"):
        principal_angles(torch.randn(4, 2), torch.randn(5, 2))


# ------------------------------------------------------------------ pairwise distances
def per_pair(factors, fn):
    """The definition, pair by pair: fn(principal angles of (f[i], f[j])) summed over the factors."""
    n = factors[0].shape[0]
    i, j = torch.cartesian_prod(torch.arange(n), torch.arange(n)).unbind(1)  # every ordered pair
    return sum(fn(principal_angles(f[i], f[j])) for f in factors).view(n, n)


def test_pairwise_pabs_and_csa_match_the_per_pair_definition():
    factors = random_factors(9, c_in=6, rank=2, seed=7)
    factors[0][4] = factors[0][1]  # a duplicated head
    factors[1][6] = 0  # a zero body
    factors[0][2][:, 1] = 0  # a rank-deficient head: one zero column
    pabs = pairwise_distance(factors, "pabs")
    csa = pairwise_distance(factors, "csa")
    assert torch.allclose(pabs, per_pair(factors, lambda t: t.sum(-1)), atol=1e-4)
    assert torch.allclose(csa, per_pair(factors, lambda t: torch.cos(t).square().sum(-1)), atol=1e-4)
    assert torch.equal(pabs, pabs.T) and torch.all(pabs.diagonal() == 0)
    assert torch.isfinite(pabs).all() and torch.isfinite(csa).all()


def test_pairwise_pabs_of_many_filters_matches_per_pair_angles_on_sampled_pairs():
    # 160 filters: 12,720 pairs, enough for several Gram row blocks and the threaded eigensolver
    factors = random_factors(160, c_in=24, rank=4, seed=8)
    pabs = pairwise_distance(factors, "pabs")
    g = torch.Generator().manual_seed(9)
    i, j = torch.randint(0, 160, (2, 64), generator=g)
    expected = sum(principal_angles(f[i], f[j]).sum(-1) for f in factors)
    assert torch.allclose(pabs[i, j], expected, atol=1e-4)


def test_pairwise_distance_rejects_bad_input():
    with pytest.raises(UserError, match="shaped"):
        pairwise_distance([torch.randn(3, 4)])
    with pytest.raises(UserError, match="same N"):
        pairwise_distance([torch.randn(3, 4, 2), torch.randn(2, 4, 2)])
    with pytest.raises(UserError, match="choose one of"):
        pairwise_distance(random_factors(3), "cosine")


def test_variance_based_distance_known_values():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(20, generator=g)
    filters = torch.stack([w, w + 3.0, -w, torch.randn(20, generator=g), torch.zeros(20)])
    d = variance_based_distance(filters)
    assert d[0, 1].abs() < 1e-12  # equal up to a constant
    assert torch.isclose(d[0, 2], torch.tensor(2.0, dtype=d.dtype))  # opposite filters
    x, y = filters[0], filters[3]
    assert torch.isclose(d[0, 3], ((x - y).var() / (x.var() + y.var())).double(), atol=1e-6)
    assert torch.isclose(d[0, 4], torch.tensor(1.0, dtype=d.dtype))  # a zero filter
    assert torch.isfinite(d).all() and torch.equal(d, d.T)


def test_vbd_of_factors_is_the_vbd_of_the_rebuilt_filters():
    factors = random_factors(6, seed=11)
    dense = block_from(factors).dense_weight().detach()
    assert torch.allclose(pairwise_distance(factors, "vbd"), variance_based_distance(dense).float(), atol=1e-6)
