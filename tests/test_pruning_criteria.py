"""Tests for the pruning criteria, their registry and the greedy removal order (norton.pruning.criteria)."""
import pytest
import torch
from torch import nn

from _factories import block_from, random_factors
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
    register_criterion,
    removal_order,
)

FACTOR_CRITERIA = ["pabs", "csa", "vbd"]




def is_permutation(order, n):
    return order.dtype == torch.long and torch.equal(order.sort().values, torch.arange(n))


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


# ------------------------------------------------------------------ norm-aware pabs
def _near_parallel_pair_layer() -> nn.Linear:
    """Filters 0 and 1 nearly parallel (the closest pair), 0 with norm 2 and 1 with norm 0.5.

    Filter 0 leans towards filters 2 and 3, so it has the smaller total distance to the
    others: pabs removes it (the large one), pabs-norm removes filter 1 (the small one).
    """
    layer = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        lean = torch.tensor([1.0, 0.1, 0.1])
        layer.weight.copy_(torch.stack([
            2.0 * lean / lean.norm(), torch.tensor([0.5, 0.0, 0.0]),
            torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]),
        ]))
    return layer


def test_pabs_norm_removes_the_smaller_filter_of_a_near_parallel_pair():
    layer = _near_parallel_pair_layer()
    distances = pairwise_distance(layer_factors(layer), "pabs")
    off_diagonal = distances + torch.eye(4) * 10
    assert divmod(int(off_diagonal.argmin()), 4) in ((0, 1), (1, 0))  # the closest pair is (0, 1)
    assert distances[0].sum() < distances[1].sum()  # pabs's rule picks filter 0 ...
    assert filter_removal_order(layer, "pabs")[0] == 0  # ... the one with norm 2: unchanged
    assert filter_removal_order(layer, "pabs-norm")[0] == 1  # the one with norm 0.5 goes first
    assert criteria.filter_norms(layer).tolist() == pytest.approx([2.0, 0.5, 1.0, 1.0])


def test_pabs_norm_with_equal_norms_is_pabs():
    torch.manual_seed(21)
    conv = nn.Conv2d(6, 12, 3)
    norms = torch.ones(12, dtype=torch.float64)  # every pair ties on norm: the total-distance rule decides
    distances = pairwise_distance(layer_factors(conv), "pabs")
    assert torch.equal(removal_order(distances, norms=norms), removal_order(distances))
    block = CPDBlock(6, 12, 2, 3)  # a CPDBlock's dense filters give the norms
    assert is_permutation(filter_removal_order(block, "pabs-norm"), 12)


def test_removal_order_with_norms_follows_the_rule_by_definition():
    g = torch.Generator().manual_seed(22)
    a = torch.rand(15, 15, generator=g, dtype=torch.float64)
    d = a + a.T
    norms = torch.rand(15, generator=g, dtype=torch.float64)
    alive, expected = list(range(15)), []
    while len(alive) > 1:  # closest pair, then the smaller norm goes
        i, j = min(((p, q) for p in alive for q in alive if p < q), key=lambda pair: d[pair].item())
        victim = i if norms[i] < norms[j] else j
        expected.append(victim)
        alive.remove(victim)
    assert removal_order(d, norms=norms).tolist() == expected + alive
    with pytest.raises(UserError, match=r"norms must have shape \(15,\)"):
        removal_order(d, norms=torch.ones(3))
