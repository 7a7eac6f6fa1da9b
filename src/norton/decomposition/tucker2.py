"""Tucker-2 of conv kernels: HOSVD start + HOOI on the two channel modes (Kim et al., ICLR 2016).

``W (N, C, k_h, k_w) ~= last x core x first``, i.e.
``W[n, c, i, j] ~= sum_{q, p} last[n, q] core[q, p, i, j] first[c, p]``, with orthonormal
``first (C, R1)`` and ``last (N, R2)``. As a layer: a 1x1 conv ``C -> R1`` (``first``),
a ``k_h x k_w`` conv ``R1 -> R2`` (``core``), a 1x1 conv ``R2 -> N`` (``last``).

Why it is fast: the spatial modes are never factored, so each HOOI half-step needs the
leading eigenvectors of an ``N x N`` (or ``C x C``) Gram matrix of a projected unfolding,
not an SVD of a ``N x R1 k_h k_w`` matrix: one matmul plus an ``eigh`` in the first sweep,
then one warm-started Rayleigh-Ritz step on ``[Q, G Q]`` (matmuls, a QR and a ``2R x 2R``
``eigh``) per half-step, batched over same-shaped layers. Only the input factor gets a
HOSVD start (the first sweep solves the output factor from it), and the stopping rule
is tensorly's kind (the error fell by less than ``tol`` in a sweep).

With orthonormal factors the best core for given factors is the projection
``last^T W first`` and ``||W - W_hat||^2 = ||W||^2 - ||core||^2``, so each sweep's error
costs nothing extra; the returned error is computed exactly from the reconstruction.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from norton.errors import UserError
from norton.limits import check_finite, check_int


class Tucker2Factors(NamedTuple):
    """Tucker-2 factors of ``W (N, C, k_h, k_w)`` (with a leading batch dim if ``W`` had one)."""

    first: Tensor  # (C, R1): input channels -> R1, orthonormal columns
    core: Tensor  # (R2, R1, k_h, k_w)
    last: Tensor  # (N, R2): R2 -> output channels, orthonormal columns


@torch.no_grad()
def tucker2(
    weight: Tensor, ranks: tuple[int, int], *, n_iter_max: int = 25, tol: float = 5e-5, power_steps: int = 1,
    exact_sweeps: int = 1,
) -> tuple[Tucker2Factors, Tensor]:
    """Tucker-2 decomposition of a conv kernel on its channel modes.

    Args:
        weight: ``(N, C, k_h, k_w)``, or ``(B, N, C, k_h, k_w)`` for ``B`` same-shaped
            layers decomposed at once; any device. float32/float64 are used as given,
            other dtypes computed in float32 and cast back (float32 for integers).
        ranks: ``(R1, R2)`` = (input rank ``<= C``, output rank ``<= N``).
        n_iter_max: most HOOI sweeps after the HOSVD start (0: HOSVD only).
        tol: a layer stops once a sweep lowers its relative error by less than ``tol``
            (the default stops at or below the error of tensorly's ``partial_tucker``
            with its ``tol=1e-4``: each sweep here gains a little less than an exact one).
        power_steps, exact_sweeps: the first ``exact_sweeps`` sweeps solve each factor
            exactly (eigendecomposition); later ones take ``power_steps`` warm-started
            Rayleigh-Ritz steps on the block Krylov space ``[Q, G Q]`` (cheaper, same
            fixed points, and the error never rises).

    Returns:
        ``(Tucker2Factors(first (C, R1), core (R2, R1, k_h, k_w), last (N, R2)), error)``
        (each with the leading ``B`` when given), ``error = ||W - W_hat|| / ||W||``: a
        scalar tensor, or ``(B,)``; 0 for an all-zero kernel.
    """
    rank_in, rank_out = _check(weight, ranks, n_iter_max, tol)
    check_int(power_steps, "power_steps", minimum=1, maximum=100)
    check_int(exact_sweeps, "exact_sweeps", minimum=0, maximum=100_000)
    batched = weight.dim() == 5
    w = (weight if batched else weight[None]).to(_working_dtype(weight.dtype))  # (B, N, C, kh, kw)
    b, n, c, kh, kw = w.shape
    norm = w.flatten(1).norm(dim=1)  # (B,)
    w = w / torch.where(norm > 0, norm, 1.0)[:, None, None, None, None]  # unit norm: error = ||W - W_hat||

    w0 = w.reshape(b, n, c * kh * kw)  # mode-0 unfolding (B, N, C k_h k_w)
    w_c = w.permute(0, 1, 3, 4, 2).reshape(b, n * kh * kw, c)  # input channels last (B, N k_h k_w, C)
    w1 = w_c.reshape(b, n, kh * kw, c).permute(0, 3, 1, 2).reshape(b, c, n * kh * kw)  # mode-1 unfolding
    # HOSVD start for the input factor: leading eigenvectors of the mode-1 Gram matrix.
    # The output factor's HOSVD start is only needed without sweeps: the first sweep
    # solves it exactly from `first`, which is cheaper (an N x N Gram of an N x k_h k_w R1
    # matrix instead of N x C k_h k_w) and what the start would be replaced by anyway.
    first = _leading_eigenvectors(w1 @ w1.transpose(1, 2), rank_in)  # (B, C, R1)
    del w1
    if n_iter_max == 0:
        last = _leading_eigenvectors(w0 @ w0.transpose(1, 2), rank_out)  # (B, N, R2)
        core = last.transpose(1, 2) @ (w_c @ first).reshape(b, n, kh * kw * rank_in)  # (B, R2, k_h k_w R1)
    else:
        first, last, core = _hooi(w0, w_c, first, rank_out, (kh, kw), n_iter_max, tol, power_steps, exact_sweeps)

    core = core.reshape(b, rank_out, kh, kw, rank_in).permute(0, 1, 4, 2, 3)  # (B, R2, R1, k_h, k_w)
    factors = Tucker2Factors(first, core, last)
    error = (w - _to_tensor(factors)).flatten(1).norm(dim=1)  # exact; unit-norm w: relative
    error = torch.where(norm > 0, error, 0.0)
    core = core * norm[:, None, None, None, None]  # undo the normalisation on the core only
    dtype = weight.dtype if weight.dtype.is_floating_point else first.dtype
    factors = Tucker2Factors(*(f.to(dtype) for f in (first, core, last)))
    if not batched:
        return Tucker2Factors(*(f[0] for f in factors)), error[0]
    return factors, error


def tucker2_to_tensor(factors: Tucker2Factors) -> Tensor:
    """The kernel ``(N, C, k_h, k_w)`` (or ``(B, N, C, k_h, k_w)``) the factors stand for."""
    first, core, last = factors
    if core.dim() == 4:
        return _to_tensor(Tucker2Factors(first[None], core[None], last[None]))[0]
    return _to_tensor(factors)


def tucker2_max_ranks(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(C, N)``: the ranks at which Tucker-2 of a ``(N, C, k_h, k_w)`` kernel is exact."""
    n, c = weight_shape[-4], weight_shape[-3]
    return c, n


# ------------------------------------------------------------------ helpers
def _to_tensor(factors: Tucker2Factors) -> Tensor:
    first, core, last = factors  # (B, C, R1), (B, R2, R1, kh, kw), (B, N, R2)
    return torch.einsum("bnq,bqpij,bcp->bncij", last, core, first)


def _hooi(
    w0: Tensor, w_c: Tensor, first: Tensor, rank_out: int, kernel: tuple[int, int], n_iter_max: int, tol: float,
    power_steps: int, exact_sweeps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """HOOI sweeps on unit-norm kernels from the input factor ``first (B, C, R1)``.

    ``w0 (B, N, C k_h k_w)`` and ``w_c (B, N k_h k_w, C)`` are the two layouts of the
    kernels. Returns ``first (B, C, R1)``, ``last (B, N, R2)``, ``core (B, R2, k_h k_w R1)``.
    Each layer stops on its own (its factors frozen), so its result does not depend on
    what else is in its batch; a sweep that raises a layer's error (rounding only) is
    not taken. One host sync per sweep.
    """
    b, n, _ = w0.shape
    c, rank_in = first.shape[1:]
    kh, kw = kernel
    last = w0.new_zeros(b, n, rank_out)  # solved before it is read
    previous = torch.full((b,), torch.inf, dtype=w0.dtype, device=w0.device)
    active = torch.ones(b, dtype=torch.bool, device=w0.device)
    kept: tuple[Tensor, ...] = ()
    for sweep in range(n_iter_max):
        # Exact sweeps take the top eigenvectors of each projected Gram matrix (as
        # tensorly's SVD does), which settles the basin; later sweeps take Rayleigh-Ritz
        # steps from the previous factor: the subspace moves little by then, and a
        # 512 x 512 `eigh` costs more than the sweep's two big matmuls.
        exact = sweep < exact_sweeps
        y = (w_c @ first).reshape(b, n, kh * kw * rank_in)  # W x_1 first^T, mode-0 unfolded
        if exact or sweep == 0:  # the first sweep has no output factor to start from
            last = _leading_eigenvectors(y @ y.transpose(1, 2), rank_out)
        else:
            last = _ritz(y, last, power_steps)
        z = (last.transpose(1, 2) @ w0).reshape(b, rank_out, c, kh * kw)  # W x_0 last^T (B, R2, C, k_h k_w)
        z = z.transpose(1, 2).reshape(b, c, rank_out * kh * kw)  # mode-1 unfolded
        first = _leading_eigenvectors(z @ z.transpose(1, 2), rank_in) if exact else _ritz(z, first, power_steps)
        core = (first.transpose(1, 2) @ z).reshape(b, rank_in, rank_out, kh * kw)  # (B, R1, R2, k_h k_w)
        core = core.permute(0, 2, 3, 1).reshape(b, rank_out, kh * kw * rank_in)  # (B, R2, k_h k_w R1)
        error = (1 - core.flatten(1).square().sum(1)).clamp_min(0).sqrt()  # orthonormal factors
        if not kept:
            kept, previous, active = (first, last, core), error, error > 0
            if n_iter_max == 1 or not bool(active.any()):
                break
            continue
        take = active & (error <= previous)  # a rise can only be rounding: keep the previous factors
        kept = tuple(torch.where(take[:, None, None], new, old) for new, old in zip((first, last, core), kept, strict=True))
        active = take & (previous - error >= tol)
        previous = torch.where(take, error, previous)
        if not bool(active.any()):  # one host sync per sweep
            break
        # a frozen layer restarts from its kept factors: the next sweep is thrown away for it anyway
        first, last = kept[0], kept[1]
    return kept[0], kept[1], kept[2]


def _ritz(y: Tensor, start: Tensor, steps: int) -> Tensor:
    """``steps`` Rayleigh-Ritz steps for the top-``R`` invariant subspace of ``G = y y^T``
    (``y (B, M, P)``) from orthonormal ``start (B, M, R)``: each takes the best ``R``
    directions of ``span[Q, G Q]``, so ``trace(Q^T G Q)`` never falls and moves much
    further than a plain subspace-iteration step ``orth(G Q)``; -> ``(B, M, R)``."""
    rank = start.shape[-1]
    for _ in range(steps):
        basis = torch.linalg.qr(torch.cat([start, y @ (y.transpose(1, 2) @ start)], dim=2)).Q  # (B, M, <= 2R)
        projected = basis.transpose(1, 2) @ y  # (B, <= 2R, P)
        _, vectors = torch.linalg.eigh(projected @ projected.transpose(1, 2))  # ascending
        start = basis @ vectors[..., -rank:]
    return start


def _leading_eigenvectors(gram: Tensor, rank: int) -> Tensor:
    """``(B, M, M)`` symmetric PSD -> ``(B, M, rank)``: eigenvectors of the largest
    eigenvalues, largest first, sign-fixed (largest-magnitude entry positive) so the
    result does not depend on the LAPACK/cuSOLVER build."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    vectors = vectors[..., -rank:].flip(-1)
    pivot = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))  # (B, 1, rank)
    return torch.where(pivot < 0, -vectors, vectors)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_kernels(weight: object) -> Tensor:
    """``weight`` is a finite real conv kernel ``(N, C, k_h, k_w)`` or a batch ``(B, N, C, k_h, k_w)``."""
    if not isinstance(weight, Tensor):
        raise UserError(f"weight must be a torch.Tensor (N, C, k_h, k_w), got {type(weight).__name__}")
    if weight.dim() not in (4, 5):
        raise UserError(
            f"weight must be a conv kernel (N, C, k_h, k_w) or a batch (B, N, C, k_h, k_w); got shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0 or weight.is_complex():
        raise UserError(f"weight must be a non-empty real tensor, got {weight.dtype} of shape {tuple(weight.shape)}")
    if weight.dtype.is_floating_point and not bool(torch.isfinite(weight).all()):
        raise UserError("weight contains NaN or inf; fix the weights before decomposing them")
    return weight


def _check(weight: object, ranks: object, n_iter_max: object, tol: object) -> tuple[int, int]:
    weight = check_kernels(weight)
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise UserError(f"Tucker-2 ranks must be a pair (in_rank, out_rank), got {ranks!r}")
    n, c = weight.shape[-4], weight.shape[-3]
    rank_in = check_int(ranks[0], "Tucker-2 in_rank", minimum=1, maximum=c)
    rank_out = check_int(ranks[1], "Tucker-2 out_rank", minimum=1, maximum=n)
    check_int(n_iter_max, "n_iter_max", minimum=0, maximum=100_000)
    check_finite(tol, "tol", minimum=0.0)
    return rank_in, rank_out
