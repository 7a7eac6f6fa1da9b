import math

import pytest
import torch
from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.pruning import criteria
from norton.pruning.criteria import (
    SubspaceCriterion,
    filter_removal_order,
    filters_to_keep,
    get_criterion,
    importance_from_removal_order,
    layer_factors,
    list_criteria,
    pairwise_distance,
    principal_angles,
    register_criterion,
    removal_order,
    variance_based_distance,
)

FACTOR_CRITERIA = ["pabs", "csa", "vbd"]


def random_factors(n, c_in=16, rank=2, kernel=3, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c_in, rank, generator=g),
        torch.randn(n, kernel, rank, generator=g),
        torch.randn(n, kernel, rank, generator=g),
    )


def block_from(factors):
    return CPDBlock.from_factors(tuple(f.contiguous() for f in factors))


def is_permutation(order, n):
    return order.dtype == torch.long and torch.equal(order.sort().values, torch.arange(n))


def rotation_2d(theta):
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


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


# ------------------------------------------------------------------ greedy order
def test_removal_order_known_answer():
    d = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 4.0], [5.0, 4.0, 0.0]])
    # closest pair (0, 1): filter 1 has the smaller total distance (5 < 6); then (0, 2) tie -> higher index
    assert removal_order(d).tolist() == [1, 2, 0]
    assert removal_order(-d, similarity=True).tolist() == [1, 2, 0]


def _greedy_by_definition(d: torch.Tensor) -> list[int]:
    """The greedy rule written plainly: O(N^3), totals summed afresh at every step."""
    alive = list(range(d.shape[0]))
    order = []
    while len(alive) > 1:
        i, j = min(((a, b) for a in alive for b in alive if a < b), key=lambda p: (d[p].item(), p))
        total_i, total_j = (sum(d[x, y].item() for y in alive if y != x) for x in (i, j))
        victim = i if total_i < total_j else j  # ties remove the higher index
        order.append(victim)
        alive.remove(victim)
    return order + alive


@pytest.mark.parametrize("seed", range(4))
def test_removal_order_follows_the_definition_exactly_including_the_final_tie(seed):
    # the last two filters always tie (each one's total is the distance between them):
    # a running total that drifts by rounding used to break that tie at random
    a = torch.rand(40, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = a + a.T
    assert removal_order(d).tolist() == _greedy_by_definition(d)


def test_removal_order_is_a_permutation_and_handles_tiny_inputs():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(12))
    assert is_permutation(removal_order(torch.cdist(x, x)), 40)
    assert removal_order(torch.zeros(1, 1)).tolist() == [0]
    assert removal_order(torch.zeros(0, 0)).numel() == 0
    with pytest.raises(UserError, match="NaN"):
        removal_order(torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]]))
    with pytest.raises(UserError, match="square"):
        removal_order(torch.zeros(2, 3))


def test_importance_and_keep_follow_the_removal_order():
    order = torch.tensor([3, 0, 4, 1, 2])
    scores = importance_from_removal_order(order)
    assert scores.tolist() == [1.0, 3.0, 4.0, 0.0, 2.0]
    assert filters_to_keep(order, 2).tolist() == [1, 2]
    with pytest.raises(UserError):
        filters_to_keep(order, 6)


# ------------------------------------------------------------------ criteria on layers
@pytest.mark.parametrize("name", FACTOR_CRITERIA)
def test_exact_duplicates_are_removed_before_distinct_filters(name):
    factors = random_factors(8, seed=13)
    for f in factors:
        f[5] = f[2]  # filter 5 duplicates filter 2
    order = filter_removal_order(block_from(factors), name)
    assert order[0].item() in (2, 5)


@pytest.mark.parametrize("name", FACTOR_CRITERIA)
def test_one_filter_of_each_near_duplicate_cluster_survives(name):
    centres = random_factors(3, seed=14)
    g = torch.Generator().manual_seed(15)
    cluster = torch.arange(12) % 3  # filters 0, 3, 6, 9 belong to cluster 0, ...
    factors = tuple(c[cluster] + 1e-3 * torch.randn(c[cluster].shape, generator=g) for c in centres)
    order = filter_removal_order(block_from(factors), name)
    kept = filters_to_keep(order, 3)
    assert sorted(cluster[kept].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("name", ["pabs", "csa", "l1"])
def test_a_dead_filter_is_removed_first(name):
    factors = random_factors(6, seed=16)
    factors[0][3] = 0  # head of filter 3 is zero: the filter is all zero
    block = block_from(factors)
    distances = pairwise_distance(block.factors(), "pabs")
    assert torch.isfinite(distances).all()
    assert filter_removal_order(block, name)[0].item() == 3


def test_l1_removes_the_smallest_norm_filter_first():
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight[4] *= 1e-3
    assert filter_removal_order(conv, "l1")[0].item() == 4
    factors = random_factors(5, seed=17)
    factors[2][1] *= 1e-3  # a CPDBlock is ranked by its dense-equivalent filters
    assert filter_removal_order(block_from(factors), "l1")[0].item() == 1


def test_random_is_deterministic_for_a_seed():
    conv = nn.Conv2d(3, 50, 3)
    assert torch.equal(criteria.RandomCriterion(seed=1)(conv), criteria.RandomCriterion(seed=1)(conv))
    assert not torch.equal(criteria.RandomCriterion(seed=1)(conv), criteria.RandomCriterion(seed=2)(conv))


def test_dense_conv_uses_the_subspaces_of_its_unfoldings():
    # filters of exact CP rank 2: a conv's unfoldings span the same subspaces as the CP factors
    factors = random_factors(7, c_in=12, rank=2, seed=18)
    block = block_from(factors)
    conv = block.to_conv()
    expected = pairwise_distance(block.factors(), "pabs")
    assert torch.allclose(pairwise_distance(layer_factors(conv), "pabs"), expected, atol=1e-4)
    assert torch.allclose(pairwise_distance(layer_factors(conv, rank=2), "pabs"), expected, atol=1e-4)
    assert torch.equal(SubspaceCriterion("pabs")(conv), filter_removal_order(block, "pabs"))


@pytest.mark.parametrize("name", list_criteria())
@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: CPDBlock(6, 9, 2, 3),
        lambda: nn.Conv2d(12, 9, 3),
        lambda: nn.Conv2d(12, 9, 1),
        lambda: nn.Conv1d(5, 9, 3),
        lambda: nn.Linear(7, 9),
    ],
    ids=["cpdblock", "conv3x3", "conv1x1", "conv1d", "linear"],
)
def test_every_registered_criterion_returns_a_permutation(name, make_layer):
    torch.manual_seed(19)
    assert is_permutation(filter_removal_order(make_layer(), name), 9)


@pytest.mark.parametrize("name", list_criteria())
def test_a_one_filter_layer_works(name):
    torch.manual_seed(20)
    for layer in (CPDBlock(4, 1, 2, 3), nn.Conv2d(4, 1, 3)):
        assert filter_removal_order(layer, name).tolist() == [0]


def test_unsupported_layer_is_a_user_error():
    with pytest.raises(UserError, match="BatchNorm2d"):
        filter_removal_order(nn.BatchNorm2d(4), "pabs")


# ------------------------------------------------------------------ registry
@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(criteria, "_CRITERIA", dict(criteria._CRITERIA))


def test_registry_lists_the_builtin_criteria():
    assert {"pabs", "csa", "vbd", "l1", "random"} <= set(list_criteria())


def test_duplicate_and_unknown_names_error(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("pabs")(lambda layer: torch.arange(1))
    with pytest.raises(UserError, match="available: .*pabs"):
        get_criterion("no-such-criterion")


def test_a_custom_criterion_plugs_in(scratch_registry):
    @register_criterion("largest-bias-first")
    def largest_bias_first(layer):
        return torch.argsort(layer.bias.detach(), descending=True)

    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0]))
    assert "largest-bias-first" in list_criteria()
    assert filter_removal_order(conv, "largest-bias-first").tolist() == [1, 3, 2, 0]

    @register_criterion("class-based")
    class ReverseIndex:
        def __call__(self, layer):
            return torch.arange(layer.out_channels).flip(0)

    assert filter_removal_order(conv, "class-based").tolist() == [3, 2, 1, 0]


def test_a_faulty_custom_criterion_is_reported():
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(UserError, match="permutation"):
        filter_removal_order(conv, lambda layer: torch.tensor([0, 0, 1, 2]))
    with pytest.raises(UserError, match="4 filters"):
        filter_removal_order(conv, lambda layer: torch.arange(3))
