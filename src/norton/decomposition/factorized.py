"""What the layer-level decomposed blocks share: a chain of ordinary layers that computes one dense layer.

:class:`~norton.decomposition.tucker2_conv.Tucker2Conv`,
:class:`~norton.decomposition.layer_cp_conv.LayerCPConv`,
:class:`~norton.decomposition.low_rank_layers.SpatialSVDConv` and
:class:`~norton.decomposition.low_rank_layers.LowRankConv1x1` are :class:`FactorizedConv`
subclasses; :class:`~norton.decomposition.low_rank_layers.LowRankLinear` is their
``nn.Linear`` sibling. Every block

* holds only ``nn.Conv2d`` / ``nn.Linear`` children, run one after the other, so MAC
  counters, torch-pruning's dependency graph, BatchNorm folding and exporters see
  ordinary layers;
* keeps its bias on its last child (:attr:`output_layer`), whose output *is* the
  block's output: a BatchNorm after the block folds into that child;
* reads its shapes from its children (``in_channels``, ``out_channels``, ``rank``), so
  they stay right after the pruning engine slices the children;
* computes its forward as the convolution by :meth:`dense_weight`; :meth:`to_conv`
  returns that convolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from norton.complexity import conv2d_macs, conv_output_size
from norton.decomposition.cpd_block import PaddingMode, conv_padding, equivalent_conv


class FactorizedConv(nn.Module):
    """A dense ``nn.Conv2d`` written as a chain of thinner convolutions (see the module docstring).

    Subclasses set the children in ``__init__`` and implement :meth:`dense_weight`;
    :attr:`geometry` holds what the dense conv had (kernel, stride, padding, dilation,
    padding mode), which the children split among themselves.
    """

    # Properties TorchScript must not compile (they read Python-side attributes only).
    __jit_unused_properties__ = ["bias", "in_channels", "out_channels", "output_layer", "rank"]

    def __init__(
        self, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
        dilation: tuple[int, int], padding_mode: PaddingMode,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.padding_mode = padding_mode

    @property
    def output_layer(self) -> nn.Conv2d:
        """The last child: it produces the block's output and holds its bias."""
        return list(self.children())[-1]  # type: ignore[return-value]  # every child is an nn.Conv2d

    @property
    def in_channels(self) -> int:
        return int(next(iter(self.children())).in_channels)  # type: ignore[arg-type]  # an nn.Conv2d

    @property
    def out_channels(self) -> int:
        return int(self.output_layer.out_channels)

    @property
    def rank(self) -> Any:
        """The block's rank: an int, or ``(R1, R2)`` for Tucker-2."""
        raise NotImplementedError

    @property
    def bias(self) -> Tensor | None:
        return self.output_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x

    def dense_weight(self) -> Tensor:
        """The equivalent dense kernel ``(N, C_in, k_h, k_w)`` (differentiable in the children's weights)."""
        raise NotImplementedError

    def to_conv(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d`` (same outputs up to float rounding)."""
        return equivalent_conv(self)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )


def chain_macs(block: nn.Module, input_hw: Sequence[int]) -> int:
    """MACs of a chain of ``nn.Conv2d`` children on one ``(H, W)`` input, from :func:`conv2d_macs`."""
    h, w = int(input_hw[0]), int(input_hw[1])
    total = 0
    for conv in block.children():
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"chain_macs counts chains of nn.Conv2d, got a {type(conv).__name__}")
        total += conv2d_macs(conv, (h, w))
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
        h, w = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    return total


def factory_of(tensor: Tensor | None, device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """``{"device", "dtype"}`` for new layers: those given, else ``tensor``'s."""
    if tensor is not None:
        device = tensor.device if device is None else device
        dtype = tensor.dtype if dtype is None else dtype
    return {"device": device, "dtype": dtype}


def check_positive(**values: Any) -> None:
    """``ValueError`` unless every value is a positive int (constructor arguments, not user input)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """``stride``, ``padding`` (explicit), ``dilation`` and ``padding_mode`` of ``conv``, as keyword arguments."""
    return {"stride": tuple(conv.stride), "padding": conv_padding(conv), "dilation": tuple(conv.dilation),
            "padding_mode": conv.padding_mode}


def unpack_factors(factors: Any, names: Sequence[str]) -> list[Tensor]:
    """The factor tensors of a named tuple (or any object with those attributes) or of a plain sequence."""
    if all(hasattr(factors, name) for name in names):
        return [getattr(factors, name) for name in names]
    values = list(factors)
    if len(values) != len(names):
        raise ValueError(f"expected {len(names)} factors ({', '.join(names)}), got {len(values)}")
    return values
