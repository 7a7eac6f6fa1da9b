"""The decomposition methods :func:`~norton.decomposition.decompose.decompose` can apply, by name.

=============  ==========================================  =========================================
method         replaces                                    with
=============  ==========================================  =========================================
``cp-filter``  ``k x k`` convs (groups 1)                  :class:`CPDBlock`: a CP tensor per filter (NORTON)
``tucker2``    ``k x k`` convs (groups 1)                  :class:`Tucker2Conv`: 1x1, ``k x k`` core, 1x1
``cp-layer``   ``k x k`` convs (groups 1)                  :class:`LayerCPConv`: 1x1, ``k x 1``, ``1 x k``, 1x1
``svd``        ``nn.Linear``; 1x1 convs; ``k x k`` convs   :class:`LowRankLinear`, :class:`LowRankConv1x1`;
                                                           :class:`SpatialSVDConv` (``k x 1`` then ``1 x k``)
=============  ==========================================  =========================================

A method says which layers it takes, how high a rank can go on a layer (its *full
rank*: a higher one never lowers the error), how to pick a rank from a spec
(``"vbmf"``, ``"energy:F"``, ``"macs:F"``), how to build the block from a layer and
how to build an empty block of the same shapes for replay. Ranks are ints, except
Tucker-2's ``(R1, R2)`` (input-channel rank, output-channel rank).

Rank selection reads the singular values of the matrices each method factorises
(:meth:`DecompositionMethod.selection_matrices`): empirical VBMF (Nakajima et al. 2013,
as Kim et al. 2016 use it) picks the rank of each; ``energy:F`` keeps the fewest singular
values holding fraction ``F`` of the squared spectrum; ``macs:F`` is the highest rank whose
block keeps at most ``F`` of the layer's MACs (block MACs from its children's
:func:`~norton.complexity.conv2d_macs`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from norton.complexity import conv2d_macs, cpd_block_macs
from norton.decomposition.cpd_block import CPDBlock, conv_padding
from norton.decomposition.factorized import FactorizedConv, chain_macs, conv_geometry
from norton.decomposition.layer_cp_conv import LayerCPConv
from norton.decomposition.low_rank_layers import LowRankConv1x1, LowRankLinear, SpatialSVDConv
from norton.decomposition.tucker2_conv import Tucker2Conv
from norton.errors import RankAboveLayerError, UserError
from norton.limits import MAX_RANK, check_int

Rank = int | tuple[int, int]
BLOCK_TYPES: tuple[type[nn.Module], ...] = (CPDBlock, FactorizedConv, LowRankLinear)
SPEC_KINDS = ("fixed", "vbmf", "energy", "macs")


def is_block(module: nn.Module) -> bool:
    """A decomposed block of any method (its children are never decomposed again)."""
    return isinstance(module, BLOCK_TYPES)


class DecompositionMethod:
    """One method: eligibility, rank bounds and selection, and how to build its blocks (see the module docstring)."""

    name = ""
    summary = ""

    # ------------------------------------------------------------ layers
    def eligible(self, module: Any) -> bool:
        """A ``k x k`` (``k_h k_w >= 2``) ``nn.Conv2d`` with ``groups == 1`` (the filter and layer methods)."""
        return bool(
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.kernel_size[0] * module.kernel_size[1] >= 2
            and not isinstance(module.weight, nn.parameter.UninitializedParameter)
        )

    def full_rank(self, layer: Any) -> Rank:
        """The highest useful rank on ``layer``."""
        raise NotImplementedError

    # ------------------------------------------------------------ ranks
    def check_rank(self, value: Any, layer: Any, what: str) -> Rank:
        """``value`` as this method's rank for ``layer``: ``UserError`` for a non-int, 0, or above the full rank."""
        rank = check_int(value, what, minimum=1, maximum=MAX_RANK)
        full = self.full_rank(layer)
        assert isinstance(full, int)  # Tucker-2 overrides this method
        if rank > full:
            raise RankAboveLayerError(
                f"{what} {rank:,} is above the full rank {full:,} of a {_shape(layer)} layer for {self.name} "
                f"(a higher rank never lowers the error): use at most {full}, or a spec like 'energy:0.9'"
            )
        return rank

    def record_rank(self, rank: Rank) -> Any:
        """The rank as plain JSON for the plan record."""
        return rank

    def selection_matrices(self, layer: Any) -> list[Tensor]:
        """The matrices whose spectra choose the rank (``vbmf``, ``energy``); one rank per matrix."""
        raise NotImplementedError

    def combine(self, ranks: Sequence[int], layer: Any) -> Rank:
        """One rank from the per-matrix ranks: the largest (a CP rank is at least each unfolding's rank)."""
        return max(ranks)

    def candidates(self, layer: Any) -> list[Rank]:
        """Ranks in increasing cost, for ``macs:F``."""
        full = self.full_rank(layer)
        assert isinstance(full, int)
        return list(range(1, full + 1))

    def select_rank(self, layer: Any, kind: str, value: Any, input_hw: Sequence[int] | None) -> Rank:
        """The rank a spec ``(kind, value)`` gives ``layer`` (``input_hw``: its input's ``(H, W)``, for ``macs``)."""
        if kind == "fixed":
            return self.check_rank(value, layer, "rank")
        if kind == "macs":
            return self._rank_for_macs(layer, float(value), input_hw)
        from norton.decomposition.rank_selection import energy_rank, evbmf_rank  # local: H1's module

        ranks = []
        for matrix in self.selection_matrices(layer):
            matrix = matrix.detach().to(torch.float64 if matrix.device.type == "cpu" else torch.float32)
            if kind == "vbmf":
                ranks.append(int(evbmf_rank(matrix)))
            elif kind == "energy":
                ranks.append(int(energy_rank(torch.linalg.svdvals(matrix), float(value))))
            else:
                raise UserError(f"unknown rank spec kind {kind!r}; use one of {', '.join(SPEC_KINDS)}")
        return self._clip(self.combine([max(1, r) for r in ranks], layer), layer)

    def _clip(self, rank: Rank, layer: Any) -> Rank:
        full = self.full_rank(layer)
        if isinstance(rank, tuple) and isinstance(full, tuple):
            return (min(rank[0], full[0]), min(rank[1], full[1]))
        assert isinstance(rank, int) and isinstance(full, int)
        return min(rank, full)

    def _rank_for_macs(self, layer: Any, fraction: float, input_hw: Sequence[int] | None) -> Rank:
        """The highest rank whose block keeps at most ``fraction`` of the layer's MACs (rank 1 if none does)."""
        if input_hw is None and not isinstance(layer, nn.Linear):
            raise UserError("a 'macs:F' rank needs example_inputs (each layer's input size sets its MACs)")
        candidates = self.candidates(layer)
        dense = layer_macs(layer, input_hw)
        lo, hi = 0, len(candidates) - 1  # block MACs grow with the rank: bisection
        if self.block_macs(layer, candidates[0], input_hw) > fraction * dense:
            return candidates[0]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.block_macs(layer, candidates[mid], input_hw) <= fraction * dense:
                lo = mid
            else:
                hi = mid - 1
        return candidates[lo]

    def block_macs(self, layer: Any, rank: Rank, input_hw: Sequence[int] | None) -> int:
        """MACs of this method's block for ``layer`` at ``rank`` (per sample; per row for a Linear)."""
        block = self.empty(meta_twin(layer), rank)
        if isinstance(block, CPDBlock):
            assert input_hw is not None
            return cpd_block_macs(block, input_hw)
        if isinstance(block, LowRankLinear):
            return block.rank * (block.in_features + block.out_features)
        assert input_hw is not None
        return chain_macs(block, input_hw)

    # ------------------------------------------------------------ blocks
    def build(self, layer: Any, rank: Rank, options: dict[str, Any]) -> tuple[nn.Module, Tensor]:
        """The block replacing ``layer`` at ``rank`` and its relative reconstruction error(s)."""
        raise NotImplementedError

    def empty(self, layer: Any, rank: Rank) -> nn.Module:
        """A freshly initialised block of the right shapes (replay: a state dict loads next)."""
        raise NotImplementedError


# ====================================================================== the four methods
class CPFilterMethod(DecompositionMethod):
    """NORTON's filter decomposition: every filter ``(C_in, k_h, k_w)`` a rank-R CP tensor (CPDBlock).

    ``vbmf``/``energy`` read the filters' ``(C_in, k_h k_w)`` unfoldings stacked over filters,
    ``(N C_in, k_h k_w)``: the spatial rank the filters share, a lower bound of their CP rank.
    """

    name = "cp-filter"
    summary = "a CP tensor per filter (NORTON's CPDBlock)"

    def full_rank(self, layer: Any) -> int:
        return int(layer.in_channels * max(layer.kernel_size))

    def check_rank(self, value: Any, layer: Any, what: str) -> Rank:
        from norton.limits import check_rank

        return check_rank(value, what, in_channels=layer.in_channels, kernel_size=layer.kernel_size)

    def selection_matrices(self, layer: Any) -> list[Tensor]:
        weight = layer.weight  # (N, C_in, k_h, k_w)
        return [weight.reshape(-1, weight.shape[2] * weight.shape[3])]  # (N C_in, k_h k_w)

    def build(self, layer: Any, rank: Rank, options: dict[str, Any]) -> tuple[nn.Module, Tensor]:
        block = CPDBlock.from_conv(layer, rank_int(rank), **{k: options[k] for k in ("n_iter_max", "tol", "init", "seed")})
        return block, errors_of(block)

    def empty(self, layer: Any, rank: Rank) -> nn.Module:
        assert isinstance(rank, int)
        return CPDBlock(
            layer.in_channels, layer.out_channels, rank_int(rank), layer.kernel_size, stride=layer.stride,
            padding=conv_padding(layer), dilation=layer.dilation, bias=layer.bias is not None,
            padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype,
        )


class Tucker2Method(DecompositionMethod):
    """Tucker-2 (Kim et al.): ranks ``(R1, R2)`` of the input- and output-channel modes.

    ``vbmf``/``energy`` read the mode-1 unfolding ``(C_in, N k_h k_w)`` for R1 and the mode-0
    unfolding ``(N, C_in k_h k_w)`` for R2, as Kim et al. do. An int rank ``r`` means ``(r, r)``.
    """

    name = "tucker2"
    summary = "1x1, k x k core, 1x1 (Tucker-2 on the channel modes)"

    def full_rank(self, layer: Any) -> tuple[int, int]:
        c, n, k = layer.in_channels, layer.out_channels, layer.kernel_size[0] * layer.kernel_size[1]
        return (min(c, n * k), min(n, c * k))

    def check_rank(self, value: Any, layer: Any, what: str) -> Rank:
        pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
        if len(pair) != 2:
            raise UserError(f"{what} for tucker2 must be an int or a pair (R1, R2), got {value!r}")
        r1, r2 = (check_int(v, what, minimum=1, maximum=MAX_RANK) for v in pair)
        full = self.full_rank(layer)
        if r1 > full[0] or r2 > full[1]:
            raise RankAboveLayerError(
                f"{what} ({r1}, {r2}) is above the full Tucker-2 rank {full} of a {_shape(layer)} layer "
                f"(at most C_in and N): give a smaller rank, a pair, or a spec like 'energy:0.9'"
            )
        return (r1, r2)

    def record_rank(self, rank: Rank) -> Any:
        assert isinstance(rank, tuple)
        return [int(rank[0]), int(rank[1])]

    def selection_matrices(self, layer: Any) -> list[Tensor]:
        weight = layer.weight  # (N, C_in, k_h, k_w)
        return [weight.transpose(0, 1).flatten(1), weight.flatten(1)]  # (C_in, N k_h k_w), (N, C_in k_h k_w)

    def combine(self, ranks: Sequence[int], layer: Any) -> Rank:
        return (ranks[0], ranks[1])

    def candidates(self, layer: Any) -> list[Rank]:
        full1, full2 = self.full_rank(layer)
        # both ranks grow together, each in proportion to its full rank
        return [(r, max(1, min(full2, round(r * full2 / full1)))) for r in range(1, full1 + 1)]

    def build(self, layer: Any, rank: Rank, options: dict[str, Any]) -> tuple[nn.Module, Tensor]:
        block = Tucker2Conv.from_conv(layer, rank, n_iter_max=options["n_iter_max"], tol=options["tol"])
        return block, errors_of(block)

    def empty(self, layer: Any, rank: Rank) -> nn.Module:
        return Tucker2Conv.empty(layer, rank)


class CPLayerMethod(DecompositionMethod):
    """Layer-wise CP (Lebedev et al.): one rank-R CP decomposition of the whole kernel.

    ``vbmf``/``energy`` read the mode-0 ``(N, C_in k_h k_w)`` and mode-1 ``(C_in, N k_h k_w)``
    unfoldings and take the larger rank (a CP rank is at least every unfolding's rank).
    """

    name = "cp-layer"
    summary = "1x1, depthwise k x 1, depthwise 1 x k, 1x1 (one CP of the kernel)"

    def full_rank(self, layer: Any) -> int:
        dims = sorted((layer.out_channels, layer.in_channels, *layer.kernel_size))
        return int(min(MAX_RANK, dims[0] * dims[1] * dims[2]))  # the product of all dims but the largest

    def selection_matrices(self, layer: Any) -> list[Tensor]:
        weight = layer.weight  # (N, C_in, k_h, k_w)
        return [weight.flatten(1), weight.transpose(0, 1).flatten(1)]  # (N, C_in k_h k_w), (C_in, N k_h k_w)

    def build(self, layer: Any, rank: Rank, options: dict[str, Any]) -> tuple[nn.Module, Tensor]:
        block = LayerCPConv.from_conv(layer, rank_int(rank), n_iter_max=options["n_iter_max"], tol=options["tol"],
                                      seed=options["seed"])
        return block, errors_of(block)

    def empty(self, layer: Any, rank: Rank) -> nn.Module:
        return LayerCPConv.empty(layer, rank_int(rank))


class SVDMethod(DecompositionMethod):
    """Truncated SVD: ``nn.Linear`` and 1x1 convs as two thin layers, ``k x k`` convs spatially separated.

    ``vbmf``/``energy`` read the matrix factorised: the ``(M, K)`` weight of a Linear, the
    ``(N, C_in)`` matrix of a 1x1 conv, the ``(C_in k_h, N k_w)`` reshaped kernel of a ``k x k`` one.
    """

    name = "svd"
    summary = "two thin layers (Linear, 1x1) or k x 1 then 1 x k (spatial SVD)"

    def eligible(self, module: Any) -> bool:
        if type(module) is nn.Linear:
            return not isinstance(module.weight, nn.parameter.UninitializedParameter)
        return bool(isinstance(module, nn.Conv2d) and module.groups == 1
                and not isinstance(module.weight, nn.parameter.UninitializedParameter))

    def full_rank(self, layer: Any) -> int:
        if isinstance(layer, nn.Linear):
            return min(layer.in_features, layer.out_features)
        (kh, kw) = layer.kernel_size
        return min(layer.in_channels * kh, layer.out_channels * kw)

    def selection_matrices(self, layer: Any) -> list[Tensor]:
        weight = layer.weight
        if isinstance(layer, nn.Linear) or weight.shape[2:] == (1, 1):
            return [weight.flatten(1)]  # (M, K) or (N, C_in)
        n, c, kh, kw = weight.shape
        return [weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)]  # (C_in k_h, N k_w)

    def build(self, layer: Any, rank: Rank, options: dict[str, Any]) -> tuple[nn.Module, Tensor]:
        block: LowRankLinear | LowRankConv1x1 | SpatialSVDConv
        if isinstance(layer, nn.Linear):
            block = LowRankLinear.from_linear(layer, rank_int(rank))
        elif tuple(layer.kernel_size) == (1, 1):
            block = LowRankConv1x1.from_conv(layer, rank_int(rank))
        else:
            block = SpatialSVDConv.from_conv(layer, rank_int(rank))
        return block, errors_of(block)

    def empty(self, layer: Any, rank: Rank) -> nn.Module:
        if isinstance(layer, nn.Linear):
            return LowRankLinear.empty(layer, rank_int(rank))
        if tuple(layer.kernel_size) == (1, 1):
            return LowRankConv1x1.empty(layer, rank_int(rank))
        return SpatialSVDConv.empty(layer, rank_int(rank))


METHODS: dict[str, DecompositionMethod] = {
    method.name: method for method in (CPFilterMethod(), Tucker2Method(), CPLayerMethod(), SVDMethod())
}
DEFAULT_METHOD = "cp-filter"


def get_method(name: Any) -> DecompositionMethod:
    """The method called ``name``; ``UserError`` listing the known ones otherwise."""
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    raise UserError(f"unknown decomposition method {name!r:.40}; use one of {', '.join(METHODS)}")


# ====================================================================== helpers
def layer_macs(layer: Any, input_hw: Sequence[int] | None) -> int:
    """MACs of a dense ``nn.Conv2d`` on ``input_hw`` (per row for an ``nn.Linear``)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    assert input_hw is not None
    return conv2d_macs(layer, input_hw)


def meta_twin(layer: Any) -> nn.Module:
    """A meta-device layer of ``layer``'s type and shapes (no memory), to size candidate blocks."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, groups=layer.groups,
                     bias=layer.bias is not None, device="meta", **conv_geometry(layer))


def _shape(layer: Any) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}->{layer.out_features}"
    (kh, kw) = layer.kernel_size
    return f"{layer.out_channels}x{layer.in_channels}x{kh}x{kw}"


def rank_int(rank: Rank) -> int:
    """An int rank (every method but Tucker-2 has one)."""
    if not isinstance(rank, int):
        raise UserError(f"expected one int rank, got {rank!r}")
    return rank


def errors_of(block: nn.Module) -> Tensor:
    """The relative reconstruction error(s) a ``from_conv``/``from_linear`` kept on ``block``."""
    errors = block.__dict__.get("reconstruction_error")
    return errors if isinstance(errors, Tensor) else torch.zeros(1)
