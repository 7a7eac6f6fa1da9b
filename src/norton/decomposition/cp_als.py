"""Batched CP-ALS: rank-R CP decompositions of many small 3-way tensors at once.

``cp_als(tensors (B, I, J, K), rank)`` decomposes every ``tensors[b]`` (e.g. every
filter ``(C_in, k_h, k_w)`` of a convolution) with alternating least squares and
returns factors in the layout of :mod:`norton.decomposition.cp_tensor` plus the per-tensor
relative errors. There is no Python loop over tensors, only over sweeps.

Why it is fast on conv filters:

* **One sweep for the whole batch.** For tiny filters ALS costs per-call
  overhead, not arithmetic, so all filters (of all layers, with
  :func:`cp_als_many`) share every sweep. Inside a sweep the batch is the
  innermost dimension, so each step is one long vector op instead of thousands
  of 3x8 matrix products or LAPACK calls.
* **Head compression.** The mode-1 unfolding ``T (I, J*K)`` of a filter has rank
  ``<= J*K``: with ``T = Q R`` (``Q (I, m)`` orthonormal, ``m = min(I, J*K)``) the
  filter is exactly ``Q`` times an ``(m, J, K)`` core, and ``A = Q A_core`` has the
  same error on the filter as ``A_core`` on the core (``Q`` preserves norms). So
  every 3x3 layer, whatever ``C_in``, is a batch of ``(<= 9, 3, 3)`` cores; cores
  of different layers are zero-padded to a common ``m`` (zero rows of a core give
  zero rows of ``A_core``, so padding changes nothing) and stacked.
* **Fewer sweeps.** An SVD start and a line search (extrapolate each sweep's step,
  keep it where it lowers the error) get through the flat "swamps" of rank-8 fits
  of 3x3 filters in far fewer sweeps; converged tensors are dropped from the batch.

Safety: each sweep solves the three normal equations with a tiny ridge, so
singular Grams (rank above a mode size, all-zero tensors) stay solvable. A sweep
that does not lower a tensor's error is not taken for that tensor, and a tensor
whose error fell by less than ``tol`` stops. Hence the error never increases,
never becomes NaN, and a tensor's result does not depend on what else is in its
batch (up to float rounding).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from norton.decomposition.cp_tensor import CPFactors
from norton.errors import UserError

INITS = ("svd", "random")


# ------------------------------------------------------------------ public API
@overload
def cp_als(
    tensors: Tensor, rank: int, *, n_iter_max: int = ..., tol: float = ..., init: str = ...,
    seed: int | None = ..., return_history: Literal[False] = ...,
) -> tuple[CPFactors, Tensor]: ...
@overload
def cp_als(
    tensors: Tensor, rank: int, *, n_iter_max: int = ..., tol: float = ..., init: str = ...,
    seed: int | None = ..., return_history: Literal[True],
) -> tuple[CPFactors, Tensor, Tensor]: ...
def cp_als(
    tensors: Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    seed: int | None = None,
    return_history: bool = False,
) -> tuple[CPFactors, Tensor] | tuple[CPFactors, Tensor, Tensor]:
    """Rank-``rank`` CP decomposition of each tensor of a batch ``(B, I, J, K)``.

    Args:
        tensors: ``(B, I, J, K)``, e.g. a conv weight ``(N, C_in, k_h, k_w)``, on any
            device. float32/float64 are used as given; other dtypes are computed in
            float32 and the factors cast back (float32 for integer input).
        rank: ``R >= 1``; may exceed every mode size.
        n_iter_max: most ALS sweeps (a sweep updates all three factors once).
        tol: a tensor stops once a sweep lowers its relative error by less than
            ``tol``; the call returns when every tensor has stopped.
        init: ``"svd"``: leading left singular vectors of the unfoldings
            (deterministic); ``"random"``: standard normal factors.
        seed: seeds ``"random"`` (``None``: torch's global generator) and the filler
            columns ``"svd"`` needs when ``rank`` exceeds a mode size (``None``: 0).
        return_history: also return every tensor's error after each sweep.

    Returns:
        ``((A (B, I, R), B (B, J, R), C (B, K, R)), errors (B,))``: weights absorbed
        into the factors, the three columns of each rank-1 term scaled to equal
        norms; ``errors[b] = ||T_b - [[A_b, B_b, C_b]]|| / ||T_b||`` (an all-zero
        tensor gets zero factors and error 0). With ``return_history=True`` a third
        item ``(n_sweeps, B)`` holds the errors after each sweep (non-increasing
        down every column).
    """
    _check_tensors(tensors, "tensors")
    _check_options(rank, n_iter_max, tol, init)
    (factors,), errors, history = _decompose([tensors], rank, n_iter_max, tol, init, seed)
    return (factors, errors, history) if return_history else (factors, errors)


def cp_als_many(
    tensors: Sequence[Tensor],
    ranks: int | Sequence[int],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    seed: int | None = None,
) -> list[tuple[CPFactors, Tensor]]:
    """:func:`cp_als` on several batches (e.g. the weights of all conv layers) at once.

    Batches with the same ``(J, K)``, rank and working dtype share their ALS sweeps:
    after head compression each is a stack of ``(<= J*K, J, K)`` cores, so all 3x3
    layers of a VGG-16 make one batch of ~4k cores and run 2-3x faster than one
    :func:`cp_als` call per layer. Each batch gets the same start as in :func:`cp_als`
    and each tensor stops on its own, so ``cp_als_many(ws, r)[l]`` equals
    ``cp_als(ws[l], r)`` up to float rounding (which ALS can amplify in flat regions
    of the error: expect differences of ~1e-4 in the error, either way)::

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        for conv, (factors, errors) in zip(convs, cp_als_many([c.weight.detach() for c in convs], 8)):
            ...  # e.g. CPDBlock.from_factors(factors, bias=conv.bias, stride=conv.stride, ...)

    Args:
        tensors: batches ``(B_l, I_l, J_l, K_l)``, all on one device.
        ranks: one rank for all batches or one per batch.
        n_iter_max, tol, init, seed: as in :func:`cp_als`.

    Returns:
        ``[(factors_l, errors_l), ...]`` in the order of ``tensors``.
    """
    tensors = list(tensors)
    for index, batch in enumerate(tensors):
        _check_tensors(batch, f"tensors[{index}]")
    # a bool is refused by _check_options below, as a rank of its own
    ranks = [ranks] * len(tensors) if isinstance(ranks, int) else list(ranks)
    if len(ranks) != len(tensors):
        raise UserError(f"got {len(ranks)} ranks for {len(tensors)} tensors; pass one rank or one per tensor")
    for rank in ranks:
        _check_options(rank, n_iter_max, tol, init)
    if len({batch.device for batch in tensors}) > 1:
        raise UserError("all tensors given to cp_als_many must be on one device; move them there first")

    groups: dict[tuple, list[int]] = {}
    for index, (batch, rank) in enumerate(zip(tensors, ranks, strict=False)):
        groups.setdefault((tuple(batch.shape[2:]), rank, _working_dtype(batch.dtype)), []).append(index)
    results: list = [None] * len(tensors)
    for (_, rank, _), indices in groups.items():
        factors, errors, _ = _decompose([tensors[i] for i in indices], rank, n_iter_max, tol, init, seed)
        for i, layer_factors, layer_errors in zip(indices, factors, errors.split([len(tensors[i]) for i in indices]), strict=False):
            results[i] = (layer_factors, layer_errors)
    return results


def compress_head(tensors: Tensor) -> tuple[Tensor | None, Tensor]:
    """Exact mode-1 compression: ``tensors[b] = basis[b] x_1 core[b]``.

    ``tensors (B, I, J, K) -> basis (B, I, m), core (B, m, J, K)`` with ``m = min(I, J*K)``
    and orthonormal ``basis`` columns; ``basis`` is ``None`` (identity) when ``I <= J*K``.
    """
    n, i, j, k = tensors.shape
    if i <= j * k:
        return None, tensors
    basis, triangle = torch.linalg.qr(tensors.reshape(n, i, j * k))  # (B, I, J*K), (B, J*K, J*K)
    return basis, triangle.reshape(n, j * k, j, k)


# ------------------------------------------------------------------ pipeline
@torch.no_grad()  # a decomposition, not a differentiable op: parameters may be passed as they are
def _decompose(
    batches: list[Tensor], rank: int, n_iter_max: int, tol: float, init: str, seed: int | None
) -> tuple[list[CPFactors], Tensor, Tensor]:
    """Normalise, compress, run ALS on all cores at once, map back. All batches share (J, K)."""
    work = _working_dtype(batches[0].dtype)
    bases, cores, norms, bodies, tails = [], [], [], [], []
    for batch in batches:
        batch = batch.to(work)
        # unit-norm tensors: the core error is the relative error, and all numbers are O(1)
        norm = batch.flatten(1).norm(dim=1)  # (B,)
        basis, core = compress_head(batch / torch.where(norm > 0, norm, 1.0)[:, None, None, None])
        body, tail = _initial_factors(core, rank, init=init, seed=seed)  # per batch: same start alone or not
        bases.append(basis)
        cores.append(core)
        norms.append(norm)
        bodies.append(body)
        tails.append(tail)
    m = max(core.shape[1] for core in cores)
    stacked = torch.cat([torch.nn.functional.pad(core, (0, 0, 0, 0, 0, m - core.shape[1])) for core in cores])
    (a_core, body, tail), errors, history = _als(
        stacked, torch.cat(bodies), torch.cat(tails), n_iter_max=n_iter_max, tol=tol
    )

    out: list[CPFactors] = []
    sizes = [len(core) for core in cores]
    for basis, core, norm, a, b, c, batch in zip(
        bases, cores, norms, a_core.split(sizes), body.split(sizes), tail.split(sizes), batches, strict=False
    ):
        a = a[:, : core.shape[1]]  # drop the padding rows (zero)
        # contiguous: bmm on this strided view takes a per-matrix slow path (1000x slower)
        a = a if basis is None else basis @ a.contiguous()  # (B, m, R) -> (B, I, R)
        factors = _balance((a * norm[:, None, None], b, c))  # undo the normalisation
        dtype = batch.dtype if batch.dtype.is_floating_point else work
        head, body, tail = (f.to(dtype).contiguous() for f in factors)
        out.append((head, body, tail))
    return out, errors, history


def _initial_factors(cores: Tensor, rank: int, *, init: str, seed: int | None) -> tuple[Tensor, Tensor]:
    """Starting ``B (B, J, R)`` and ``C (B, K, R)``; ``A`` needs none (a sweep solves it first).

    ``"svd"``: leading left singular vectors of the mode-2/3 unfoldings times their
    singular values; columns past the mode size come from a seeded normal draw
    shared by all tensors, so a tensor's start does not depend on its batch.
    """
    n, m, j, k = cores.shape
    generator = None  # torch's global generator: honours torch.manual_seed
    if seed is not None or init == "svd":
        generator = torch.Generator().manual_seed(0 if seed is None else seed)

    def normal(batch: int, size: int) -> Tensor:
        # drawn on the CPU so a seed gives the same start on every device
        draw = torch.randn(batch, size, rank, generator=generator, dtype=cores.dtype)
        return draw.to(cores.device).expand(n, size, rank)

    if init == "random":
        return normal(n, j), normal(n, k)
    body = _leading_vectors(cores.transpose(1, 2).reshape(n, j, m * k), normal(1, j))  # from (B, J, m*K)
    tail = _leading_vectors(cores.permute(0, 3, 1, 2).reshape(n, k, m * j), normal(1, k))  # from (B, K, m*J)
    return body, tail


def _leading_vectors(unfolding: Tensor, filler: Tensor) -> Tensor:
    """``(B, J, R)``: left singular vectors of ``unfolding (B, J, N)`` times their singular
    values (sign-fixed: largest entry positive), then ``filler (B, J, R)`` columns for
    ranks past ``min(J, N)`` or past a zero singular value."""
    u, s, _ = torch.linalg.svd(unfolding, full_matrices=False)  # (B, J, q), (B, q)
    rank = filler.shape[2]
    pivot = u.gather(1, u.abs().argmax(dim=1, keepdim=True))  # (B, 1, q)
    u = torch.where(pivot < 0, -u, u)
    vectors = (u * s[:, None, :])[:, :, :rank]  # (B, J, min(q, R))
    used = vectors.shape[2]
    vectors = torch.where(s[:, None, :used] > 0, vectors, filler[:, :, :used])
    return torch.cat([vectors, filler[:, :, used:]], dim=2)


def _balance(factors: CPFactors) -> CPFactors:
    """Give the three columns of every rank-1 term the same norm (their product is kept).

    ALS leaves the scale split arbitrarily; equal norms keep the three convolutions
    of a CPDBlock on the same scale for fine-tuning. Zero terms stay zero.
    """
    norms = [f.norm(dim=1, keepdim=True) for f in factors]  # 3 x (B, 1, R)
    target = (norms[0] * norms[1] * norms[2]).pow(1 / 3)
    a, b, c = (
        torch.where(norm > 0, f * (target / torch.where(norm > 0, norm, 1.0)), 0.0)
        for f, norm in zip(factors, norms, strict=True)
    )
    return a, b, c


# ------------------------------------------------------------------ ALS kernel
def _als(
    cores: Tensor, body: Tensor, tail: Tensor, *, n_iter_max: int, tol: float, line_search: bool = True
) -> tuple[CPFactors, Tensor, Tensor]:
    """ALS on unit-norm (or zero) ``cores (B, m, J, K)`` from ``body (B, J, R)``, ``tail (B, K, R)``.

    Returns the factors ``(B, m, R), (B, J, R), (B, K, R)``, the errors ``(B,)`` and the
    errors after each sweep ``(n_sweeps, B)``.

    Layout: batch last, rank first: ``x (m, J, K, B)``, factors stacked as
    ``(R, m+J+K, B)``, so every op runs over contiguous batch vectors and a
    factor block comes out of :func:`_solve` as is.

    Per tensor and sweep: solve A, B, C in turn; with ``line_search``, also try
    ``new + sqrt(sweep) (new - old)`` (Bro's line search with the schedule of
    tensorly's ``linesearch=True``) and keep the better; take the result only if
    it does not raise the error; stop the tensor once its error falls by less than
    ``tol``. Tensors that stopped are dropped from the working batch whenever half
    of it has stopped.
    """
    n, m, j, k = cores.shape
    rank = body.shape[2]
    sizes = (m, j, k)
    x_all = cores.permute(1, 2, 3, 0).contiguous()  # (m, J, K, B)
    head = cores.new_zeros(n, m, rank)  # never read: a sweep solves A first
    factors_all = torch.cat((head, body, tail), dim=1).permute(2, 1, 0).contiguous()  # (R, m+J+K, B)
    # the start has A = 0, so its error is ||x||: 1, or 0 for an all-zero tensor
    errors_all = cores.flatten(1).norm(dim=1)  # (B,)

    index = torch.arange(n, device=cores.device)  # working batch -> position in the full batch
    x, factors, errors = x_all, factors_all.clone(), errors_all.clone()
    active = torch.ones(n, dtype=torch.bool, device=cores.device)
    history = []
    for sweep in range(n_iter_max):
        candidate, new_errors = _sweep(x, factors, sizes)
        if line_search and sweep > 0:
            jump = 1.0 + math.sqrt(sweep)
            extrapolated = torch.lerp(factors, candidate, jump)  # candidate + sqrt(sweep) (candidate - factors)
            ext_a, ext_b, ext_c = extrapolated.split(sizes, dim=1)
            ext_errors = _residual_norm(x, _khatri_rao(ext_a, ext_b), ext_c)
            better = ext_errors < new_errors  # NaN compares False
            candidate = torch.where(better, extrapolated, candidate)
            new_errors = torch.where(better, ext_errors, new_errors)
        accept = active & (new_errors <= errors)  # NaN compares False: a broken step is not taken
        factors = torch.where(accept, candidate, factors)
        active = accept & (errors - new_errors >= tol)
        errors = torch.where(accept, new_errors, errors)
        errors_all = errors_all.index_copy(0, index, errors)
        history.append(errors_all)
        still = int(active.sum())  # the one host sync per sweep
        if still == 0:
            break
        if still <= len(index) // 2:  # compact: write the stopped tensors back, keep the rest
            factors_all[:, :, index] = factors
            x, factors, errors, index = x[..., active], factors[..., active], errors[active], index[active]
            active = active[active]
    factors_all[:, :, index] = factors
    a, b, c = factors_all.permute(2, 1, 0).split(sizes, dim=1)  # (B, m+J+K, R) -> three (B, ., R)
    return (a, b, c), errors_all, torch.stack(history)


def _sweep(x: Tensor, factors: Tensor, sizes: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """One ALS sweep: ``x (m, J, K, B)``, ``factors (R, m+J+K, B)`` -> new factors, errors ``(B,)``.

    Contractions are sums of products accumulated in place over the small mode
    (``_accumulate``): no ``(R, m*J, K, B)`` temporaries, so the working set stays
    in cache (about 2x faster than broadcast-then-sum on a 4k batch).
    """
    m, j, k = sizes
    _, b, c = factors.split(sizes, dim=1)  # (R, J, B), (R, K, B)
    x_c = _accumulate((x[None, :, :, q], c[:, None, None, q]) for q in range(k))  # (R, m, J, B), reused
    gram_c = _gram(c)
    a = _solve(_accumulate((x_c[:, :, q], b[:, None, q]) for q in range(j)), _gram(b) * gram_c)  # (R, m, B)
    gram_a = _gram(a)
    b = _solve(_accumulate((x_c[:, p], a[:, p, None]) for p in range(m)), gram_a * gram_c)  # (R, J, B)
    a_b = _khatri_rao(a, b)  # (R, m*J, B)
    x_ab = x.flatten(0, 1)  # (m*J, K, B)
    c = _solve(_accumulate((a_b[:, p, None], x_ab[None, p]) for p in range(m * j)), gram_a * _gram(b))
    return torch.cat((a, b, c), dim=1), _residual_norm(x, a_b, c)


def _accumulate(products: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """``sum(u * v for u, v in products)`` with one in-place multiply-add per term."""
    products = iter(products)
    u, v = next(products)
    total = u * v
    for u, v in products:
        total.addcmul_(u, v)
    return total


def _gram(factor: Tensor) -> Tensor:
    """``(R, P, B) -> (R, R, B)``: ``G[r, s] = sum_p f[r, p] f[s, p]`` per tensor."""
    return _accumulate((factor[:, None, p], factor[None, :, p]) for p in range(factor.shape[1]))


def _khatri_rao(left: Tensor, right: Tensor) -> Tensor:
    """Column-wise Kronecker product ``(R, P, B), (R, Q, B) -> (R, P*Q, B)``, row ``p*Q + q``."""
    return (left[:, :, None] * right[:, None]).flatten(1, 2)


def _residual_norm(x: Tensor, a_b: Tensor, c: Tensor) -> Tensor:
    """``||x - [[A, B, C]]||_F`` per tensor ``(B,)`` from ``x (m, J, K, B)``, ``A (.) B (R, m*J, B)``, ``C (R, K, B)``.

    Exact, not the ``||x||^2 - 2<x, y> + ||y||^2`` shortcut, whose cancellation would
    hide errors below ~sqrt(eps) and break the acceptance test near exact fits.
    """
    rebuilt = _accumulate((a_b[r, :, None], c[r, None]) for r in range(c.shape[0]))  # (m*J, K, B)
    return (x.flatten(0, 1) - rebuilt).square().sum((0, 1)).sqrt()


def _solve(rhs: Tensor, gram: Tensor) -> Tensor:
    """``gram^-1 rhs`` per tensor: ``rhs (R, X, B)``, symmetric PSD ``gram (R, R, B)`` -> ``(R, X, B)``.

    This is the normal-equation update ``F = M G^-1`` in the rank-first layout. A
    ridge of ``10 eps`` times each diagonal entry (plus the smallest normal number)
    keeps singular Grams solvable and turns zero rows into zero factors. It is
    relative per entry, not to the mean diagonal: ALS often leaves one term's
    columns 1e4 times smaller than another's, and a mean-relative ridge would then
    bias that term (errors stalled near 1e-4 on exact float32 fits).
    Gauss-Jordan without pivoting, which is stable for positive definite matrices;
    each of its ``R`` steps is a few ops over all tensors at once.
    """
    r = gram.shape[0]
    finfo = torch.finfo(gram.dtype)
    system = torch.cat((gram, rhs), dim=1)  # (R, R+X, B)
    diagonal = system.diagonal(dim1=0, dim2=1)  # (B, R) view
    diagonal.mul_(1 + 10 * finfo.eps).add_(finfo.tiny)
    for step in range(r):
        pivot_row = system[step, step:] / system[step, step]  # (R+X-step, B)
        multipliers = system[:, step].clone()  # (R, B)
        system[:, step:].addcmul_(multipliers[:, None], pivot_row[None], value=-1)
        system[step, step:] = pivot_row
    return system[:, r:]


# ------------------------------------------------------------------ checks
def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_tensors(tensors: object, name: str) -> None:
    if not isinstance(tensors, Tensor):
        raise UserError(f"{name} must be a torch.Tensor of shape (B, I, J, K), got {type(tensors).__name__}")
    if tensors.dim() != 4:
        raise UserError(
            f"{name} must be 4-D (B, I, J, K), e.g. a conv weight (N, C_in, k_h, k_w); "
            f"got shape {tuple(tensors.shape)}"
        )
    if tensors.is_complex():
        raise UserError(f"{name} is complex ({tensors.dtype}); CP-ALS here supports real tensors only")
    if tensors.numel() == 0:
        raise UserError(f"{name} is empty (shape {tuple(tensors.shape)}); every dimension must be at least 1")
    if tensors.dtype.is_floating_point and not bool(torch.isfinite(tensors).all()):
        raise UserError(f"{name} contains NaN or inf; fix the weights before decomposing them")


def _check_options(rank: object, n_iter_max: object, tol: object, init: object) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"rank must be a positive integer, got {rank!r}")
    if not isinstance(n_iter_max, int) or isinstance(n_iter_max, bool) or n_iter_max < 1:
        raise UserError(f"n_iter_max must be a positive integer, got {n_iter_max!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise UserError(f"tol must be a non-negative number, got {tol!r}")
    if init not in INITS:
        raise UserError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
