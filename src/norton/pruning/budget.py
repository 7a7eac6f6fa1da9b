"""How many channels each coupled group keeps: ``ratio``, ``compress_rate`` or ``target_macs``.

Every function here fills ``group.keep`` for the groups :mod:`norton.pruning.groups`
found; nothing is removed yet. ``target_macs`` is a fraction of the *original*
model's MACs (the model before its first norton operation, see
:func:`norton.plan.original_model`), counted by :func:`norton.complexity.count_complexity`
(conv + linear) on the same example inputs. :class:`MacModel` predicts the MACs of
any set of kept widths from one per-layer count, so the search never re-runs the model.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from norton.complexity import count_complexity, original_complexity
from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.example_inputs import ExampleInputs
from norton.pruning.groups import Group, block_output_layers, rank_channel_layers
from norton.pruning.surgery import IN, OUT

MACS_TOLERANCE = 0.02  # target_macs is met within this relative error


# ------------------------------------------------------------------ round_to
def _narrower_than_round_to(layer: str, channels: int, round_to: int) -> UserError:
    return UserError(
        f"round_to={round_to} is larger than layer {layer!r}, which has {channels} channels: use a round_to "
        f"of at most {channels}, or leave that layer out (ignored_layers or a ratio mapping)"
    )


def check_round_to_widths(groups: Sequence[Group], round_to: int | None) -> None:
    """``UserError`` naming the first prunable group narrower than ``round_to``.

    Such a group could only keep all its channels (a multiple of ``round_to`` below its
    width is 0), so the prune would silently leave it whole.
    """
    for group in groups:
        if round_to and not group.protected and group.channels < round_to:
            raise _narrower_than_round_to(group.layers[0], group.channels, round_to)


# ------------------------------------------------------------ ratio and compress_rate
def kept_width(channels: int, ratio: float, round_to: int | None, layer: str = "?") -> int:
    """Channels a layer of ``channels`` keeps when ``ratio`` of them go, as a multiple of ``round_to``."""
    if round_to and ratio > 0 and channels < round_to:
        raise _narrower_than_round_to(layer, channels, round_to)
    keep = int(channels * (1.0 - ratio))  # the reference's truncation
    if round_to:
        keep = round_to * round(keep / round_to)
    return max(1, min(channels, keep if keep > 0 else (round_to or 1)))


def keep_from_ratio(
    groups: list[Group], ratio: float | Mapping[str, float], modules: Mapping[str, nn.Module], round_to: int | None
) -> None:
    if not isinstance(ratio, Mapping):
        for group in groups:
            group.keep = (
                group.channels if group.protected
                else kept_width(group.channels, float(ratio), round_to, group.layers[0])
            )
        return
    root = modules.get("")
    # A decomposed block answers to its own name too (its filters are its last child's); its
    # rank channels are no layer a ratio names, so patterns such as "layer1.*" skip them.
    rank_layers = rank_channel_layers(root) if root is not None else {}
    by_layer = {layer: group for group in groups for layer in group.layers if layer not in rank_layers}
    outputs = block_output_layers(root) if root is not None else {}
    by_layer.update({block: by_layer[child] for child, block in outputs.items() if child in by_layer})
    wanted: dict[int, tuple[str, float]] = {}
    for pattern, value in ratio.items():
        matched = [name for name in by_layer if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            if pattern in modules:
                raise UserError(f"ratio names {pattern!r}, which is not a prunable layer (convs and CPDBlocks are)")
            raise UserError(f"ratio names {pattern!r}, which matches no layer of the model")
        for name in matched:
            group = by_layer[name]
            if group.protected and value > 0:
                raise UserError(f"ratio asks to prune {name!r}, whose channels are protected ({group.protected})")
            previous = wanted.get(id(group))
            if previous is not None and previous[1] != value:
                raise UserError(
                    f"ratio gives {previous[0]!r} {previous[1]} and {name!r} {value}, but their channels are "
                    "coupled (residual addition or shared input); give coupled layers the same ratio"
                )
            wanted[id(group)] = (name, float(value))
    for group in groups:
        value = wanted.get(id(group), (None, 0.0))[1]
        group.keep = kept_width(group.channels, value, round_to, group.layers[0]) if value > 0 else group.channels


def keep_from_compress_rate(groups: list[Group], model: nn.Module, compress_rate: Any) -> None:
    """Each group keeps the width its layers have in the zoo's compressed model of the same name."""
    target = _zoo_model(model, compress_rate)
    widths: dict[str, int] = {}
    for name, module in target.named_modules():
        width = _out_width(module)
        if width is not None:
            widths[name] = width
    zoo_name = getattr(model, "norton_architecture", {}).get("name")
    blocks = block_output_layers(model)  # a decomposed block's filters are its last child's
    rank_layers = rank_channel_layers(model)  # its rank channels are no zoo layer: they stay
    for group in groups:
        if all(layer in rank_layers for layer in group.layers):
            group.keep = group.channels
            continue
        wanted: dict[str, int] = {}
        for layer in group.layers:
            name = blocks.get(layer, layer)
            if name not in widths:
                raise UserError(
                    f"the compressed {zoo_name} has no layer {name!r}; "
                    "compress_rate reproduces zoo architectures, so prune the model create_model built"
                )
            wanted[name] = widths[name]
        narrow, wide = min(wanted, key=wanted.__getitem__), max(wanted, key=wanted.__getitem__)
        if wanted[narrow] != wanted[wide]:
            raise UserError(
                f"compress_rate gives coupled layers {narrow!r} {wanted[narrow]} and {wide!r} {wanted[wide]} "
                "channels; coupled channels (residual additions) can only be removed together"
            )
        keep = wanted[narrow]
        if keep > group.channels:
            raise UserError(
                f"compress_rate keeps {keep} channels of {group.layers[0]!r}, which has only {group.channels}; "
                "prune the uncompressed model"
            )
        if keep < group.channels and group.protected:
            raise UserError(
                f"compress_rate prunes {group.layers[0]!r}, whose channels are protected: {group.protected}"
            )
        group.keep = keep


def _zoo_model(model: nn.Module, compress_rate: Any) -> nn.Module:
    architecture = getattr(model, "norton_architecture", None)
    if not isinstance(architecture, Mapping) or "name" not in architecture:
        raise UserError(
            "compress_rate needs a zoo model built with norton.models.create_model (it reads "
            "model.norton_architecture); use ratio= or target_macs= for other models"
        )
    from norton.models import create_model

    kwargs = dict(architecture.get("kwargs", {}))
    kwargs["compress_rate"] = compress_rate
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return create_model(architecture["name"], **kwargs)


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, (CPDBlock, nn.modules.conv._ConvNd)):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def check_matches_zoo(work: nn.Module, model: nn.Module, compress_rate: Any) -> None:
    """Every tensor the pruned model shares with the zoo's compressed model has its shape."""
    target = _zoo_model(model, compress_rate).state_dict()
    for key, tensor in work.state_dict().items():
        if key in target and target[key].shape != tensor.shape:
            raise UserError(
                f"compress_rate: after pruning {key} has shape {tuple(tensor.shape)} but the compressed zoo model "
                f"has {tuple(target[key].shape)}; this architecture's widths are not reachable by pruning"
            )


# ------------------------------------------------------------------ MAC model
class MacModel:
    """MACs (conv + linear, per sample) as a function of how many channels each group keeps.

    A conv or linear leaf (CPDBlock internals included) costs ``w * out * in_per_group``;
    ``w`` (output positions times kernel size) comes from one per-layer count of
    :func:`norton.complexity.count_complexity`. Removing ``r_g`` channels of group ``g``
    changes ``out`` and ``in_per_group`` linearly in ``r_g``, so with
    ``out = out0 + r @ d_out`` and ``inner = in0 + r @ d_in`` (``d_* (G, L)``)
    ``MACs(r) = sum_l w_l * out_l * inner_l``, evaluated for many ``r`` at once.
    """

    def __init__(self, work: nn.Module, example_inputs: ExampleInputs, groups: Sequence[Group], *,
                 include: Callable[[str], bool] | None = None) -> None:
        """``include(name)``: which leaves count (all by default; a detector's compressed parts)."""
        modules = dict(work.named_modules())
        leaves = self._leaves(work, example_inputs)  # name -> (w, out, in_per_group)
        if include is not None:
            leaves = {name: value for name, value in leaves.items() if include(name)}
        self.leaf_names = list(leaves)  # (L,): the conv / linear leaves, in the order of every (..., L) tensor
        index = {name: i for i, name in enumerate(leaves)}
        self.weight = torch.tensor([v[0] for v in leaves.values()], dtype=torch.float64)  # (L,)
        self.out0 = torch.tensor([v[1] for v in leaves.values()], dtype=torch.float64)  # (L,)
        self.in0 = torch.tensor([v[2] for v in leaves.values()], dtype=torch.float64)  # (L,)
        self.d_out = torch.zeros(len(groups), len(leaves), dtype=torch.float64)  # (G, L)
        self.d_in = torch.zeros(len(groups), len(leaves), dtype=torch.float64)  # (G, L)
        for g, group in enumerate(groups):
            for name, side, fraction in group.effects:
                for leaf, d_out, d_in in _leaf_changes(name, side, modules[name]):
                    if leaf in index:
                        self.d_out[g, index[leaf]] += fraction * d_out
                        self.d_in[g, index[leaf]] += fraction * d_in
        self.channels = torch.tensor([g.channels for g in groups], dtype=torch.float64)  # (G,)

    @staticmethod
    def _leaves(work: nn.Module, example_inputs: ExampleInputs) -> dict[str, tuple[float, int, int]]:
        """Per conv/linear leaf that ran: ``(w, out, in_per_group)`` with ``MACs = w * out * in_per_group``."""
        modules = dict(work.named_modules())
        counted = count_complexity(work, example_inputs=example_inputs, per_layer=True)
        leaves: dict[str, tuple[float, int, int]] = {}
        for row in counted.layers:
            module = modules[row.name]
            if isinstance(module, nn.Linear):
                out, inner = module.out_features, module.in_features
            elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
                out, inner = module.out_channels, module.in_channels // module.groups
            else:
                continue  # a row for parameters only (norms), or a layer pruning never resizes
            if row.macs and out * inner:
                leaves[row.name] = (row.macs / (out * inner), out, inner)
        return leaves

    def __call__(self, keep: Tensor) -> Tensor:
        """MACs for kept widths ``keep (..., G)`` -> ``(...)``."""
        removed = self.channels - keep.to(torch.float64)  # (..., G)
        out = self.out0 + removed @ self.d_out  # (..., L)
        inner = self.in0 + removed @ self.d_in  # (..., L)
        return (self.weight * out * inner).sum(-1)


def _leaf_changes(name: str, side: str, module: nn.Module) -> list[tuple[str, float, float]]:
    """Per removed channel of ``module``'s ``side``: (leaf, change of out, change of in_per_group)."""
    if isinstance(module, CPDBlock):
        if side == IN:
            return [(f"{name}.feature.pointwise", 0.0, -1.0)]
        r = float(module.rank)  # R intermediate channels per filter, in all three convs
        return [(f"{name}.feature.{conv}", -r, 0.0) for conv in ("pointwise", "vertical", "horizontal")]
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return [(name, -1.0, 0.0)] if side == OUT else []  # depthwise: in_per_group stays 1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return [(name, -1.0, 0.0)] if side == OUT else [(name, 0.0, -1.0)]
    return []


def keep_from_target_macs(
    groups: list[Group], macs: MacModel, target: float, round_to: int | None, *,
    model: nn.Module, example_inputs: ExampleInputs, original: int | None = None,
) -> None:
    """Keep ``target`` of the original model's MACs: one uniform ratio by bisection, then refined, within 2%.

    ``original``: the MACs ``target`` is a fraction of (default the original model's; a detector's parts').
    """
    full = torch.tensor([g.channels for g in groups], dtype=torch.float64)
    current = float(macs(full))
    if original is None:
        original = original_complexity(model, example_inputs=example_inputs).macs
    if not original:
        raise UserError("target_macs needs a model with convolutions or linear layers (its original has 0 MACs)")
    goal = target * original
    if current <= goal:
        raise UserError(
            f"the model is already at {current / original:.1%} of the original's MACs, at or under "
            f"target_macs={target} (a fraction of the model before its first norton operation): nothing to prune"
        )

    def keeps(ratio: float) -> Tensor:
        widths = [g.channels if g.protected else kept_width(g.channels, ratio, round_to) for g in groups]
        return torch.tensor(widths, dtype=torch.float64)

    smallest = float(macs(keeps(1.0)))
    if smallest > goal * (1 + MACS_TOLERANCE):
        ranks = any(g.rank_channels for g in groups)
        raise UserError(
            f"target_macs={target} cannot be met: pruning every prunable layer to {round_to or 1} channel(s) "
            f"still leaves {smallest / original:.1%} of the original's MACs (protected and input/output layers "
            "are not pruned" + ("; prune_ranks=True (--prune-ranks) prunes the decomposed blocks' ranks too)"
                                if ranks else ")")
        )
    lo, hi = 0.0, 1.0  # macs(keeps(lo)) >= goal >= macs(keeps(hi))
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(macs(keeps(mid))) > goal else (lo, mid)
    keep = min((keeps(lo), keeps(hi)), key=lambda k: abs(float(macs(k)) - goal))
    keep = _refine(groups, macs, keep, goal, round_to or 1)
    achieved = float(macs(keep))
    if abs(achieved - goal) > MACS_TOLERANCE * goal:
        raise UserError(
            f"target_macs={target} cannot be met within {MACS_TOLERANCE:.0%}: the closest widths keep "
            f"{achieved / original:.1%} of the original's MACs (too few channels for this precision)"
        )
    for group, kept in zip(groups, keep.tolist(), strict=True):
        group.keep = int(kept)


def _refine(groups: Sequence[Group], macs: MacModel, keep: Tensor, goal: float, step: int) -> Tensor:
    """Greedily move one group by ``step`` channels at a time while that brings the MACs closer to ``goal``."""
    prunable = torch.tensor([g.protected is None for g in groups])  # (G,)
    full = torch.tensor([g.channels for g in groups], dtype=torch.float64)  # (G,)
    current = float(macs(keep))
    for _ in range(int(full.sum())):  # each round changes one group by one step, so this bounds the loop
        direction = -step if current > goal else step
        trials = keep + direction * torch.eye(len(groups), dtype=torch.float64)  # (G, G): row i moves group i
        valid = prunable & (trials.diagonal() >= 1) & (trials.diagonal() <= full)
        gaps = (macs(trials) - goal).abs().masked_fill(~valid, math.inf)  # (G,)
        best = int(gaps.argmin())
        if not gaps[best] < abs(current - goal):
            break
        keep, current = trials[best], float(macs(trials[best]))
    return keep
