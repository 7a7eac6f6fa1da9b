"""The Tucker2Conv: a k_h x k_w convolution as its Tucker-2 decomposition (Kim et al., ICLR 2016).

The kernel ``W (N, C_in, k_h, k_w)`` is compressed along its two channel modes only::

    W[n, c, i, j] = sum_{p, q} last[n, q] core[q, p, i, j] first[c, p]

so the convolution runs as three ordinary ones::

    x (B, C_in, H, W)
      -> first  1x1,          C_in -> R1                         (B, R1, H, W)
      -> core   k_h x k_w,    R1 -> R2, the conv's stride/padding (B, R2, H', W')
      -> last   1x1,          R2 -> N, + bias                    (B, N, H', W')

MACs on an ``(H, W)`` input with output ``(H', W')``:
``H W C_in R1 + H' W' R1 R2 k_h k_w + H' W' R2 N``.
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


class Tucker2Conv(FactorizedConv):
    """A rank-``(R1, R2)`` Tucker-2 convolution: 1x1 ``C_in -> R1``, ``k x k`` ``R1 -> R2``, 1x1 ``R2 -> N``.

    Args:
        in_channels, out_channels: ``C_in`` and ``N`` of the dense conv.
        ranks: ``(R1, R2)``: the input-channel rank and the output-channel rank (an int means both).
        kernel_size, stride, padding, dilation, padding_mode: the dense conv's, given to the core.
        bias: whether the last 1x1 conv adds a bias of ``N``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ranks: IntPair,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        r1, r2 = _pair(ranks, "ranks")
        check_positive(in_channels=in_channels, out_channels=out_channels, in_rank=r1, out_rank=r2)
        kh, kw = _pair(kernel_size, "kernel_size")
        super().__init__((kh, kw), _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
                         padding_mode)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, r1, 1, bias=False, **factory)
        self.core = nn.Conv2d(
            r1, r2, (kh, kw), stride=self.stride, padding=self.padding, dilation=self.dilation, bias=False,
            padding_mode=padding_mode, **factory,
        )
        self.last = nn.Conv2d(r2, out_channels, 1, bias=bias, **factory)

    @property
    def rank(self) -> tuple[int, int]:
        """``(R1, R2)``: the input- and output-channel ranks."""
        return (int(self.core.in_channels), int(self.core.out_channels))

    def dense_weight(self) -> Tensor:
        first = self.first.weight.flatten(1)  # (R1, C_in)
        last = self.last.weight.flatten(1)  # (N, R2)
        core = self.core.weight  # (R2, R1, k_h, k_w)
        return torch.einsum("nq,qpij,pc->ncij", last, core, first)  # (N, C_in, k_h, k_w)

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
    ) -> Tucker2Conv:
        """A block from Tucker-2 factors ``first (C_in, R1), core (R2, R1, k_h, k_w), last (N, R2)``.

        ``factors`` is a ``Tucker2Factors`` or any ``(first, core, last)`` sequence.
        """
        first, core, last = unpack_factors(factors, ("first", "core", "last"))
        (c, r1), (n, r2) = first.shape, last.shape
        if core.dim() != 4 or tuple(core.shape[:2]) != (r2, r1):
            raise ValueError(f"core must have shape ({r2}, {r1}, k_h, k_w), got {tuple(core.shape)}")
        block = cls(
            c, n, (r1, r2), tuple(core.shape[2:]), stride=stride, padding=padding, dilation=dilation,
            bias=bias is not None, padding_mode=padding_mode, **factory_of(core),
        )
        with torch.no_grad():
            block.first.weight.copy_(first.T.reshape(r1, c, 1, 1))  # (C, R1) -> (R1, C, 1, 1)
            block.core.weight.copy_(core)
            block.last.weight.copy_(last.reshape(n, r2, 1, 1))
            if bias is not None and block.last.bias is not None:
                block.last.bias.copy_(bias)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: IntPair, *, n_iter_max: int = 100, tol: float = 1e-7) -> Tucker2Conv:
        """Decompose ``conv`` at ranks ``(R1, R2)`` (HOSVD + HOOI); the relative error is kept in
        ``block.reconstruction_error`` (a 0-d tensor, a plain attribute, not state)."""
        from norton.decomposition.tucker2 import tucker2  # local: H1's algorithm, imported on use

        check_decomposable(conv)
        factors, error = tucker2(conv.weight.detach(), _pair(ranks, "ranks"), n_iter_max=n_iter_max, tol=tol)
        block = cls.from_factors(factors, bias=conv.bias.detach() if conv.bias is not None else None,
                                 **conv_geometry(conv))
        block.reconstruction_error = torch.as_tensor(error)
        return block

    @classmethod
    def empty(cls, conv: nn.Conv2d, ranks: IntPair) -> Tucker2Conv:
        """A freshly initialised block shaped to replace ``conv`` at ``ranks`` (replay: a state dict loads next)."""
        return cls(conv.in_channels, conv.out_channels, ranks, conv.kernel_size, bias=conv.bias is not None,
                   **conv_geometry(conv), **factory_of(conv.weight))
