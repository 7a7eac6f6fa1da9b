"""The MACs of a model as a function of every layer's choice: kept widths and a decomposition per layer.

:class:`norton.pruning.budget.MacModel` already predicts the MACs (conv + linear, per
sample) of any set of kept group widths from one per-layer count. Here each
decomposable convolution can also be replaced by a decomposition, whose MACs are
still a low-degree polynomial of the layer's kept widths::

    MACs_l = a * out * in + b * out + c * in + d

(dense: ``a = H_out * W_out * k_h * k_w``; a rank-``R`` CPDBlock: ``a = H_in * W_in * R``,
``b = R * (H_out * W_in * k_h + H_out * W_out * k_w)``). The allocator evaluates
hundreds of candidate choices at once with one matrix product.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from norton.complexity import conv_output_size
from norton.decomposition.cpd_block import conv_padding
from norton.pruning.budget import MacModel

Coefficients = tuple[float, float, float, float]  # (a, b, c, d) of a*out*in + b*out + c*in + d


class ChoiceCost(Protocol):
    """A cost of candidate choices (:class:`ChoiceMacs`, or :class:`norton.auto.latency.ChoiceLatency`)."""

    def __call__(self, keep: Tensor, choice: Tensor) -> Tensor:
        """The cost of ``keep (M, G)`` kept widths and ``choice (M, D)`` option indices -> ``(M,)``."""
        ...


@dataclass(frozen=True)
class LayerOption:
    """One way to run a layer: ``method`` ("dense", "cp-filter") at ``rank`` (``None`` for dense)."""

    method: str
    rank: int | None
    coefficients: Coefficients


def cp_filter_coefficients(conv: nn.Conv2d, input_hw: Sequence[int], rank: int) -> Coefficients:
    """MAC coefficients of a rank-``rank`` CPDBlock replacing ``conv`` on an ``(H, W)`` input.

    Same count as :func:`norton.complexity.cpd_block_macs` (form ``"cpd"``), written as a
    polynomial of the kept widths: pointwise ``C -> R*N`` on the input grid, then the
    ``k_h x 1`` and ``1 x k_w`` depthwise convs over ``R*N`` channels.
    """
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv_padding(conv), conv.dilation
    h_in, w_in = int(input_hw[0]), int(input_hw[1])
    h_out, w_out = conv_output_size(h_in, kh, sh, ph, dh), conv_output_size(w_in, kw, sw, pw, dw)
    return (float(h_in * w_in * rank), float(rank * (h_out * w_in * kh + h_out * w_out * kw)), 0.0, 0.0)


class ChoiceMacs:
    """MACs of ``(kept widths per group, option per decomposable layer)``, batched over candidates.

    Args:
        widths: the pruning MAC model of the model (groups, leaves, per-channel effects).
        options: for each decomposable leaf (by name, a leaf of ``widths``), its options;
            the first must be the dense layer as it is.
    """

    def __init__(self, widths: MacModel, options: Mapping[str, Sequence[LayerOption]], leaf_names: Sequence[str]):
        self.widths = widths
        index = {name: i for i, name in enumerate(leaf_names)}
        self.layers = [name for name in options if name in index]
        self.layer_index = torch.tensor([index[name] for name in self.layers], dtype=torch.long)  # (D,)
        leaves = len(leaf_names)
        # Leaves keep their dense coefficient unless a decomposable layer's option replaces it.
        self.base = torch.zeros(leaves, 4, dtype=torch.float64)  # (L, 4)
        self.base[:, 0] = widths.weight
        most = max((len(options[name]) for name in self.layers), default=1)
        self.table = torch.zeros(len(self.layers), most, 4, dtype=torch.float64)  # (D, O, 4)
        for i, name in enumerate(self.layers):
            for j, option in enumerate(options[name]):
                self.table[i, j] = torch.tensor(option.coefficients, dtype=torch.float64)
        self.options = {name: list(options[name]) for name in self.layers}

    def __call__(self, keep: Tensor, choice: Tensor) -> Tensor:
        """MACs for ``keep (M, G)`` widths and ``choice (M, D)`` option indices -> ``(M,)``."""
        m = self.widths
        removed = m.channels - keep.to(torch.float64)  # (M, G)
        out = m.out0 + removed @ m.d_out  # (M, L)
        inner = m.in0 + removed @ m.d_in  # (M, L)
        coef = self.base.expand(keep.shape[0], -1, -1).clone()  # (M, L, 4)
        if self.layers:
            picked = self.table[torch.arange(len(self.layers)), choice.long()]  # (M, D, 4)
            coef[:, self.layer_index] = picked
        a, b, c, d = coef.unbind(-1)  # each (M, L)
        return (a * out * inner + b * out + c * inner + d).sum(-1)
