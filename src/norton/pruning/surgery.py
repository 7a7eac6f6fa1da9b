"""Layer surgery: remove channels from one layer, beside torch-pruning's own functions.

:class:`CPDBlockPruner` prunes a CPDBlock as one unit (its three inner convs are
never separate layers); :class:`ChannelMapPruner` edits parameter-free channel
re-mappers such as the CIFAR ResNets' option-A shortcuts. :func:`layer_pruner`
finds the functions for any module and :func:`side_sizes` reads its widths;
replaying a record (:mod:`norton.pruning.plan`) and the engine both go through them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock

OUT, IN = "out", "in"  # which side of a layer an index list refers to


def _select(param: nn.Parameter, keep: Tensor, dim: int) -> nn.Parameter:
    """A new parameter holding ``param``'s entries ``keep`` along ``dim`` (gradient sliced too)."""
    keep = keep.to(param.device)
    pruned = nn.Parameter(param.data.index_select(dim, keep).contiguous(), requires_grad=param.requires_grad)
    if param.grad is not None:
        pruned.grad = param.grad.index_select(dim, keep)
    return pruned


def kept_indices(size: int, removed: Sequence[int]) -> Tensor:
    """Sorted indices of ``range(size)`` not in ``removed`` as a LongTensor."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[torch.as_tensor(list(removed), dtype=torch.long)] = False
    return mask.nonzero().flatten()


class CPDBlockPruner(tp.pruner.function.BasePruningFunc):
    """Prunes a :class:`CPDBlock` as one layer of ``N`` filters.

    Removing filter ``n`` removes the intermediate channels ``r * N + n`` for every
    rank component ``r`` (rank-major layout) from the pointwise conv's outputs and
    from both depthwise convs, and the bias entry ``n``. Removing input channel
    ``c`` removes the pointwise conv's input ``c``. Output and input pruning are
    different functions, so the dependency graph does not couple a block's inputs
    with its outputs; its inner convs are never seen as separate layers.
    """

    TARGET_MODULES = CPDBlock

    def prune_out_channels(self, layer: CPDBlock, idxs: Sequence[int]) -> CPDBlock:
        n, r = layer.out_channels, layer.rank
        keep = kept_indices(n, idxs)  # (N',)
        # (R, 1) * N + (1, N') -> (R, N') -> (R*N',): rank-major, filter order kept
        inner = (torch.arange(r)[:, None] * n + keep[None, :]).flatten()
        feature = cast(Any, layer.feature)  # an nn.Sequential with named convs
        pointwise, vertical, horizontal = feature.pointwise, feature.vertical, feature.horizontal
        pointwise.weight = _select(pointwise.weight, inner, 0)
        pointwise.out_channels = inner.numel()
        for depthwise in (vertical, horizontal):
            depthwise.weight = _select(depthwise.weight, inner, 0)
            depthwise.in_channels = depthwise.out_channels = depthwise.groups = inner.numel()
        if layer.bias is not None:
            layer.bias = _select(layer.bias, keep, 0)
        errors = getattr(layer, "reconstruction_error", None)
        if isinstance(errors, Tensor) and errors.shape == (n,):
            layer.reconstruction_error = errors[keep.to(errors.device)]
        layer.out_channels = keep.numel()
        return layer

    def prune_in_channels(self, layer: CPDBlock, idxs: Sequence[int]) -> CPDBlock:
        keep = kept_indices(layer.in_channels, idxs)
        pointwise = cast(Any, layer.feature).pointwise
        pointwise.weight = _select(pointwise.weight, keep, 1)
        pointwise.in_channels = layer.in_channels = keep.numel()
        return layer

    def get_out_channels(self, layer: CPDBlock) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: CPDBlock) -> int:
        return layer.in_channels


class ChannelMapPruner(tp.pruner.function.BasePruningFunc):
    """Parameter-free channel re-mappers, such as the CIFAR ResNets' option-A shortcuts.

    Protocol: integer ``in_channels`` and ``out_channels``, a ``channel_sources``
    tensor ``(out_channels,)`` (output channel ``j`` carries input channel
    ``channel_sources[j]``, zeros where -1) and ``set_channel_sources(sources,
    in_channels)``. Removing outputs drops their entries; removing inputs turns the
    entries that read them into -1 and renumbers the rest. Either way every kept
    channel keeps its value, so the residual additions fed by the shortcut stay
    aligned. The two sides are not coupled: a shortcut lets the stem and a stage
    (or two stages) have different widths, as the paper's configurations need.
    """

    # ``layer: Any``: the protocol's attributes are duck-typed, not declared by nn.Module.
    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        keep = kept_indices(layer.out_channels, idxs)
        layer.set_channel_sources(layer.channel_sources.cpu()[keep], layer.in_channels)
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        keep = kept_indices(layer.in_channels, idxs)
        renumber = torch.full((layer.in_channels + 1,), -1, dtype=torch.long)  # slot -1 (last) stays -1
        renumber[keep] = torch.arange(keep.numel())
        layer.set_channel_sources(renumber[layer.channel_sources.cpu()], keep.numel())
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return int(layer.out_channels)

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.in_channels)


CPD_BLOCK_PRUNER = CPDBlockPruner()
CHANNEL_MAP_PRUNER = ChannelMapPruner()


def is_channel_map(module: nn.Module) -> bool:
    """Whether ``module`` follows the channel re-mapper protocol (see :class:`ChannelMapPruner`)."""
    if isinstance(module, (CPDBlock, nn.modules.conv._ConvNd, nn.Linear)):
        return False
    sizes = (getattr(module, "in_channels", None), getattr(module, "out_channels", None))
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        return False
    sources = getattr(module, "channel_sources", None)
    return (
        isinstance(sources, Tensor)
        and callable(getattr(module, "set_channel_sources", None))
        and next(module.parameters(), None) is None
    )


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """The torch-pruning pruners norton adds for ``model``: CPDBlock and the channel re-mappers."""
    pruners: dict[type, tp.pruner.function.BasePruningFunc] = {CPDBlock: CPD_BLOCK_PRUNER}
    for module in model.modules():
        if is_channel_map(module):
            pruners[type(module)] = CHANNEL_MAP_PRUNER
    return pruners


def layer_pruner(module: nn.Module) -> tp.pruner.function.BasePruningFunc | None:
    """The pruning functions for ``module``'s channels, or ``None`` if it has none."""
    if isinstance(module, CPDBlock):
        return CPD_BLOCK_PRUNER
    if is_channel_map(module):
        return CHANNEL_MAP_PRUNER
    return tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))


def side_sizes(module: nn.Module) -> dict[str, int]:
    """Current channel counts of ``module``'s prunable sides, ``{"out": n}`` and/or ``{"in": n}``."""
    pruner = layer_pruner(module)
    if pruner is None:
        return {}
    sizes = {OUT: pruner.get_out_channels(module)}
    if pruner.prune_in_channels != pruner.prune_out_channels:  # a norm or depthwise conv has one side
        sizes[IN] = pruner.get_in_channels(module)
    return {side: size for side, size in sizes.items() if isinstance(size, int)}
