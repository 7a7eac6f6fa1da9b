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
- ``"vbd"``: variance-based distance ``Var(w_i - w_j) / (Var(w_i) + Var(w_j))``
  between the dense filters.
- ``"l1"``, ``"random"``: baselines.

Distance criteria become an order greedily (:func:`removal_order`): take the
closest remaining pair, remove the member closer to all remaining filters,
repeat. See docs/pruning_criteria.md for the definitions, edge cases and how
they differ from the reference implementation.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError

Criterion = Callable[[nn.Module], Tensor]
Measure = Literal["pabs", "csa", "vbd"]
MEASURES = ("pabs", "csa", "vbd")

# Largest intermediate tensor (elements) the pairwise computations build at once.
_BLOCK_ELEMENTS = 1 << 24
# Angles with cos^2 >= 1/2 (below pi/4) are taken from their sine: arccos is
# ill-conditioned near cos = 1, arcsin of the residual's singular values is not.
_SINE_THRESHOLD = 0.5


# --------------------------------------------------------------------------- subspaces
def _float(tensor: Tensor) -> Tensor:
    """``tensor`` detached, in float32 or float64 (linalg kernels need one of them)."""
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.detach().to(dtype)


def _column_space(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``(..., m, k)`` and singular values ``(..., k)`` of ``(..., m, p)``, ``k = min(m, p)``.

    A QR first, then the SVD of the small ``k x k`` triangular factor: for the
    tall (C_in x R) and wide (k_h x C_in k_w) matrices met here this is several
    times cheaper than a batched ``linalg.svd``, and it avoids MKL's threaded SVD,
    which slows down by 10-50x when the cores are shared with other jobs.
    """
    m, p = matrices.shape[-2:]
    if m >= p:
        q, r = torch.linalg.qr(matrices)  # (..., m, p), (..., p, p)
        u, s, _ = torch.linalg.svd(r)  # (..., p, p)
        return q @ u, s
    _, r = torch.linalg.qr(matrices.mT, mode="r")  # A^T = Q R, so A = R^T Q^T spans the columns of R^T
    u, s, _ = torch.linalg.svd(r.mT)  # (..., m, m)
    return u, s


def _singular_values(matrices: Tensor) -> Tensor:
    """Singular values ``(..., p)`` of tall ``(..., m, p)`` matrices, through their QR (see :func:`_column_space`)."""
    _, r = torch.linalg.qr(matrices, mode="r")  # (..., p, p)
    return torch.linalg.svdvals(r)


def _subspace_basis(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of the column spaces of ``matrices (..., m, p)``.

    Returns ``basis (..., m, k)`` with ``k = min(m, p)`` and ``rank (...,)``: the
    first ``rank`` columns of ``basis`` are orthonormal and span the column space,
    the others are zero. The rank is read from the singular values (relative
    tolerance ``max(m, p) * eps``) because a plain QR returns arbitrary unit
    vectors for zero or collinear columns, which would invent directions.
    """
    m, p = matrices.shape[-2:]
    u, s = _column_space(matrices)  # (..., m, k), (..., k) descending
    tol = s[..., :1] * (max(m, p) * torch.finfo(s.dtype).eps)  # (..., 1); 0 for a zero matrix
    keep = s > tol  # (..., k), a prefix since s is sorted in descending order
    return u * keep.unsqueeze(-2), keep.sum(-1)


def _angles_from_bases(qa: Tensor, rank_a: Tensor, qb: Tensor, rank_b: Tensor) -> Tensor:
    """Principal angles ``(..., k)`` between bases from :func:`_subspace_basis`, ``k = max(k_a, k_b)``.

    The ``min(rank_a, rank_b)`` existing angles come first, in ascending order;
    the remaining slots are 0. Batch shapes of the inputs must already agree.
    """
    k = max(qa.shape[-1], qb.shape[-1])
    qa = F.pad(qa, (0, k - qa.shape[-1]))  # (..., m, k): zero columns span nothing
    qb = F.pad(qb, (0, k - qb.shape[-1]))
    count = torch.minimum(rank_a, rank_b).unsqueeze(-1)  # (..., 1) number of existing angles
    cosines = torch.linalg.svdvals(qa.mT @ qb).clamp(0.0, 1.0)  # (..., k) descending
    # Sines: the smaller subspace's basis minus its projection on the larger one.
    a_is_smaller = (rank_a < rank_b)[..., None, None]
    larger = torch.where(a_is_smaller, qb, qa)
    smaller = torch.where(a_is_smaller, qa, qb)
    residual = smaller - larger @ (larger.mT @ smaller)  # (..., m, k)
    sines = _singular_values(residual).clamp(0.0, 1.0)  # (..., k) descending (m >= k)
    slot = torch.arange(k, device=qa.device)
    # Angle t (ascending) has cosine cosines[t] and sine sines[count - 1 - t].
    sines = sines.gather(-1, (count - 1 - slot).clamp_min(0).expand_as(sines))
    angles = torch.where(cosines.square() >= _SINE_THRESHOLD, torch.asin(sines), torch.acos(cosines))
    return torch.where(slot < count, angles, torch.zeros_like(angles))


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles between the column spaces of ``a (..., m, p)`` and ``b (..., m, q)``.

    Returns ``(..., min(p, q))`` angles in ``[0, pi/2]``, sorted ascending. Batch
    dimensions broadcast. Bases come from an SVD (through a QR) with a rank tolerance, so
    rank-deficient inputs (zero or repeated columns, a zero matrix) are fine: only
    ``min(rank a, rank b)`` angles exist and the other slots are 0, which leaves
    sums over angles unchanged. Angles below pi/4 use the sine formula (singular
    values of the residual of one basis projected on the other) and the others
    ``arccos`` of the singular values of ``Q_a^T Q_b``, so small angles are accurate
    to float precision rather than to its square root.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.ndim < 2 or b.ndim < 2:
        raise UserError("principal_angles expects two tensors of shape (..., m, p) and (..., m, q)")
    if a.shape[-2] != b.shape[-2]:
        raise UserError(
            f"principal_angles: both inputs need the same number of rows m, got {a.shape[-2]} and {b.shape[-2]}"
        )
    a, b = _float(a), _float(b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    m, p, q = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    slots = min(p, q)
    result = torch.zeros(*batch, slots, dtype=dtype, device=a.device)
    if slots == 0 or m == 0:
        return result
    qa, rank_a = _subspace_basis(a.expand(*batch, m, p))
    qb, rank_b = _subspace_basis(b.expand(*batch, m, q))
    angles = _angles_from_bases(qa, rank_a, qb, rank_b)  # (..., k)
    used = min(slots, angles.shape[-1])  # existing angles all sit in the first min(rank) slots
    result[..., :used] = angles[..., :used]
    return result.sort(dim=-1).values


# --------------------------------------------------------------------------- pairwise
def _eigvalsh(symmetric: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` of a batch ``(B, k, k)``, split over the intra-op threads on CPU.

    PyTorch runs batched LAPACK eigensolvers one matrix after another on one
    core; the kernels release the GIL, so Python threads make them use all cores.
    """
    workers = torch.get_num_threads() if symmetric.device.type == "cpu" else 1
    if workers <= 1 or symmetric.shape[0] < 4096:
        return torch.linalg.eigvalsh(symmetric)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return torch.cat(list(pool.map(torch.linalg.eigvalsh, symmetric.chunk(workers))))


def _pair_angle_sums(
    basis: Tensor, rank: Tensor, rows: Tensor, cols: Tensor, cross: Tensor
) -> Tensor:
    """Sum of principal angles ``(P,)`` for pairs ``(rows[t], cols[t])`` with cross-Grams ``cross (P, k, k)``.

    Cosines come from one batched eigensolve of ``M^T M``; pairs with an angle
    below pi/4 are recomputed with the sine formula (usually few: near-duplicates).
    """
    k = basis.shape[-1]
    count = torch.minimum(rank[rows], rank[cols])  # (P,) number of existing angles
    cos2 = _eigvalsh(cross.mT @ cross).clamp_(0.0, 1.0)  # (P, k) ascending; the `count` largest exist
    near = (cos2[:, -1] >= _SINE_THRESHOLD).nonzero().squeeze(1)  # pairs with an angle below pi/4
    angles = cos2.sqrt_().acos_()  # in place: (P, k) can be large
    if bool((count < k).any()):
        missing = torch.arange(k, device=basis.device) < (k - count).unsqueeze(-1)  # (P, k)
        angles.masked_fill_(missing, 0.0)
    sums = angles.sum(-1)
    chunk = max(1, _BLOCK_ELEMENTS // (basis.shape[-2] * k * 4))
    for start in range(0, near.numel(), chunk):  # loop over memory-bounded chunks of pairs
        pick = near[start : start + chunk]
        i, j = rows[pick], cols[pick]
        sums[pick] = _angles_from_bases(basis[i], rank[i], basis[j], rank[j]).sum(-1)
    return sums


def _pairwise_subspace(factor: Tensor, measure: Measure) -> Tensor:
    """All-pairs ``pabs`` distance or ``csa`` similarity ``(N, N)`` for one factor ``(N, m, p)``.

    Every cross-Gram ``M_ij = Q_i^T Q_j`` is a block of one matrix product of the
    stacked bases, computed in row blocks over the upper triangle only.
    """
    n, m, p = factor.shape
    slots = p  # principal_angles(A_i, A_j) returns min(p, p) = p slots
    basis, rank = _subspace_basis(factor)  # (N, m, k), (N,)
    k = basis.shape[-1]
    # A filter whose factor spans all of R^m (or nothing) has every existing angle
    # equal to 0 with every other filter: pabs 0, csa = slots. Only the others need work.
    active = ((rank > 0) & (rank < m)).nonzero().squeeze(1)
    na = active.numel()
    upper = torch.zeros(na, na, dtype=basis.dtype, device=basis.device)  # (na, na), strictly upper part
    if na >= 2:
        q, r = (basis, rank) if na == n else (basis[active], rank[active])  # (na, m, k), (na,)
        stacked = q.transpose(1, 2).reshape(na * k, m)  # (na*k, m): row i*k + a is basis vector a of filter i
        block = max(1, min(math.ceil(na / 8), _BLOCK_ELEMENTS // (na * k * k)))
        for start in range(0, na, block):  # loop over row blocks of the Gram, not over pairs
            stop = min(na, start + block)
            b, c = stop - start, na - start
            gram = stacked[start * k : stop * k] @ stacked[start * k :].T  # (b*k, c*k)
            gram = gram.view(b, k, c, k)  # gram[i, a, j, c'] = M_ij[a, c'] (local indices)
            is_upper = torch.arange(c, device=q.device)[None, :] > torch.arange(b, device=q.device)[:, None]
            if measure == "pabs":
                local_rows, local_cols = is_upper.nonzero().unbind(1)  # (P,), (P,)
                cross = gram.permute(0, 2, 1, 3)[local_rows, local_cols]  # (P, k, k) = M_ij
                sums = _pair_angle_sums(q, r, local_rows + start, local_cols + start, cross)
                values = torch.zeros(b, c, dtype=sums.dtype, device=q.device)
                values[local_rows, local_cols] = sums
            else:
                # sum over slots of cos^2: existing angles give ||M_ij||_F^2, missing ones cos^2(0) = 1
                missing = slots - torch.minimum(r[start:stop, None], r[None, start:])  # (b, c)
                values = (gram.square().sum((1, 3)) + missing) * is_upper
            upper[start:stop, start:] = values
    symmetric = upper + upper.T
    if measure == "pabs":
        full = torch.zeros(n, n, dtype=basis.dtype, device=basis.device)
    else:
        full = torch.full((n, n), float(slots), dtype=basis.dtype, device=basis.device)
        symmetric.fill_diagonal_(float(slots))
    if na == n:
        return symmetric
    full[active[:, None], active[None, :]] = symmetric
    return full


def variance_based_distance(filters: Tensor) -> Tensor:
    """All-pairs ``Var(w_i - w_j) / (Var(w_i) + Var(w_j))`` ``(N, N)`` for ``filters (N, ...)``.

    0 for filters equal up to an additive constant, about 1 for uncorrelated ones,
    up to 2 for ``w_j = -w_i``; 0 when both filters are constant. Computed in
    float64 from one Gram matrix of the centred filters.
    """
    x = filters.detach().flatten(1).to(torch.float64)  # (N, D)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    x = x - x.mean(1, keepdim=True)
    power = x.square().sum(1)  # (N,) = (D - 1) Var; the (D - 1) cancels in the ratio
    total = power[:, None] + power[None, :]  # (N, N)
    difference = (total - 2 * (x @ x.T)).clamp_min(0)  # (N, N) = ||x_i - x_j||^2
    distance = torch.where(total > 0, difference / total.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return distance.fill_diagonal_(0.0)


def pairwise_distance(factors: Sequence[Tensor], criterion: Measure = "pabs") -> Tensor:
    """All-pairs comparison ``(N, N)`` of filters given as factor matrices ``[(N, m_f, p_f), ...]``.

    ``"pabs"``: sum over factors of the sum of principal angles (a distance).
    ``"csa"``: sum over factors of the sum of ``cos^2`` of the same angles (a
    *similarity*: pass it to :func:`removal_order` with ``similarity=True``).
    ``"vbd"``: :func:`variance_based_distance` of the filters rebuilt from CP
    factors ``sum_r f1[:, r] o f2[:, r] o ...``. No Python loop over pairs.
    In float32, pabs angles within ~1e-3 of pi/2 are accurate to ~1e-4 rad (the
    cosines come from eigenvalues of ``M^T M``); float64 factors give float64 accuracy.
    """
    if criterion not in MEASURES:
        raise UserError(f"unknown measure {criterion!r} for pairwise_distance; choose one of {', '.join(MEASURES)}")
    factors = list(factors)
    if (
        not factors
        or not all(isinstance(f, Tensor) and f.ndim == 3 for f in factors)
        or len({f.shape[0] for f in factors}) != 1
    ):
        raise UserError("pairwise_distance expects a non-empty sequence of factors shaped (N, m, p) with the same N")
    factors = [_float(f) for f in factors]
    if criterion == "vbd":
        if len({f.shape[2] for f in factors}) != 1:
            raise UserError("vbd rebuilds filters from CP factors, which need the same rank (last dimension)")
        filters = factors[0]  # (N, m_1, R)
        for f in factors[1:]:
            filters = torch.einsum("n...r,nmr->n...mr", filters, f)  # outer product, rank kept apart
        return variance_based_distance(filters.sum(-1)).to(factors[0].dtype)
    return sum(_pairwise_subspace(f, criterion) for f in factors)


# --------------------------------------------------------------------------- greedy order
@torch.no_grad()
def removal_order(distance_matrix: Tensor, *, similarity: bool = False) -> Tensor:
    """Greedy removal order ``(N,)`` from a symmetric distance (or similarity) matrix ``(N, N)``.

    Repeatedly take the closest remaining pair (largest similarity when
    ``similarity``), remove the member with the smaller total distance (larger
    total similarity) to the remaining filters, i.e. the more redundant one;
    ties remove the higher index. The filter left last is the most important.
    Returns a CPU LongTensor.
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
    """

    def __init__(self, measure: Literal["pabs", "csa"] = "pabs", *, rank: int | None = None) -> None:
        if measure not in ("pabs", "csa"):
            raise UserError(f"SubspaceCriterion measure must be 'pabs' or 'csa', got {measure!r}")
        self.measure = measure
        self.rank = rank

    @torch.no_grad()
    def __call__(self, layer: nn.Module) -> Tensor:
        factors = layer_factors(layer, rank=self.rank)
        values = pairwise_distance(factors, self.measure)
        return removal_order(values, similarity=self.measure == "csa")

    def __repr__(self) -> str:
        return f"SubspaceCriterion({self.measure!r}, rank={self.rank})"


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
