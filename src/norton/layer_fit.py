"""Least-squares refits of one layer's weights from sufficient statistics: pure batched math.

A layer ``y = W x + b`` (a convolution seen on its input patches, a linear layer on its
input rows, or a CPDBlock whose dense kernel is multilinear in its factors) is refitted
to reproduce target outputs ``y*`` from inputs ``x`` by ridge least squares. Everything
needed is in the statistics of the samples, accumulated batch by batch (float64):

    gram  = sum_s x_s x_s^T   (D0, D0)      total = sum_s x_s   (D0,)      count = S
    cross = sum_s y*_s x_s^T  (N, D0)       ysum  = sum_s y*_s  (N,)       yy = sum_s y*_s^2 (N,)

so no sample is kept. A dense layer solves one ``(D0 + 1)`` system with ``N`` right-hand
sides. A CPDBlock's output is linear in each factor with the other two fixed, so each of
head ``(N, C, R)``, body ``(N, k_h, R)`` and tail ``(N, k_w, R)`` solves ``N`` small
per-filter systems whose Grams are contractions of the shared patch Gram with the fixed
factors (``C R``, ``k_h R`` or ``k_w R`` unknowns per filter). Every solve is ridge
regression *towards the current weights*: ``min ||X w - y*||^2 + lam ||w - w_0||^2`` with
``lam = ridge * mean(diag(X^T X))``, so an under-determined direction keeps its value and
the residual never grows (``w_0`` is feasible).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Stats", "cp_factor_system", "dense_system", "residual", "ridge_solve"]

# Largest intermediate (elements) a CP system builds at once; bounds memory on big layers.
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class Stats:
    """Sufficient statistics of a layer's least-squares problem (see the module docstring)."""

    gram: Tensor  # (D0, D0)
    total: Tensor  # (D0,)
    cross: Tensor  # (N, D0)
    ysum: Tensor  # (N,)
    yy: Tensor  # (N,)
    count: int = 0

    @classmethod
    def zeros(cls, features: int, outputs: int, *, device: torch.device, dtype: torch.dtype) -> Stats:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        return cls(zeros(features, features), zeros(features), zeros(outputs, features), zeros(outputs), zeros(outputs))

    def add(self, x: Tensor, y: Tensor) -> None:
        """Accumulate samples ``x (S, D0)`` with targets ``y (S, N)``."""
        x, y = x.to(self.gram.dtype), y.to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.total += x.sum(0)
        self.cross.addmm_(y.T, x)
        self.ysum += y.sum(0)
        self.yy += y.square().sum(0)
        self.count += x.shape[0]

    def outputs(self, keep: Tensor | None) -> Stats:
        """The statistics of the targets ``keep`` only (output channels a prune kept)."""
        if keep is None:
            return self
        keep = keep.to(self.cross.device)
        return Stats(self.gram, self.total, self.cross[keep], self.ysum[keep], self.yy[keep], self.count)


# --------------------------------------------------------------------------- systems
def dense_system(stats: Stats) -> tuple[Tensor, Tensor, Tensor]:
    """``(gram (1, D0, D0), lin (1, D0), rhs (N, D0))`` of a layer whose weight rows are the unknowns."""
    return stats.gram.unsqueeze(0), stats.total.unsqueeze(0), stats.cross


def cp_factor_system(
    stats: Stats, factors: tuple[Tensor, Tensor, Tensor], mode: int, kernel: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-filter systems for one CP factor with the other two fixed.

    ``factors`` are ``head (N, C, R), body (N, k_h, R), tail (N, k_w, R)`` and the statistics'
    features are patches ordered ``(C, k_h, k_w)``. ``mode`` 0 solves the head (``C R``
    unknowns per filter), 1 the body (``k_h R``), 2 the tail (``k_w R``); the unknowns are
    the factor's ``(N, d, R)`` entries flattened row-major. Returns ``gram (N, D, D)``,
    ``lin (N, D)`` (the unknowns' response to a constant input, for the bias) and ``rhs (N, D)``.
    """
    head, body, tail = (f.to(stats.gram.dtype) for f in factors)
    n, c, _ = head.shape
    kh, kw = kernel
    gram = stats.gram.view(c, kh, kw, c, kh, kw)
    total = stats.total.view(c, kh, kw)
    cross = stats.cross.view(n, c, kh, kw)
    if mode == 2:  # the tail is the body of the kernel with its two spatial axes swapped
        gram, total, cross = gram.permute(0, 2, 1, 3, 5, 4), total.transpose(1, 2), cross.transpose(2, 3)
        body, tail, kh, kw = tail, body, kw, kh
    if mode == 0:
        fixed = torch.einsum("nir,njr->nrij", body, tail).reshape(n, -1, kh * kw)  # (N, R, k_h k_w)
        gram = gram.reshape(c, kh * kw, c, kh * kw)  # [c, a, d, b]
        total, cross = total.reshape(c, kh * kw), cross.reshape(n, c, kh * kw)
        spec = ("cadb,nqb->ncadq", "nra,ncadq->ncrdq", "nra,ca->ncr", "nra,nca->ncr")
    else:
        fixed = torch.einsum("ncr,njr->nrcj", head, tail)  # (N, R, C, k_w): what multiplies body[n, i, r]
        spec = ("cijdke,nqde->ncijkq", "nrcj,ncijkq->nirkq", "nrcj,cij->nir", "nrcj,ncij->nir")
    unknowns = (c if mode == 0 else kh) * fixed.shape[1]
    # the Gram contraction's intermediate has c*kh*kw*(c or kh)*R entries per filter: a block of filters at a time
    per_filter = c * kh * kw * (c if mode == 0 else kh) * fixed.shape[1]
    block = max(1, _BLOCK_ELEMENTS // per_filter)
    grams = [
        torch.einsum(spec[1], fixed[i : i + block], torch.einsum(spec[0], gram, fixed[i : i + block]))
        for i in range(0, n, block)  # loop over memory-bounded blocks of filters
    ]
    system = torch.cat(grams).reshape(n, unknowns, unknowns)  # (N, D, D)
    lin = torch.einsum(spec[2], fixed, total).reshape(n, unknowns)  # (N, D)
    rhs = torch.einsum(spec[3], fixed, cross).reshape(n, unknowns)  # (N, D)
    return system, lin, rhs


# --------------------------------------------------------------------------- solving
@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread inside the block (CPU only): for LAPACK's eigensolver on small matrices.

    MKL's ``syevd`` on a few hundred unknowns is dominated by thread barriers: with 2 threads
    on 2 busy cores, a 289 x 289 ``eigh`` took 2-5 s instead of 13 ms single-threaded.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _augmented(gram: Tensor, lin: Tensor, rhs: Tensor, stats: Stats, bias: bool) -> tuple[Tensor, Tensor]:
    """``(A (B, D', D'), b (N, D'))`` of the normal equations, with a bias unknown last when ``bias``."""
    if not bias:
        return gram, rhs
    batch, d = gram.shape[0], gram.shape[-1]
    a = gram.new_empty(batch, d + 1, d + 1)
    a[:, :d, :d] = gram
    a[:, :d, d] = lin
    a[:, d, :d] = lin
    a[:, d, d] = float(stats.count)
    return a, torch.cat([rhs, stats.ysum.unsqueeze(1)], 1)


def residual(gram: Tensor, lin: Tensor, rhs: Tensor, stats: Stats, theta: Tensor, beta: Tensor | None) -> Tensor:
    """Sum of squared errors ``(N,)`` of unknowns ``theta (N, D)`` and bias ``beta (N,)`` on the samples."""
    a, b = _augmented(gram, lin, rhs, stats, beta is not None)
    w = theta if beta is None else torch.cat([theta, beta.unsqueeze(1)], 1)  # (N, D')
    quadratic = torch.einsum("nd,nd->n", w, (a @ w.unsqueeze(-1)).squeeze(-1)) if a.shape[0] > 1 else (w @ a[0] * w).sum(1)
    return (quadratic - 2 * (w * b).sum(1) + stats.yy).clamp_min(0)


def ridge_solve(
    gram: Tensor, lin: Tensor, rhs: Tensor, stats: Stats, theta0: Tensor, beta0: Tensor | None, ridge: float,
    *, select: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Unknowns ``(N, D)`` (and bias ``(N,)``) minimising the squared error plus ``lam ||w - w_0||^2``.

    ``lam = ridge * mean(diag(A))`` where ``A`` is the system's Gram; with ``select`` the
    strength is chosen by generalised cross-validation (Golub et al. 1979) among
    ``ridge * mean(diag(A)) * 10^k``, ``k = 0..6``: the least ``RSS(lam) / (1 - df(lam) / S)^2``
    with ``df`` the effective number of parameters, so a layer with few samples per unknown
    (a classifier refitted on a few hundred images) is shrunk towards ``w_0`` instead of
    overfitting. All strengths come from one eigendecomposition. ``gram`` is shared by every
    filter when its batch size is 1 (one strength for the layer), per filter otherwise.
    """
    a, b = _augmented(gram, lin, rhs, stats, beta0 is not None)
    w0 = (theta0 if beta0 is None else torch.cat([theta0, beta0.unsqueeze(1)], 1)).to(a.dtype)  # (N, D')
    shared = a.shape[0] == 1
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # (B,)
    powers = torch.arange(7 if select else 1, dtype=a.dtype, device=a.device)
    grid = ridge * scale[:, None] * 10.0**powers  # (B, G)
    # Solve for the change v = w - w_0: (A + lam I) v = b - A w_0, in A's eigenbasis for every lam at once.
    with _one_thread(a.device):
        evals, vecs = torch.linalg.eigh(a)  # (B, D'), (B, D', D')
    evals = evals.clamp_min(0)
    pull = b - (w0 @ a[0] if shared else (a @ w0.unsqueeze(-1)).squeeze(-1))  # (N, D')
    coords = pull @ vecs[0] if shared else torch.einsum("nd,nde->ne", pull, vecs)  # (N, D')
    shrink = 1 / (evals[:, None, :] + grid[..., None])  # (B, G, D')
    # RSS(w_0 + v) = RSS(w_0) - sum_d c_d^2 (2 s_d - s_d^2 e_d), with v's coordinates c_d s_d
    gain = torch.einsum("nd,bgd->ngd", coords.square(), 2 * shrink - shrink.square() * evals[:, None, :]).sum(-1)
    rss = residual(gram, lin, rhs, stats, theta0.to(a.dtype), None if beta0 is None else beta0.to(a.dtype))
    rss = (rss[:, None] - gain).clamp_min(0)  # (N, G)
    df = (evals[:, None, :] * shrink).sum(-1)  # (B, G)
    fraction = 1 - df / max(stats.count, 1)
    gcv = torch.where(fraction > 0, (rss.sum(0, keepdim=True) if shared else rss) / fraction.square(), torch.inf)
    pick = gcv.argmin(-1)  # (1,) or (N,): the chosen strength
    chosen = shrink[torch.arange(shrink.shape[0]), pick]  # (B, D')
    delta = coords * chosen  # (N, D') in the eigenbasis
    w = w0 + (delta @ vecs[0].T if shared else torch.einsum("ne,nde->nd", delta, vecs))
    if beta0 is None:
        return w, None
    return w[:, :-1], w[:, -1]
