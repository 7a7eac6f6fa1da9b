"""Batched CP tensors: the data type that :mod:`norton.decomposition.cp_als` produces.

A batch of ``B`` rank-``R`` CP tensors of shape ``(I, J, K)`` is stored as three
factor matrices per tensor, ``A (B, I, R)``, ``B (B, J, R)`` and ``C (B, K, R)``,
with ``T[b, i, j, k] = sum_r A[b, i, r] * B[b, j, r] * C[b, k, r]``. Weights are
absorbed into the factors (no separate weight vector): a CPDBlock stores exactly
these three matrices per filter, so keeping the same layout avoids conversions.
"""
from __future__ import annotations

import torch
from torch import Tensor

CPFactors = tuple[Tensor, Tensor, Tensor]


def cp_to_tensor(factors: CPFactors) -> Tensor:
    """Rebuild full tensors ``(B, I, J, K)`` from batched factors ``(B, I, R), (B, J, R), (B, K, R)``."""
    a, b, c = factors
    return torch.einsum("bir,bjr,bkr->bijk", a, b, c)


def relative_error(tensors: Tensor, factors: CPFactors) -> Tensor:
    """Per-tensor ``||T - [[A, B, C]]||_F / ||T||_F`` as ``(B,)``.

    Where ``T`` is all zero the ratio is undefined; the absolute residual
    ``||[[A, B, C]]||_F`` is returned instead (0 for zero factors), never NaN.
    """
    residual = (tensors - cp_to_tensor(factors)).flatten(1).norm(dim=1)
    norm = tensors.flatten(1).norm(dim=1)
    return torch.where(norm > 0, residual / norm.clamp_min(torch.finfo(norm.dtype).tiny), residual)
