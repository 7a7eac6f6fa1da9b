"""Layer-wise CP: a rank-R CP decomposition of a whole conv kernel (Lebedev et al., ICLR 2015).

``W[n, c, i, j] ~= sum_r last[n, r] first[c, r] vertical[i, r] horizontal[j, r]``; as
layers: a 1x1 conv ``C -> R`` (``first``), a ``k_h x 1`` and a ``1 x k_w`` depthwise conv
(``vertical``, ``horizontal``), a 1x1 conv ``R -> N`` (``last``).

The algorithm is CP-ALS as in :mod:`norton.decomposition.cp_als` (SVD start, Bro's line
search with tensorly's schedule, a step is taken only where it lowers the error, each
kernel of a batch stops on its own), but laid out for the opposite regime: one (or a
few) large 4-way kernels and ranks in the hundreds instead of thousands of tiny 3-way
filters. So the batch is the leading dimension and the work is matmuls:

* every MTTKRP goes through the spatial slices ``W[:, :, i, j] (N, C)``: ``W_ij @ first``
  gives ``(k_h k_w, N, R)``, never an ``(N C, R)`` Khatri-Rao product (1 GB at rank 1000
  for a 512 x 512 layer), and the same product serves the two spatial factors;
* a sweep costs two ``N C k_h k_w R`` matmuls (three with the line search), plus ``R x R``
  solves; the error comes from the Gram matrices, ``||W||^2 - 2 <W, W_hat> + ||W_hat||^2``,
  and the returned error is computed exactly from the reconstruction.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from norton.decomposition.tucker2 import check_kernels
from norton.limits import MAX_RANK, check_finite, check_int


class LayerCPFactors(NamedTuple):
    """CP factors of ``W (N, C, k_h, k_w)`` (with a leading batch dim if ``W`` had one)."""

    first: Tensor  # (C, R)
    vertical: Tensor  # (k_h, R)
    horizontal: Tensor  # (k_w, R)
    last: Tensor  # (N, R)


@torch.no_grad()
def layer_cp(
    weight: Tensor, rank: int, *, n_iter_max: int = 100, tol: float = 1e-7, seed: int | None = 0,
    line_search: bool = True,
) -> tuple[LayerCPFactors, Tensor]:
    """Rank-``rank`` CP decomposition of a conv kernel over all four modes.

    Args:
        weight: ``(N, C, k_h, k_w)``, or ``(B, N, C, k_h, k_w)`` for same-shaped layers;
            any device. float32/float64 as given, other dtypes computed in float32.
        rank: ``1 <= R <= N C k_h k_w / max(N, C, k_h, k_w)`` (:func:`layer_cp_max_rank`,
            a rank at which an exact CP always exists).
        n_iter_max: most ALS sweeps.
        tol: a kernel stops once a sweep lowers its relative error by less than ``tol``.
        seed: seeds the filler columns of the SVD start for ranks above a mode size
            (``None``: 0); the result is deterministic.
        line_search: extrapolate each sweep's step and keep it where it lowers the error.

    Returns:
        ``(LayerCPFactors(first (C, R), vertical (k_h, R), horizontal (k_w, R), last (N, R)),
        error)``, the four columns of each term scaled to equal norms; ``error`` =
        ``||W - W_hat|| / ||W||``, a scalar tensor or ``(B,)`` (0 for an all-zero kernel).
    """
    rank = _check(weight, rank, n_iter_max, tol)
    batched = weight.dim() == 5
    work = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    w = (weight if batched else weight[None]).to(work)
    b, n, c, kh, kw = w.shape
    norm = w.flatten(1).norm(dim=1)  # (B,)
    w = w / torch.where(norm > 0, norm, 1.0)[:, None, None, None, None]  # unit norm: error is relative
    # spatial slices W_ij stacked, in both layouts, so each MTTKRP is one plain bmm
    slices = w.permute(0, 3, 4, 1, 2).reshape(b, kh * kw * n, c)  # (B, K N, C), row ij*N + n
    slices_t = w.permute(0, 3, 4, 2, 1).reshape(b, kh * kw * c, n)  # (B, K C, N), row ij*C + c

    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    first = _svd_start(w.transpose(1, 2).reshape(b, c, n * kh * kw), rank, generator)  # (B, C, R)
    vertical = _svd_start(w.permute(0, 3, 1, 2, 4).reshape(b, kh, n * c * kw), rank, generator)  # (B, kh, R)
    horizontal = _svd_start(w.permute(0, 4, 1, 2, 3).reshape(b, kw, n * c * kh), rank, generator)  # (B, kw, R)
    last = w.new_zeros(b, n, rank)  # never read: a sweep solves it first
    factors: tuple[Tensor, ...] = (last, first, vertical, horizontal)
    errors = (w.flatten(1).norm(dim=1) > 0).to(work)  # A = 0: error 1 (0 for an all-zero kernel)
    active = errors > 0

    for sweep in range(n_iter_max):
        candidate, new_errors = _sweep(slices, slices_t, factors, kh, kw)
        if line_search and sweep > 0:
            jump = 1.0 + math.sqrt(sweep)
            extrapolated = tuple(torch.lerp(old, new, jump) for old, new in zip(factors, candidate, strict=True))
            ext_errors = _error(slices, extrapolated, kh, kw)
            better = ext_errors < new_errors  # NaN compares False
            candidate = tuple(torch.where(better[:, None, None], e, f) for e, f in zip(extrapolated, candidate, strict=True))
            new_errors = torch.where(better, ext_errors, new_errors)
        take = active & (new_errors <= errors)  # NaN compares False: a broken step is not taken
        factors = tuple(torch.where(take[:, None, None], new, old) for new, old in zip(candidate, factors, strict=True))
        active = take & (errors - new_errors >= tol)
        errors = torch.where(take, new_errors, errors)
        if not bool(active.any()):  # the one host sync per sweep
            break

    last, first, vertical, horizontal = _balance(factors)
    result = LayerCPFactors(first, vertical, horizontal, last * norm[:, None, None])  # undo the normalisation
    error = (w - _to_tensor(LayerCPFactors(first, vertical, horizontal, last))).flatten(1).norm(dim=1)
    dtype = weight.dtype if weight.dtype.is_floating_point else work
    result = LayerCPFactors(*(f.to(dtype).contiguous() for f in _balance_result(result)))
    if not batched:
        return LayerCPFactors(*(f[0] for f in result)), error[0]
    return result, error


def layer_cp_to_tensor(factors: LayerCPFactors) -> Tensor:
    """The kernel ``(N, C, k_h, k_w)`` (or ``(B, N, C, k_h, k_w)``) the factors stand for."""
    if factors.first.dim() == 2:
        return _to_tensor(LayerCPFactors(*(f[None] for f in factors)))[0]
    return _to_tensor(factors)


def layer_cp_max_rank(weight_shape: tuple[int, ...]) -> int:
    """``N C k_h k_w / max(N, C, k_h, k_w)``: a CP rank at which every such kernel is exact."""
    sizes = weight_shape[-4:]
    return math.prod(sizes) // max(sizes)


# ------------------------------------------------------------------ ALS
def _sweep(
    slices: Tensor, slices_t: Tensor, factors: tuple[Tensor, ...], kh: int, kw: int
) -> tuple[tuple[Tensor, ...], Tensor]:
    """One ALS sweep (last, first, vertical, horizontal in turn) -> new factors, errors ``(B,)``.

    ``slices (B, K N, C)`` and ``slices_t (B, K C, N)``: the spatial slices ``W_ij`` stacked.
    """
    _, first, vertical, horizontal = factors
    b, c = slices.shape[0], slices.shape[2]
    k, n = kh * kw, slices_t.shape[2]
    grams = {"first": _gram(first), "vertical": _gram(vertical), "horizontal": _gram(horizontal)}
    spatial = _khatri_rao(vertical, horizontal)  # (B, K, R), row i*kw + j
    y = (slices @ first).reshape(b, k, n, -1)  # sum_c W_ij[n, c] first[c, r]: (B, K, N, R)
    last = _solve((y * spatial[:, :, None]).sum(1), grams["first"] * grams["vertical"] * grams["horizontal"])
    gram_last = _gram(last)
    y = (slices_t @ last).reshape(b, k, c, -1)  # sum_n W_ij[n, c] last[n, r]: (B, K, C, R)
    first = _solve((y * spatial[:, :, None]).sum(1), gram_last * grams["vertical"] * grams["horizontal"])
    gram_first = _gram(first)
    both = (y * first[:, None]).sum(2).reshape(b, kh, kw, -1)  # sum_{n,c} W[n,c,i,j] last first: (B, kh, kw, R)
    vertical = _solve((both * horizontal[:, None]).sum(2), gram_last * gram_first * grams["horizontal"])
    gram_vertical = _gram(vertical)
    mttkrp = (both * vertical[:, :, None]).sum(1)  # (B, kw, R)
    gram_rest = gram_last * gram_first * gram_vertical
    horizontal = _solve(mttkrp, gram_rest)
    # ||W - W_hat||^2 = 1 - 2 <W, W_hat> + ||W_hat||^2 for unit-norm W
    squared = 1 - 2 * (horizontal * mttkrp).sum((1, 2)) + (gram_rest * _gram(horizontal)).sum((1, 2))
    return (last, first, vertical, horizontal), squared.clamp_min(0).sqrt()


def _error(slices: Tensor, factors: tuple[Tensor, ...], kh: int, kw: int) -> Tensor:
    """Relative error ``(B,)`` of ``factors`` for unit-norm kernels (one big matmul)."""
    last, first, vertical, horizontal = factors
    y = (slices @ first).reshape(first.shape[0], kh * kw, last.shape[1], -1)  # (B, K, N, R)
    inner = (y * _khatri_rao(vertical, horizontal)[:, :, None] * last[:, None]).sum((1, 2, 3))
    rebuilt = (_gram(last) * _gram(first) * _gram(vertical) * _gram(horizontal)).sum((1, 2))
    return (1 - 2 * inner + rebuilt).clamp_min(0).sqrt()


def _gram(factor: Tensor) -> Tensor:
    return factor.transpose(1, 2) @ factor  # (B, P, R) -> (B, R, R)


def _khatri_rao(left: Tensor, right: Tensor) -> Tensor:
    """``(B, P, R), (B, Q, R) -> (B, P Q, R)``, row ``p Q + q``."""
    return (left[:, :, None] * right[:, None]).flatten(1, 2)


def _solve(mttkrp: Tensor, gram: Tensor) -> Tensor:
    """``mttkrp @ gram^-1`` per kernel: ``(B, P, R)``, PSD ``(B, R, R)``.

    A ridge of ``10 eps`` times each diagonal entry (plus the smallest normal number)
    keeps singular Grams (rank above a mode size, zero kernels) solvable, as in cp_als.
    Cholesky, without error checks: on these small systems the checks and pivoting of
    ``linalg.solve`` cost more than the solve. Should rounding ever break it, the step
    is not taken (its error is NaN or higher).
    """
    finfo = torch.finfo(gram.dtype)
    ridged = gram + torch.diag_embed(gram.diagonal(dim1=1, dim2=2) * (10 * finfo.eps) + finfo.tiny)
    factor, _ = torch.linalg.cholesky_ex(ridged)
    return torch.cholesky_solve(mttkrp.transpose(1, 2), factor).transpose(1, 2)  # gram symmetric


def _svd_start(unfolding: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """``(B, P, M) -> (B, P, R)``: leading left singular vectors times singular values (from
    the ``P x P`` Gram, sign-fixed), then seeded normal filler columns past ``P`` or past a
    zero singular value; the draw is on the CPU so every device starts alike."""
    b, p, _ = unfolding.shape
    values, vectors = torch.linalg.eigh(unfolding @ unfolding.transpose(1, 2))  # ascending
    values, vectors = values.flip(-1)[:, :rank], vectors.flip(-1)[..., :rank]  # (B, q), (B, P, q)
    pivot = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    vectors = torch.where(pivot < 0, -vectors, vectors) * values.clamp_min(0).sqrt()[:, None]
    filler = torch.randn(1, p, rank, generator=generator, dtype=unfolding.dtype).to(unfolding.device).expand(b, p, rank)
    used = vectors.shape[2]
    scale = values[:, :1].clamp_min(0).sqrt()[:, None] / math.sqrt(p)  # filler on the data's scale
    vectors = torch.where(values[:, None] > 0, vectors, filler[:, :, :used] * scale)
    return torch.cat([vectors, filler[:, :, used:] * scale], dim=2)


def _balance(factors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Equal column norms across the four factors of every term (their product kept)."""
    norms = [f.norm(dim=1, keepdim=True) for f in factors]  # 4 x (B, 1, R)
    target = math.prod(norms).pow(1 / len(norms))
    return tuple(
        torch.where(norm > 0, f * (target / torch.where(norm > 0, norm, 1.0)), 0.0)
        for f, norm in zip(factors, norms, strict=True)
    )


def _balance_result(factors: LayerCPFactors) -> LayerCPFactors:
    last, first, vertical, horizontal = _balance((factors.last, factors.first, factors.vertical, factors.horizontal))
    return LayerCPFactors(first, vertical, horizontal, last)


def _to_tensor(factors: LayerCPFactors) -> Tensor:
    first, vertical, horizontal, last = factors  # (B, C, R), (B, kh, R), (B, kw, R), (B, N, R)
    b, n, rank = last.shape
    spatial = _khatri_rao(vertical, horizontal)  # (B, K, R)
    left = (last[:, :, None] * first[:, None]).reshape(b, -1, rank)  # (B, N C, R)
    return (left @ spatial.transpose(1, 2)).reshape(b, n, first.shape[1], vertical.shape[1], horizontal.shape[1])


def _check(weight: object, rank: object, n_iter_max: object, tol: object) -> int:
    weight = check_kernels(weight)
    bound = min(layer_cp_max_rank(tuple(weight.shape)), MAX_RANK)
    checked = check_int(rank, "layer CP rank", minimum=1, maximum=bound)
    check_int(n_iter_max, "n_iter_max", minimum=1, maximum=100_000)
    check_finite(tol, "tol", minimum=0.0)
    return checked
