"""Truncated SVD for low-rank layers: channel SVD (1x1 convs, ``nn.Linear``) and spatial SVD.

* :func:`low_rank_matrix`: ``M (..., M, K) ~= left (..., M, R) @ right (..., R, K)``, the
  best rank-``R`` approximation (Eckart-Young), singular values split as square roots so
  the two thin layers share the scale.
* :func:`spatial_svd`: a ``k_h x k_w`` conv as a ``k_h x 1`` conv ``C -> R`` followed by a
  ``1 x k_w`` conv ``R -> N`` (Jaderberg et al. 2014; AIMET's spatial SVD). The kernel
  ``W (N, C, k_h, k_w)`` is reshaped to ``(C k_h, N k_w)``, rows ``(c, i)``, columns
  ``(n, j)``: ``W[n, c, i, j] = sum_r vertical[r, c, i] horizontal[n, r, j]`` is exactly a
  rank-``R`` factorisation of that matrix, so its truncated SVD is the best one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from norton.errors import UserError
from norton.limits import check_int


@torch.no_grad()
def low_rank_matrix(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` factorisation ``matrix ~= left @ right`` by truncated SVD.

    Args:
        matrix: ``(M, K)`` (e.g. a Linear weight ``(out, in)`` or a 1x1 conv weight
            reshaped to ``(N, C)``), or ``(..., M, K)`` for a batch; any device.
        rank: ``1 <= R <= min(M, K)``.

    Returns:
        ``(left (..., M, R), right (..., R, K), error)``, ``error = ||M - left @ right|| /
        ||M||`` (a scalar tensor or ``(...)``; 0 for an all-zero matrix). As a layer
        ``x -> W x``: first ``right`` (``K -> R``), then ``left`` (``R -> M``).
    """
    _check_tensor(matrix, "matrix", min_dim=2, shape_hint="(M, K)")
    rank = check_int(rank, "SVD rank", minimum=1, maximum=min(matrix.shape[-2:]))
    work = matrix.to(_working_dtype(matrix.dtype))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)  # (..., M, q), (..., q), (..., q, K)
    root = s[..., :rank].sqrt()
    left = u[..., :, :rank] * root[..., None, :]
    right = root[..., :, None] * vh[..., :rank, :]
    # tail energy of the singular values: exact up to rounding, without rebuilding M
    total = s.square().sum(-1)
    error = (s[..., rank:].square().sum(-1) / torch.where(total > 0, total, 1.0)).sqrt()
    dtype = matrix.dtype if matrix.dtype.is_floating_point else work.dtype
    return left.to(dtype), right.to(dtype), error


@torch.no_grad()
def spatial_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Spatial SVD of a conv kernel ``W (N, C, k_h, k_w)`` into ``k_h x 1`` then ``1 x k_w``.

    Args:
        weight: ``(N, C, k_h, k_w)``, or ``(B, N, C, k_h, k_w)`` for same-shaped layers.
        rank: ``1 <= R <= min(C k_h, N k_w)`` (:func:`spatial_svd_max_rank`).

    Returns:
        ``(vertical (R, C, k_h, 1), horizontal (N, R, 1, k_w), error)`` (with the leading
        ``B`` when given) such that ``conv(conv(x, vertical), horizontal) == conv(x, W_hat)``
        with ``||W - W_hat|| / ||W|| = error``; exact at the full rank. Stride and padding
        split the same way: ``(s_h, 1), (p_h, 0)`` for the first, ``(1, s_w), (0, p_w)`` for
        the second.
    """
    _check_tensor(weight, "weight", min_dim=4, shape_hint="(N, C, k_h, k_w)")
    if weight.dim() > 5:
        raise UserError(
            f"weight must be a conv kernel (N, C, k_h, k_w) or a batch (B, N, C, k_h, k_w); got shape {tuple(weight.shape)}"
        )
    rank = check_int(rank, "spatial SVD rank", minimum=1, maximum=spatial_svd_max_rank(tuple(weight.shape)))
    batched = weight.dim() == 5
    w = weight if batched else weight[None]
    b, n, c, kh, kw = w.shape
    matrix = w.permute(0, 2, 3, 1, 4).reshape(b, c * kh, n * kw)  # rows (c, i), columns (n, j)
    left, right, error = low_rank_matrix(matrix, rank)  # (B, C k_h, R), (B, R, N k_w)
    vertical = left.reshape(b, c, kh, rank).permute(0, 3, 1, 2)[..., None]  # (B, R, C, k_h, 1)
    horizontal = right.reshape(b, rank, n, kw).permute(0, 2, 1, 3)[:, :, :, None, :]  # (B, N, R, 1, k_w)
    vertical, horizontal = vertical.contiguous(), horizontal.contiguous()
    if not batched:
        return vertical[0], horizontal[0], error[0]
    return vertical, horizontal, error


def spatial_svd_to_tensor(vertical: Tensor, horizontal: Tensor) -> Tensor:
    """``W_hat (N, C, k_h, k_w)`` (or batched) from :func:`spatial_svd`'s two kernels."""
    # W[n, c, i, j] = sum_r vertical[r, c, i, 0] horizontal[n, r, 0, j]
    return torch.einsum("...rci,...nrj->...ncij", vertical[..., 0], horizontal[..., 0, :])


def spatial_svd_max_rank(weight_shape: tuple[int, ...]) -> int:
    """``min(C k_h, N k_w)``: the rank at which spatial SVD of ``(..., N, C, k_h, k_w)`` is exact."""
    n, c, kh, kw = weight_shape[-4:]
    return min(c * kh, n * kw)


def low_rank_max_rank(matrix_shape: tuple[int, ...]) -> int:
    """``min(M, K)``: the rank at which :func:`low_rank_matrix` of ``(..., M, K)`` is exact."""
    return min(matrix_shape[-2:])


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_tensor(value: object, name: str, *, min_dim: int, shape_hint: str) -> None:
    if not isinstance(value, Tensor):
        raise UserError(f"{name} must be a torch.Tensor {shape_hint}, got {type(value).__name__}")
    if value.dim() < min_dim:
        raise UserError(f"{name} must have shape {shape_hint} (optionally batched), got {tuple(value.shape)}")
    if value.numel() == 0 or value.is_complex():
        raise UserError(f"{name} must be a non-empty real tensor, got {value.dtype} of shape {tuple(value.shape)}")
    if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
        raise UserError(f"{name} contains NaN or inf; fix the weights before decomposing them")
