"""Principal angles between subspaces and all-pairs filter distances: pure batched math.

Every function here takes tensors and returns tensors; none knows about layers.
:mod:`norton.pruning.criteria` turns a layer into factor matrices and these
distances into a removal order.

- :func:`principal_angles`: angles between the column spaces of two (batched) matrices;
- :func:`pairwise_distance`: all-pairs ``pabs`` (sum of principal angles), ``csa``
  (sum of ``cos^2``) or ``vbd`` (variance-based distance) for ``N`` filters;
- :func:`variance_based_distance`: ``Var(w_i - w_j) / (Var(w_i) + Var(w_j))`` of dense filters.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from norton.errors import UserError

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
    total = _pairwise_subspace(factors[0], criterion)
    for f in factors[1:]:  # head, body, tail: 1-3 factors
        total = total + _pairwise_subspace(f, criterion)
    return total
