"""Truncated-SVD layers: two thin layers in place of one (Jaderberg et al. 2014; the SVD methods AIMET ships).

* :class:`LowRankLinear`: ``nn.Linear(K -> M)`` as ``Linear(K -> R, no bias)`` then
  ``Linear(R -> M, + bias)``, from ``W (M, K) ~= left (M, R) @ right (R, K)``.
  MACs per row: ``R (K + M)`` instead of ``K M``.
* :class:`LowRankConv1x1`: the same for a 1x1 convolution: 1x1 ``C_in -> R`` (with the
  conv's stride and padding) then 1x1 ``R -> N`` (+ bias). MACs: ``H' W' R (C_in + N)``.
* :class:`SpatialSVDConv`: a ``k_h x k_w`` convolution as ``k_h x 1`` ``C_in -> R`` then
  ``1 x k_w`` ``R -> N`` (+ bias), from the SVD of the kernel reshaped to
  ``(C_in k_h, N k_w)``: ``W[n, c, i, j] = sum_r horizontal[n, r, 0, j] vertical[r, c, i, 0]``.
  MACs on ``(H, W)`` -> ``(H', W')``: ``H' W C_in k_h R + H' W' R k_w N``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from norton.decomposition.cpd_block import IntPair, PaddingMode, _pair, check_decomposable
from norton.decomposition.factorized import FactorizedConv, check_positive, conv_geometry, factory_of


# ====================================================================== spatial SVD
class SpatialSVDConv(FactorizedConv):
    """A rank-``R`` spatially separated convolution: ``k_h x 1`` ``C_in -> R``, then ``1 x k_w`` ``R -> N``.

    Stride, padding and dilation are split by axis, as in the CPDBlock (exact).
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
        self.vertical = nn.Conv2d(in_channels, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                                  bias=False, padding_mode=padding_mode, **factory)
        self.horizontal = nn.Conv2d(rank, out_channels, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                                    bias=bias, padding_mode=padding_mode, **factory)

    @property
    def rank(self) -> int:
        return int(self.vertical.out_channels)

    def dense_weight(self) -> Tensor:
        vertical = self.vertical.weight[..., 0]  # (R, C_in, k_h, 1) -> (R, C_in, k_h)
        horizontal = self.horizontal.weight[:, :, 0]  # (N, R, 1, k_w) -> (N, R, k_w)
        return torch.einsum("nrj,rci->ncij", horizontal, vertical)  # (N, C_in, k_h, k_w)

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
    ) -> SpatialSVDConv:
        """A block from ``(vertical (R, C_in, k_h, 1), horizontal (N, R, 1, k_w))``."""
        vertical, horizontal = factors
        r, c, kh, _ = vertical.shape
        n, _, _, kw = horizontal.shape
        if tuple(horizontal.shape[1:3]) != (r, 1) or vertical.shape[3] != 1:
            raise ValueError(f"expected vertical (R, C, k_h, 1) and horizontal (N, R, 1, k_w), got "
                             f"{tuple(vertical.shape)} and {tuple(horizontal.shape)}")
        block = cls(c, n, r, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias is not None,
                    padding_mode=padding_mode, **factory_of(vertical))
        with torch.no_grad():
            block.vertical.weight.copy_(vertical)
            block.horizontal.weight.copy_(horizontal)
            if bias is not None and block.horizontal.bias is not None:
                block.horizontal.bias.copy_(bias)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> SpatialSVDConv:
        """Truncated SVD of ``conv``'s kernel reshaped to ``(C_in k_h, N k_w)``; the relative error is
        kept in ``block.reconstruction_error`` (a 0-d tensor)."""
        from norton.decomposition.svd import spatial_svd  # local: H1's algorithm, imported on use

        check_decomposable(conv)
        vertical, horizontal, error = spatial_svd(conv.weight.detach(), rank)
        block = cls.from_factors((vertical, horizontal), bias=conv.bias.detach() if conv.bias is not None else None,
                                 **conv_geometry(conv))
        block.reconstruction_error = torch.as_tensor(error)
        return block

    @classmethod
    def empty(cls, conv: nn.Conv2d, rank: int) -> SpatialSVDConv:
        """A freshly initialised block shaped to replace ``conv`` at ``rank`` (replay: a state dict loads next)."""
        return cls(conv.in_channels, conv.out_channels, rank, conv.kernel_size, bias=conv.bias is not None,
                   **conv_geometry(conv), **factory_of(conv.weight))


# ====================================================================== 1x1 convolutions
class LowRankConv1x1(FactorizedConv):
    """A rank-``R`` 1x1 convolution: 1x1 ``C_in -> R`` (the conv's stride and padding), then 1x1 ``R -> N``.

    Zero padding of a 1x1 conv only adds a border of bias values; the first conv pads
    with zeros, the second turns them into that same bias, so the result is exact.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        stride: IntPair = 1,
        padding: IntPair = 0,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(in_channels=in_channels, out_channels=out_channels, rank=rank)
        super().__init__((1, 1), _pair(stride, "stride"), _pair(padding, "padding"), (1, 1), padding_mode)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, rank, 1, stride=self.stride, padding=self.padding, bias=False,
                               padding_mode=padding_mode, **factory)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **factory)

    @property
    def rank(self) -> int:
        return int(self.first.out_channels)

    def dense_weight(self) -> Tensor:
        weight = self.last.weight.flatten(1) @ self.first.weight.flatten(1)  # (N, R) @ (R, C_in)
        return weight[:, :, None, None]  # (N, C_in, 1, 1)

    @classmethod
    def from_factors(
        cls, factors: Any, *, bias: Tensor | None = None, stride: IntPair = 1, padding: IntPair = 0,
        padding_mode: PaddingMode = "zeros",
    ) -> LowRankConv1x1:
        """A block from ``(left (N, R), right (R, C_in))``: ``W ~= left @ right``."""
        left, right = factors
        (n, r), c = left.shape, right.shape[1]
        if right.shape[0] != r:
            raise ValueError(f"expected left (N, R) and right (R, C_in), got {tuple(left.shape)} and {tuple(right.shape)}")
        block = cls(c, n, r, stride=stride, padding=padding, bias=bias is not None, padding_mode=padding_mode,
                    **factory_of(left))
        with torch.no_grad():
            block.first.weight.copy_(right.reshape(r, c, 1, 1))
            block.last.weight.copy_(left.reshape(n, r, 1, 1))
            if bias is not None and block.last.bias is not None:
                block.last.bias.copy_(bias)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> LowRankConv1x1:
        """Truncated SVD of a 1x1 conv's ``(N, C_in)`` matrix; the relative error in ``block.reconstruction_error``."""
        from norton.decomposition.svd import low_rank_matrix  # local: H1's algorithm, imported on use

        _check_pointwise(conv)
        left, right, error = low_rank_matrix(conv.weight.detach().flatten(1), rank)
        geometry = conv_geometry(conv)
        block = cls.from_factors((left, right), bias=conv.bias.detach() if conv.bias is not None else None,
                                 stride=geometry["stride"], padding=geometry["padding"],
                                 padding_mode=geometry["padding_mode"])
        block.reconstruction_error = torch.as_tensor(error)
        return block

    @classmethod
    def empty(cls, conv: nn.Conv2d, rank: int) -> LowRankConv1x1:
        """A freshly initialised block shaped to replace the 1x1 ``conv`` at ``rank``."""
        _check_pointwise(conv)
        geometry = conv_geometry(conv)
        return cls(conv.in_channels, conv.out_channels, rank, stride=geometry["stride"],
                   padding=geometry["padding"], bias=conv.bias is not None, padding_mode=geometry["padding_mode"],
                   **factory_of(conv.weight))


def _check_pointwise(conv: nn.Module) -> None:
    check_decomposable(conv)
    assert isinstance(conv, nn.Conv2d)  # check_decomposable raised otherwise
    if tuple(conv.kernel_size) != (1, 1):
        raise ValueError(f"LowRankConv1x1 replaces 1x1 convolutions, got a {conv.kernel_size} kernel")


# ====================================================================== linear layers
class LowRankLinear(nn.Module):
    """A rank-``R`` ``nn.Linear(K -> M)``: ``Linear(K -> R, no bias)`` then ``Linear(R -> M)`` (+ bias)."""

    __jit_unused_properties__ = ["in_features", "out_features", "output_layer", "rank", "bias"]

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(in_features=in_features, out_features=out_features, rank=rank)
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.last = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return int(self.first.in_features)

    @property
    def out_features(self) -> int:
        return int(self.last.out_features)

    @property
    def rank(self) -> int:
        return int(self.first.out_features)

    @property
    def output_layer(self) -> nn.Linear:
        return self.last

    @property
    def bias(self) -> Tensor | None:
        return self.last.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, bias={self.bias is not None}"

    def dense_weight(self) -> Tensor:
        """The equivalent ``(M, K)`` weight ``last @ first``."""
        return self.last.weight @ self.first.weight

    @classmethod
    def from_factors(cls, factors: Any, *, bias: Tensor | None = None) -> LowRankLinear:
        """A layer from ``(left (M, R), right (R, K))``: ``W ~= left @ right``."""
        left, right = factors
        (m, r), k = left.shape, right.shape[1]
        if right.shape[0] != r:
            raise ValueError(f"expected left (M, R) and right (R, K), got {tuple(left.shape)} and {tuple(right.shape)}")
        layer = cls(k, m, r, bias=bias is not None, **factory_of(left))
        with torch.no_grad():
            layer.first.weight.copy_(right)
            layer.last.weight.copy_(left)
            if bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Truncated SVD of ``linear.weight``; the relative error in ``layer.reconstruction_error``."""
        from norton.decomposition.svd import low_rank_matrix  # local: H1's algorithm, imported on use

        left, right, error = low_rank_matrix(linear.weight.detach(), rank)
        layer = cls.from_factors((left, right), bias=linear.bias.detach() if linear.bias is not None else None)
        layer.reconstruction_error = torch.as_tensor(error)
        return layer

    @classmethod
    def empty(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """A freshly initialised layer shaped to replace ``linear`` at ``rank``."""
        return cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                   **factory_of(linear.weight))

    def to_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear``."""
        weight = self.dense_weight().detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None and linear.bias is not None:
                linear.bias.copy_(self.bias)
        return linear
