"""Filter-pruning criteria: in which order to remove the output filters of a layer.

A criterion is any callable ``(layer: nn.Module) -> Tensor`` that returns a
*removal order*: a LongTensor ``(N,)`` holding every filter index once, the
filter to remove first at position 0 and the most important filter last.
Keeping ``k`` filters means keeping ``order[-k:]``.

The paper's criteria compare filters through the column spaces of their CP
factors (head ``A_n (C_in, R)``, body ``B_n (k_h, R)``, tail ``C_n (k_w, R)``):
column spaces do not change when CP's scaling/permutation ambiguity rescales or
reorders the rank-one terms, so they describe the filter, not the run of ALS
that produced it.

- ``"pabs"``: distance = sum of the principal angles between the head
  subspaces, plus those of the body and of the tail subspaces.
- ``"csa"``: similarity = sum of ``cos^2`` of the same angles.
- ``"pabs-norm"``: pabs's distance and greedy pairs, but within the closest pair the
  filter with the smaller norm goes first (not the one closer to all the others).
- ``"vbd"``: variance-based distance ``Var(w_i - w_j) / (Var(w_i) + Var(w_j))``
  between the dense filters.
- ``"l1"``, ``"random"``: baselines.

Distance criteria become an order greedily (:func:`removal_order`): take the
closest remaining pair, remove the member closer to all remaining filters
(``"pabs-norm"``: the member with the smaller filter norm), repeat. See docs/pruning_criteria.md for the definitions, edge cases and how
they differ from the reference implementation. The distances themselves
(principal angles, batched over all pairs) live in :mod:`norton.pruning.angles`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.pruning.angles import (
    MEASURES,
    Measure,
    _column_space,
    _float,
    pairwise_distance,
    principal_angles,
    variance_based_distance,
)

__all__ = [
    "MEASURES", "Criterion", "L1NormCriterion", "Measure", "RandomCriterion", "SubspaceCriterion",
    "VarianceCriterion", "filter_norms", "filter_removal_order", "filters_to_keep", "get_criterion",
    "importance_from_removal_order", "layer_factors", "list_criteria", "pairwise_distance",
    "principal_angles", "register_criterion", "removal_order", "variance_based_distance",
]

Criterion = Callable[[nn.Module], Tensor]


# --------------------------------------------------------------------------- greedy order
@torch.no_grad()
def removal_order(distance_matrix: Tensor, *, similarity: bool = False, norms: Tensor | None = None) -> Tensor:
    """Greedy removal order ``(N,)`` from a symmetric distance (or similarity) matrix ``(N, N)``.

    Repeatedly take the closest remaining pair (largest similarity when
    ``similarity``), remove the member with the smaller total distance (larger
    total similarity) to the remaining filters, i.e. the more redundant one;
    ties remove the higher index. The filter left last is the most important.
    With ``norms (N,)``, the member of the pair with the smaller norm is removed
    instead (equal norms fall back to the total-distance rule). Returns a CPU LongTensor.
    """
    if not isinstance(distance_matrix, Tensor) or distance_matrix.ndim != 2:
        raise UserError("removal_order expects a square (N, N) distance matrix")
    n = distance_matrix.shape[0]
    if distance_matrix.shape[1] != n:
        raise UserError(f"removal_order expects a square matrix, got shape {tuple(distance_matrix.shape)}")
    base = distance_matrix.detach().to("cpu", torch.float64).numpy().copy()  # (N, N)
    if similarity:
        base = -base  # most similar = closest; largest total similarity = smallest total distance
    np.fill_diagonal(base, 0.0)
    if not np.isfinite(base).all():
        raise UserError("removal_order: the distance matrix has NaN or infinite entries")
    if norms is not None and (not isinstance(norms, Tensor) or norms.shape != (n,)):
        raise UserError(f"removal_order: norms must have shape ({n},), got {getattr(norms, 'shape', norms)!r}")
    size = None if norms is None else norms.detach().to("cpu", torch.float64).numpy()  # (N,)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    # The N steps are inherently sequential. Each is O(N) thanks to cached nearest
    # neighbours; NumPy because its per-call overhead on length-N vectors is ~5x
    # lower than PyTorch's, and that overhead is the whole cost here.
    work = base.copy()
    np.fill_diagonal(work, np.inf)  # removed filters become inf rows and columns
    neighbour = work.argmin(1)  # (N,) closest remaining filter of every filter
    nearest = work[np.arange(n), neighbour]  # (N,) its distance
    alive = np.ones(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    for step in range(n - 1):
        i = int(nearest.argmin())
        j = int(neighbour[i])
        # totals to the remaining filters, summed afresh: a running total drifts by
        # rounding, which breaks exact ties (always one at the last step)
        if size is not None and size[i] != size[j]:
            victim = i if size[i] < size[j] else j  # norm-aware: the weaker of two near-parallel filters
        else:
            victim = i if base[i, alive].sum() < base[j, alive].sum() else j
        order[step] = victim
        alive[victim] = False
        work[victim, :] = np.inf
        work[:, victim] = np.inf
        nearest[victim] = np.inf
        stale = np.flatnonzero(alive & (neighbour == victim))  # rows whose nearest filter just left
        if stale.size:
            rows = work[stale]  # (S, N)
            neighbour[stale] = rows.argmin(1)
            nearest[stale] = rows[np.arange(stale.size), neighbour[stale]]
    order[n - 1] = np.flatnonzero(alive)[0]
    return torch.from_numpy(order)


def importance_from_removal_order(order: Tensor) -> Tensor:
    """Importance scores ``(N,)`` float, ``score[order[i]] = i``: higher means keep (torch-pruning's convention)."""
    order = order.long().flatten()
    scores = torch.empty(order.numel(), dtype=torch.float32, device=order.device)
    scores[order] = torch.arange(order.numel(), dtype=torch.float32, device=order.device)
    return scores


def filters_to_keep(order: Tensor, n_keep: int) -> Tensor:
    """The ``n_keep`` filters removed last, sorted by index ``(n_keep,)``."""
    if not 0 <= n_keep <= order.numel():
        raise UserError(f"n_keep must lie in [0, {order.numel()}], got {n_keep!r}")
    if n_keep == 0:
        return order[:0].long()
    return order[-n_keep:].long().sort().values


# --------------------------------------------------------------------------- layers
def _output_filters(layer: nn.Module) -> Tensor:
    """The dense weight ``(N, ...)`` of ``layer``, one output filter per row of dim 0."""
    if isinstance(layer, CPDBlock):
        return layer.dense_weight().detach()  # (N, C_in, k_h, k_w)
    if (isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed) or isinstance(layer, nn.Linear):
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise UserError(f"the {type(layer).__name__} is lazy and not initialised yet: run one forward pass first")
        return layer.weight.detach()  # (N, C_in / groups, *kernel) or (N, in_features)
    raise UserError(
        f"pruning criteria support CPDBlock, nn.Conv1d/2d/3d and nn.Linear layers, got {type(layer).__name__}"
    )


def filter_norms(layer: nn.Module) -> Tensor:
    """Frobenius norm ``(N,)`` of each output filter (a CPDBlock's dense-equivalent filters), float64."""
    return _output_filters(layer).flatten(1).double().norm(dim=1)


def layer_factors(layer: nn.Module, *, rank: int | None = None) -> tuple[Tensor, ...]:
    """Per-filter factor matrices ``[(N, m_f, p_f), ...]`` whose column spaces describe each filter.

    A CPDBlock gives its CP factors ``head (N, C_in, R), body (N, k_h, R), tail (N, k_w, R)``.
    Any other layer gives the unfoldings of each filter ``W_n (C_in, k_1, ...)``
    along every mode, e.g. ``(N, C_in, k_h k_w), (N, k_h, C_in k_w), (N, k_w, C_in k_h)``:
    for a rank-R CP tensor the mode-d unfolding's column space *is* the span of its
    mode-d factor (when R does not exceed the product of the other dimensions), so
    this is the CP criterion without running ALS. ``rank`` keeps only the leading
    ``rank`` singular directions of each unfolding (ignored for CPDBlocks). A
    Linear layer or a 1x1 convolution thus compares filters as lines: the angle
    between ``w_i`` and ``w_j`` up to sign.
    """
    if isinstance(layer, CPDBlock):
        return tuple(_float(f) for f in layer.factors())
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise UserError(f"rank must be a positive integer or None, got {rank!r}")
    weight = _float(_output_filters(layer))  # (N, C_in, *kernel) or (N, in_features)
    n = weight.shape[0]
    if weight.ndim == 2:
        return (weight.unsqueeze(-1),)  # Linear: (N, in, 1), each filter is one vector
    unfoldings = []
    # A length-1 mode (1x1 kernel, depthwise input) spans R^1: its angles are all 0
    # and pairwise_distance skips it at no cost, so no special case is needed.
    for mode in range(1, weight.ndim):  # loop over the 2-4 tensor modes, batched over filters
        unfolding = weight.movedim(mode, 1).reshape(n, weight.shape[mode], -1)  # (N, d_mode, rest)
        if rank is not None and rank < min(unfolding.shape[1:]):
            u, s = _column_space(unfolding)
            unfolding = u[..., :rank] * s[:, None, :rank]  # (N, d_mode, rank): leading subspace
        unfoldings.append(unfolding)
    return tuple(unfoldings)


def _num_filters(layer: nn.Module) -> int | None:
    if isinstance(layer, CPDBlock):
        return layer.out_channels
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        return layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return None


# --------------------------------------------------------------------------- criteria
class SubspaceCriterion:
    """``"pabs"`` (sum of principal angles, a distance) or ``"csa"`` (sum of cos^2, a similarity).

    Args:
        measure: ``"pabs"`` or ``"csa"``.
        rank: for layers that are not CPDBlocks, compare the leading ``rank``
            singular subspaces of the filters' unfoldings (None: all of them).
        smaller_norm_first: within each closest pair of the greedy order, remove the
            filter whose dense weight has the smaller Frobenius norm (``"pabs-norm"``)
            rather than the one with the smaller total distance to the others.
    """

    def __init__(
        self, measure: Literal["pabs", "csa"] = "pabs", *, rank: int | None = None, smaller_norm_first: bool = False
    ) -> None:
        if measure not in ("pabs", "csa"):
            raise UserError(f"SubspaceCriterion measure must be 'pabs' or 'csa', got {measure!r}")
        self.measure = measure
        self.rank = rank
        self.smaller_norm_first = smaller_norm_first

    @torch.no_grad()
    def __call__(self, layer: nn.Module) -> Tensor:
        factors = layer_factors(layer, rank=self.rank)
        values = pairwise_distance(factors, self.measure)
        norms = filter_norms(layer) if self.smaller_norm_first else None
        return removal_order(values, similarity=self.measure == "csa", norms=norms)

    def __repr__(self) -> str:
        extra = ", smaller_norm_first=True" if self.smaller_norm_first else ""
        return f"SubspaceCriterion({self.measure!r}, rank={self.rank}{extra})"


class VarianceCriterion:
    """``"vbd"``: greedy order on :func:`variance_based_distance` of the dense filters."""

    @torch.no_grad()
    def __call__(self, layer: nn.Module) -> Tensor:
        return removal_order(variance_based_distance(_output_filters(layer)))

    def __repr__(self) -> str:
        return "VarianceCriterion()"


class L1NormCriterion:
    """``"l1"``: smallest filter L1 norm removed first (a CPDBlock uses its dense-equivalent filters)."""

    @torch.no_grad()
    def __call__(self, layer: nn.Module) -> Tensor:
        norms = _output_filters(layer).flatten(1).abs().sum(1)  # (N,)
        return torch.sort(norms.cpu(), stable=True).indices

    def __repr__(self) -> str:
        return "L1NormCriterion()"


class RandomCriterion:
    """``"random"``: a uniformly random order, the same for the same ``seed`` and filter count."""

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, layer: nn.Module) -> Tensor:
        n = _num_filters(layer)
        if n is None:
            n = _output_filters(layer).shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)

    def __repr__(self) -> str:
        return f"RandomCriterion(seed={self.seed})"


# --------------------------------------------------------------------------- registry
_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable:
    """Decorator that registers a criterion under ``name``.

    Decorate a function ``(layer) -> removal order`` or a callable object; a
    decorated class registers an instance built with no arguments. The
    decorated object is returned unchanged. A name can be registered once.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"criterion name must be a non-empty string, got {name!r}")

    def decorator(obj):
        if name in _CRITERIA:
            raise ValueError(f"a pruning criterion named {name!r} is already registered")
        criterion = obj() if isinstance(obj, type) else obj
        if not callable(criterion):
            raise TypeError(f"criterion {name!r} must be callable as criterion(layer), got {type(obj).__name__}")
        _CRITERIA[name] = criterion
        return obj

    return decorator


def get_criterion(name: str) -> Criterion:
    """The criterion registered under ``name``."""
    try:
        return _CRITERIA[name]
    except (KeyError, TypeError):
        raise UserError(
            f"unknown pruning criterion {name!r}; available: {', '.join(list_criteria())}"
        ) from None


def list_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return sorted(_CRITERIA)


register_criterion("pabs")(SubspaceCriterion("pabs"))
register_criterion("csa")(SubspaceCriterion("csa"))
register_criterion("pabs-norm")(SubspaceCriterion("pabs", smaller_norm_first=True))
register_criterion("vbd")(VarianceCriterion())
register_criterion("l1")(L1NormCriterion())
register_criterion("random")(RandomCriterion(seed=0))


def filter_removal_order(layer: nn.Module, criterion: str | Criterion = "pabs") -> Tensor:
    """Removal order ``(N,)`` of ``layer``'s output filters under ``criterion`` (a name or a callable).

    The result is checked to be a permutation of ``range(N)``, so a faulty custom
    criterion fails here with a clear message rather than inside the pruner.
    """
    fn = get_criterion(criterion) if isinstance(criterion, str) else criterion
    if not callable(fn):
        raise UserError(f"criterion must be a registered name or a callable, got {type(criterion).__name__}")
    order = fn(layer)
    n = _num_filters(layer)
    label = criterion if isinstance(criterion, str) else getattr(fn, "__name__", type(fn).__name__)
    if not isinstance(order, Tensor) or order.ndim != 1 or (n is not None and order.numel() != n):
        shape = tuple(order.shape) if isinstance(order, Tensor) else type(order).__name__
        raise UserError(
            f"criterion {label!r} returned {shape} for a layer with {n} filters; "
            "it must return a 1-D permutation of range(N)"
        )
    if order.dtype.is_floating_point or order.dtype == torch.bool or order.is_complex():
        raise UserError(f"criterion {label!r} returned {order.dtype} values; it must return integer filter indices")
    order = order.long().cpu()
    if not torch.equal(order.sort().values, torch.arange(order.numel())):
        raise UserError(f"criterion {label!r} did not return a permutation of range({order.numel()})")
    return order
