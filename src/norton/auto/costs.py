"""The MACs of a model as a function of every layer's choice: kept widths and a decomposition per layer.

:class:`norton.pruning.budget.MacModel` already predicts the MACs (conv + linear, per
sample) of any set of kept group widths from one per-layer count. Here each
decomposable convolution can also be replaced by a decomposition, whose MACs are
still a low-degree polynomial of the layer's kept widths::

    MACs_l = a * out * in + b * out + c * in + d

(dense: ``a = H_out * W_out * k_h * k_w``; a rank-``R`` CPDBlock: ``a = H_in * W_in * R``,
``b = R * (H_out * W_in * k_h + H_out * W_out * k_w)``; the layer-level blocks of Tucker-2,
layer-wise CP and spatial SVD are *linear* in the widths at fixed ranks, see their
``*_coefficients``). The allocator evaluates hundreds of candidate choices at once with one
matrix product.

Ranks are fixed when the options are built, from the layer's full widths (Tucker-2's
``R1 = ceil(f C)``, ``R2 = ceil(f N)``; layer CP and spatial SVD at a fraction of the dense
MACs), so the coefficients stay exact whatever widths the pruning keeps. A rank can only be
applied to a layer wide enough for it (Tucker-2 needs ``C >= R1`` and ``N >= R2``):
each option carries the least ``(in, out)`` widths it needs, and a choice that keeps
fewer costs ``inf``, so the allocator never picks it (no rank is capped after the fact).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


# Candidate ranks of the layer-level methods (cp-filter's come from auto_compress's ``ranks``).
TUCKER2_FRACTIONS = (0.5, 0.375, 0.25, 0.125)  # R1 = ceil(f C), R2 = ceil(f N): about 0.36, 0.22, 0.12, 0.04 of a 3x3's MACs
MACS_FRACTIONS = (0.5, 0.25, 0.125)  # cp-layer and svd: the rank whose block keeps about this much of the MACs
MAX_DECOMPOSED_MACS = 0.8  # an option is offered only below this fraction of the dense layer's MACs


@dataclass(frozen=True)
class LayerOption:
    """One way to run a layer: ``method`` ("dense", "cp-filter", "tucker2", "cp-layer", "svd") at ``rank``
    (``None`` for dense, ``(R1, R2)`` for Tucker-2); it needs at least ``min_widths`` ``(in, out)`` kept."""

    method: str
    rank: Any
    coefficients: Coefficients
    min_widths: tuple[int, int] = (1, 1)


def _geometry(conv: nn.Conv2d, input_hw: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """``(H_in, W_in, H_out, W_out, k_h, k_w)`` of ``conv`` on an ``(H, W)`` input."""
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv_padding(conv), conv.dilation
    h_in, w_in = int(input_hw[0]), int(input_hw[1])
    return h_in, w_in, conv_output_size(h_in, kh, sh, ph, dh), conv_output_size(w_in, kw, sw, pw, dw), kh, kw


def cp_filter_coefficients(conv: nn.Conv2d, input_hw: Sequence[int], rank: int) -> Coefficients:
    """MAC coefficients of a rank-``rank`` CPDBlock replacing ``conv`` on an ``(H, W)`` input.

    Same count as :func:`norton.complexity.cpd_block_macs` (form ``"cpd"``), written as a
    polynomial of the kept widths: pointwise ``C -> R*N`` on the input grid, then the
    ``k_h x 1`` and ``1 x k_w`` depthwise convs over ``R*N`` channels.
    """
    h_in, w_in, h_out, w_out, kh, kw = _geometry(conv, input_hw)
    return (float(h_in * w_in * rank), float(rank * (h_out * w_in * kh + h_out * w_out * kw)), 0.0, 0.0)


def tucker2_coefficients(conv: nn.Conv2d, input_hw: Sequence[int], ranks: tuple[int, int]) -> Coefficients:
    """MAC coefficients of a rank-``(R1, R2)`` :class:`~norton.decomposition.tucker2_conv.Tucker2Conv`.

    1x1 ``C -> R1`` on the input grid (``c = H W R1``), ``k_h x k_w`` ``R1 -> R2`` on the output
    grid (``d = H' W' R1 R2 k_h k_w``), 1x1 ``R2 -> N`` (``b = H' W' R2``): linear in the widths.
    """
    h_in, w_in, h_out, w_out, kh, kw = _geometry(conv, input_hw)
    r1, r2 = ranks
    return (0.0, float(h_out * w_out * r2), float(h_in * w_in * r1), float(h_out * w_out * r1 * r2 * kh * kw))


def cp_layer_coefficients(conv: nn.Conv2d, input_hw: Sequence[int], rank: int) -> Coefficients:
    """MAC coefficients of a rank-``R`` :class:`~norton.decomposition.layer_cp_conv.LayerCPConv`.

    1x1 ``C -> R`` (``c = H W R``), depthwise ``k_h x 1`` and ``1 x k_w`` over ``R`` channels
    (``d = R (H' W k_h + H' W' k_w)``), 1x1 ``R -> N`` (``b = H' W' R``).
    """
    h_in, w_in, h_out, w_out, kh, kw = _geometry(conv, input_hw)
    return (0.0, float(h_out * w_out * rank), float(h_in * w_in * rank),
            float(rank * (h_out * w_in * kh + h_out * w_out * kw)))


def spatial_svd_coefficients(conv: nn.Conv2d, input_hw: Sequence[int], rank: int) -> Coefficients:
    """MAC coefficients of a rank-``R`` :class:`~norton.decomposition.low_rank_layers.SpatialSVDConv`.

    ``k_h x 1`` ``C -> R`` to ``(H', W)`` (``c = H' W R k_h``), then ``1 x k_w`` ``R -> N``
    (``b = H' W' R k_w``).
    """
    _, w_in, h_out, w_out, kh, kw = _geometry(conv, input_hw)
    return (0.0, float(h_out * w_out * rank * kw), float(h_out * w_in * rank * kh), 0.0)


def option_macs(option: LayerOption, conv: nn.Conv2d) -> float:
    """MACs of ``option`` at ``conv``'s full widths."""
    a, b, c, d = option.coefficients
    out, inner = conv.out_channels, conv.in_channels
    return a * out * inner + b * out + c * inner + d


def decomposition_options(
    conv: nn.Conv2d, input_hw: Sequence[int], methods: Iterable[str], cp_ranks: Sequence[int],
) -> list[LayerOption]:
    """Every candidate decomposition of ``conv`` by ``methods``, each under 80% of the dense MACs.

    cp-filter at ``cp_ranks``; tucker2 at :data:`TUCKER2_FRACTIONS` of each width; cp-layer and
    svd at the ranks keeping about :data:`MACS_FRACTIONS` of the MACs (at least rank 1). Ranks
    are within each method's full rank at the full widths; ``min_widths`` keeps them so when pruned.
    """
    h_in, w_in, h_out, w_out, kh, kw = _geometry(conv, input_hw)
    c, n = conv.in_channels, conv.out_channels
    dense = float(h_out * w_out * kh * kw * c * n)
    found: list[LayerOption] = []
    for method in methods:
        if method == "cp-filter":
            for rank in sorted(set(cp_ranks), reverse=True):
                if rank <= c * max(kh, kw):  # CPDBlock's full rank
                    found.append(LayerOption(method, rank, cp_filter_coefficients(conv, input_hw, rank),
                                             (math.ceil(rank / max(kh, kw)), 1)))
        elif method == "tucker2":
            for f in TUCKER2_FRACTIONS:
                pair = (math.ceil(f * c), math.ceil(f * n))
                # full rank (min(C, N k_h k_w), min(N, C k_h k_w))
                needs = (max(pair[0], math.ceil(pair[1] / (kh * kw))), max(pair[1], math.ceil(pair[0] / (kh * kw))))
                if needs[0] <= c and needs[1] <= n:
                    found.append(LayerOption(method, pair, tucker2_coefficients(conv, input_hw, pair), needs))
        elif method in ("cp-layer", "svd"):
            per_rank = option_macs(LayerOption(method, 1, _coefficients(method, conv, input_hw, 1)), conv)
            for f in MACS_FRACTIONS:
                rank = max(1, int(f * dense / per_rank))
                if method == "cp-layer":  # full rank min(C, N) k_h k_w while both widths are >= max(k_h, k_w)
                    least = max(math.ceil(rank / (kh * kw)), kh, kw)
                    needs = (least, least)
                else:  # spatial SVD: full rank min(C k_h, N k_w)
                    needs = (math.ceil(rank / kh), math.ceil(rank / kw))
                if needs[0] <= c and needs[1] <= n:
                    found.append(LayerOption(method, rank, _coefficients(method, conv, input_hw, rank), needs))
    unique = list({(o.method, o.rank): o for o in found}.values())
    return [o for o in unique if option_macs(o, conv) < MAX_DECOMPOSED_MACS * dense]


def _coefficients(method: str, conv: nn.Conv2d, input_hw: Sequence[int], rank: int) -> Coefficients:
    return (cp_layer_coefficients if method == "cp-layer" else spatial_svd_coefficients)(conv, input_hw, rank)


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
        self.least = torch.ones(len(self.layers), most, 2, dtype=torch.float64)  # (D, O, 2): least (in, out) widths
        for i, name in enumerate(self.layers):
            for j, option in enumerate(options[name]):
                self.table[i, j] = torch.tensor(option.coefficients, dtype=torch.float64)
                self.least[i, j] = torch.tensor(option.min_widths, dtype=torch.float64)
        self.options = {name: list(options[name]) for name in self.layers}

    def __call__(self, keep: Tensor, choice: Tensor) -> Tensor:
        """MACs for ``keep (M, G)`` widths and ``choice (M, D)`` option indices -> ``(M,)``; ``inf`` where a
        chosen rank does not fit the kept widths."""
        m = self.widths
        removed = m.channels - keep.to(torch.float64)  # (M, G)
        out = m.out0 + removed @ m.d_out  # (M, L)
        inner = m.in0 + removed @ m.d_in  # (M, L)
        coef = self.base.expand(keep.shape[0], -1, -1).clone()  # (M, L, 4)
        fits = torch.ones(keep.shape[0], dtype=torch.bool)
        if self.layers:
            rows = torch.arange(len(self.layers))
            picked = self.table[rows, choice.long()]  # (M, D, 4)
            coef[:, self.layer_index] = picked
            least = self.least[rows, choice.long()]  # (M, D, 2)
            fits = ((inner[:, self.layer_index] >= least[..., 0] - 1e-9)
                    & (out[:, self.layer_index] >= least[..., 1] - 1e-9)).all(-1)  # (M,)
        a, b, c, d = coef.unbind(-1)  # each (M, L)
        total = (a * out * inner + b * out + c * inner + d).sum(-1)
        return torch.where(fits, total, torch.full_like(total, math.inf))
