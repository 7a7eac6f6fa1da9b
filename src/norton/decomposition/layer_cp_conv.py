"""The LayerCPConv: a k_h x k_w convolution as one rank-R CP decomposition of its whole kernel (Lebedev et al., ICLR 2015).

Unlike the CPDBlock (one CP decomposition per filter), the four-way kernel is decomposed once::

    W[n, c, i, j] = sum_r last[n, r] first[c, r] vertical[i, r] horizontal[j, r]

and runs as four ordinary convolutions::

    x (B, C_in, H, W)
      -> first      1x1,             C_in -> R                       (B, R, H, W)
      -> vertical   depthwise k_h x 1, stride (s_h, 1), padding (p_h, 0)  (B, R, H', W)
      -> horizontal depthwise 1 x k_w, stride (1, s_w), padding (0, p_w)  (B, R, H', W')
      -> last       1x1,             R -> N, + bias                  (B, N, H', W')

Stride, padding and dilation are split between the two depthwise convs as in the CPDBlock
(padding along one axis commutes with a convolution along the other, so the split is exact).
MACs on ``(H, W)`` -> ``(H', W')``: ``H W C_in R + H' W R k_h + H' W' R k_w + H' W' R N``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from norton.decomposition.cpd_block import IntPair, PaddingMode, _pair, check_decomposable
from norton.decomposition.factorized import (
    FactorizedConv,
    check_positive,
    conv_geometry,
    factory_of,
    unpack_factors,
)

FACTOR_NAMES = ("first", "vertical", "horizontal", "last")


class LayerCPConv(FactorizedConv):
    """A rank-``R`` layer-wise CP convolution: 1x1, depthwise ``k_h x 1``, depthwise ``1 x k_w``, 1x1.

    Args:
        in_channels, out_channels: ``C_in`` and ``N`` of the dense conv.
        rank: ``R``, the CP rank of the whole kernel.
        kernel_size, stride, padding, dilation, padding_mode: the dense conv's; the height
            parts go to the vertical conv, the width parts to the horizontal one.
        bias: whether the last 1x1 conv adds a bias of ``N``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(in_channels=in_channels, out_channels=out_channels, rank=rank)
        (kh, kw), (sh, sw) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
        (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
        super().__init__((kh, kw), (sh, sw), (ph, pw), (dh, dw), padding_mode)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False, **factory)
        self.vertical = nn.Conv2d(
            rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=rank, bias=False,
            padding_mode=padding_mode, **factory,
        )
        self.horizontal = nn.Conv2d(
            rank, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=rank, bias=False,
            padding_mode=padding_mode, **factory,
        )
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **factory)

    @property
    def rank(self) -> int:
        return int(self.first.out_channels)

    def dense_weight(self) -> Tensor:
        first = self.first.weight.flatten(1)  # (R, C_in)
        vertical = self.vertical.weight.flatten(1)  # (R, 1, k_h, 1) -> (R, k_h)
        horizontal = self.horizontal.weight.flatten(1)  # (R, 1, 1, k_w) -> (R, k_w)
        last = self.last.weight.flatten(1)  # (N, R)
        return torch.einsum("nr,rc,ri,rj->ncij", last, first, vertical, horizontal)  # (N, C_in, k_h, k_w)

    @classmethod
    def from_factors(
        cls,
        factors: Any,
        *,
        bias: Tensor | None = None,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        padding_mode: PaddingMode = "zeros",
    ) -> LayerCPConv:
        """A block from ``first (C_in, R), vertical (k_h, R), horizontal (k_w, R), last (N, R)``.

        ``factors`` is a ``LayerCPFactors`` or any sequence in that order.
        """
        first, vertical, horizontal, last = unpack_factors(factors, FACTOR_NAMES)
        (c, r), (kh, kw), n = first.shape, (vertical.shape[0], horizontal.shape[0]), last.shape[0]
        for name, tensor in zip(FACTOR_NAMES, (first, vertical, horizontal, last), strict=True):
            if tensor.dim() != 2 or tensor.shape[1] != r:
                raise ValueError(f"factor {name} must have shape (?, {r}), got {tuple(tensor.shape)}")
        block = cls(c, n, r, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias is not None,
                    padding_mode=padding_mode, **factory_of(first))
        with torch.no_grad():
            block.first.weight.copy_(first.T.reshape(r, c, 1, 1))
            block.vertical.weight.copy_(vertical.T.reshape(r, 1, kh, 1))
            block.horizontal.weight.copy_(horizontal.T.reshape(r, 1, 1, kw))
            block.last.weight.copy_(last.reshape(n, r, 1, 1))
            if bias is not None and block.last.bias is not None:
                block.last.bias.copy_(bias)
        return block

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int, *, n_iter_max: int = 100, tol: float = 1e-7, seed: int | None = 0,
    ) -> LayerCPConv:
        """Decompose ``conv``'s kernel at CP rank ``rank`` (CP-ALS); the relative error is kept in
        ``block.reconstruction_error`` (a 0-d tensor, a plain attribute, not state)."""
        from norton.decomposition.layer_cp import layer_cp  # local: H1's algorithm, imported on use

        check_decomposable(conv)
        factors, error = layer_cp(conv.weight.detach(), rank, n_iter_max=n_iter_max, tol=tol, seed=seed)
        block = cls.from_factors(factors, bias=conv.bias.detach() if conv.bias is not None else None,
                                 **conv_geometry(conv))
        block.reconstruction_error = torch.as_tensor(error)
        return block

    @classmethod
    def empty(cls, conv: nn.Conv2d, rank: int) -> LayerCPConv:
        """A freshly initialised block shaped to replace ``conv`` at ``rank`` (replay: a state dict loads next)."""
        return cls(conv.in_channels, conv.out_channels, rank, conv.kernel_size, bias=conv.bias is not None,
                   **conv_geometry(conv), **factory_of(conv.weight))
