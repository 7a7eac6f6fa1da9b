"""Prune records: what a structural prune removed, as plain JSON data, and how to replay it.

A record lists, per layer name, the output channels removed (``"removed"``) and
the input channels removed (``"removed_inputs"``), as indices into the layer's
channels *before* the prune::

    {"op": "prune",
     "removed": {"features.conv0": [3, 17], "features.norm0": [3, 17]},
     "removed_inputs": {"features.conv1": [3, 17]},
     "criterion": "pabs", "amount": {"ratio": 0.5}}

Every affected layer is listed (convolutions, CPDBlocks, batch norms, depthwise
convolutions, linear layers), so :func:`replay_prune` is plain slicing: it needs
no dependency graph, no example input and no criterion, and it rebuilds the
same structure on a freshly built model before a state dict loads.

Layer surgery lives here too: :class:`CPDBlockPruner` (a CPDBlock is pruned as
one unit) and :class:`ChannelMapPruner` (parameter-free channel re-mappers
such as option-A shortcuts), beside torch-pruning's own functions.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.plan import PlanOperation, register_operation

PRUNE_OP = "prune"
OUT, IN = "out", "in"  # which side of a layer an index list refers to


# ----------------------------------------------------------------- layer surgery
def _select(param: nn.Parameter, keep: Tensor, dim: int) -> nn.Parameter:
    """A new parameter holding ``param``'s entries ``keep`` along ``dim`` (gradient sliced too)."""
    keep = keep.to(param.device)
    pruned = nn.Parameter(param.data.index_select(dim, keep).contiguous(), requires_grad=param.requires_grad)
    if param.grad is not None:
        pruned.grad = param.grad.index_select(dim, keep)
    return pruned


def _kept(size: int, removed: Sequence[int]) -> Tensor:
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
        keep = _kept(n, idxs)  # (N',)
        # (R, 1) * N + (1, N') -> (R, N') -> (R*N',): rank-major, filter order kept
        inner = (torch.arange(r)[:, None] * n + keep[None, :]).flatten()
        pointwise, vertical, horizontal = layer.feature.pointwise, layer.feature.vertical, layer.feature.horizontal
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
        keep = _kept(layer.in_channels, idxs)
        pointwise = layer.feature.pointwise
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

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _kept(layer.out_channels, idxs)
        layer.set_channel_sources(layer.channel_sources.cpu()[keep], layer.in_channels)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _kept(layer.in_channels, idxs)
        renumber = torch.full((layer.in_channels + 1,), -1, dtype=torch.long)  # slot -1 (last) stays -1
        renumber[keep] = torch.arange(keep.numel())
        layer.set_channel_sources(renumber[layer.channel_sources.cpu()], keep.numel())
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


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


# ------------------------------------------------------------------ the record
class RemovalLog:
    """Removed channels per (layer, side) in the coordinates the layers had when the log started.

    Pruning in several steps (iterative schedules, concatenations pruned group by
    group) removes indices relative to the layer's current width; the log maps
    them back so one record describes the whole prune.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], Tensor] = {}  # original indices still present
        self._size: dict[tuple[str, str], int] = {}

    def remove(self, name: str, side: str, current_size: int, idxs: Sequence[int]) -> None:
        key = (name, side)
        if key not in self._kept:
            self._kept[key] = torch.arange(current_size)
            self._size[key] = current_size
        kept = self._kept[key]
        mask = torch.ones(kept.numel(), dtype=torch.bool)
        mask[torch.as_tensor(list(idxs), dtype=torch.long)] = False
        self._kept[key] = kept[mask]

    def removed(self, side: str) -> dict[str, list[int]]:
        """``{layer name: sorted removed original indices}`` for one side."""
        out = {}
        for (name, key_side), kept in self._kept.items():
            if key_side != side:
                continue
            removed = _kept(self._size[(name, side)], kept.tolist())  # complement of the kept ones
            if removed.numel():
                out[name] = removed.tolist()
        return out

    def record(self, **info: Any) -> dict[str, Any]:
        """The plain-data ``{"op": "prune", ...}`` record; ``info`` adds descriptive fields."""
        return {"op": PRUNE_OP, "removed": self.removed(OUT), "removed_inputs": self.removed(IN), **info}


def replay_prune(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Apply a ``{"op": "prune", ...}`` record to ``model`` in place (structure and slicing only).

    Every index is checked before anything changes, so a record that does not fit
    the model raises ``UserError`` and leaves it untouched. The record is
    appended to ``model.norton_plan``.
    """
    if not isinstance(record, Mapping) or record.get("op") != PRUNE_OP:
        raise UserError(f"not a prune record: {str(record)[:80]}")
    modules = dict(model.named_modules())
    work: list[tuple[nn.Module, str, list[int]]] = []
    for field, side in (("removed", OUT), ("removed_inputs", IN)):
        entries = record.get(field, {})
        if not isinstance(entries, Mapping):
            raise UserError(f"prune record field {field!r} must map layer names to index lists")
        for name, idxs in entries.items():
            module = modules.get(name)
            if module is None:
                raise UserError(f"prune record names layer {name!r}, which the model does not have")
            size = side_sizes(module).get(side)
            if size is None:
                kind = type(module).__name__
                raise UserError(f"prune record removes {side}put channels of {name!r}, a {kind} that has none")
            if not isinstance(idxs, Sequence) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs):
                raise UserError(f"prune record for {name!r} must list integer channel indices")
            bad = [i for i in idxs if not 0 <= i < size]
            if bad or len(set(idxs)) != len(idxs):
                what = f"index {bad[0]} outside [0, {size})" if bad else "repeated indices"
                raise UserError(f"prune record for {name!r} ({side}put channels) has {what}: it fits another model")
            if len(idxs) >= size:
                raise UserError(f"prune record removes all {size} {side}put channels of {name!r}")
            work.append((module, side, sorted(idxs)))
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    for module, side, idxs in work:
        pruner = layer_pruner(module)
        if idxs:
            (pruner.prune_out_channels if side == OUT else pruner.prune_in_channels)(module, idxs)
    for name, parameter in model.named_parameters():  # sliced parameters are new objects: keep them frozen
        if name in frozen:
            parameter.requires_grad_(False)
    plan = getattr(model, "norton_plan", None)
    if plan is None:
        plan = []
        model.norton_plan = plan
    plan.append(copy.deepcopy(dict(record)))  # the model's history must not change with the caller's dict
    return model


# Transitional registration (the pruning stage's owner replaces it with its own check/describe).
def _check_prune_record(record: Mapping[str, Any]) -> None:
    if not isinstance(record, Mapping) or record.get("op") != PRUNE_OP:
        raise UserError(f"not a prune record: {str(record)[:80]}")


def _describe_prune_record(record: Mapping[str, Any]) -> str:
    removed = record.get("removed", {})
    return f"prune {sum(len(v) for v in removed.values())} output channels in {len(removed)} layers"


def _example_prune(model: nn.Module, example_inputs: Tensor) -> nn.Module:
    from norton.pruning.engine import prune

    return prune(model, example_inputs, ratio=0.5)


register_operation(PlanOperation(
    name=PRUNE_OP, check=_check_prune_record, replay=replay_prune, describe=_describe_prune_record,
    example=_example_prune,
))
