"""Tracing and coupled groups: which channels of a model can only be removed together.

The model is traced once into torch-pruning's dependency graph (DepGraph), with
norton's pruners for CPDBlocks and channel re-mappers (:mod:`norton.pruning.surgery`),
so a CPDBlock is one node. Its groups are split into *coupled groups*: the output
channels of every filter layer feeding one chain of residual additions,
concatenations or depthwise convolutions, with every layer the removal touches.

Layer-level decomposed blocks (Tucker-2, layer-wise CP, SVD; :mod:`norton.decomposition.methods`)
are chains of plain convs and linears, so the graph sees their children. The block's
output channels (its last child's) and input channels (its first child's) are pruned as
any layer's; the *rank* channels between its children are protected: the rank is the
decomposition's decision (``decompose(rank=...)``), as a CPDBlock's is, so ``ratio`` and
``compress_rate`` keep meaning "this fraction of each layer's filters" and their lists stay
aligned with the zoo's layers. ``prune(prune_ranks=True)`` (a scalar ratio or ``target_macs``)
prunes them like any other group: removing a rank channel removes one term of the block's sum,
so its ranks shrink with its widths instead of keeping a core sized for the unpruned layer.

Tracing follows the path the example input takes through ``forward``. A model
whose forward branches on the data (``if x.sum() > 0``) would be pruned along that
path only; :func:`check_single_path` runs it on other inputs to catch this, and
:func:`check_pruned_runs` makes sure the pruned copy still runs on them.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.factorized import FactorizedConv
from norton.decomposition.low_rank_layers import LowRankLinear
from norton.errors import UserError
from norton.example_inputs import ExampleInputs, call_model
from norton.pruning.surgery import IN, OUT, customized_pruners


@dataclass(frozen=True)
class CoupledGroup:
    """Channels that can only be removed together.

    Attributes:
        layers: the filter layers (convs, CPDBlocks, linears) whose output channels
            the group holds, in model order; their scores are combined.
        channels: how many channels the group has now.
        protected: why the group is not pruned (``"model output"``, ``"ignored: fc"``,
            ...), or ``None`` when it is prunable.
    """

    layers: tuple[str, ...]
    channels: int
    protected: str | None = None


@dataclass
class Group:
    """A coupled group inside the engine: its root layer (for the graph) and its filter layers."""

    root: nn.Module
    layers: list[str]
    channels: int
    protected: str | None
    # (layer name, side, channels that side loses per channel the group removes)
    effects: list[tuple[str, str, float]] = field(default_factory=list)
    keep: int | None = None  # the final number of channels, once decided
    rank_channels: bool = False  # the rank channels of a decomposed block (prune_ranks=True frees them)


def coupled_groups(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ignored_layers: Iterable[str | nn.Module] = (),
    prune_linear: bool = False,
    detector_parts: Sequence[str] | None = None,
) -> list[CoupledGroup]:
    """The coupled channel groups of ``model`` as :func:`prune` sees them (inspection only)."""
    _, _, groups = traced(model, example_inputs, ignored_layers, prune_linear, detector_parts=detector_parts)
    return [CoupledGroup(tuple(g.layers), g.channels, g.protected) for g in groups]


def traced(
    model: nn.Module, example_inputs: ExampleInputs, ignored_layers: Iterable[str | nn.Module], prune_linear: bool,
    *, detector_parts: Sequence[str] | None = None, prune_ranks: bool = False,
) -> tuple[nn.Module, tp.DependencyGraph, list[Group]]:
    """A working copy of ``model``, its dependency graph and its coupled groups.

    A detector keeps the widths outside ``detector_parts`` (its body by default; :mod:`norton.detection.parts`).
    ``prune_ranks``: the rank channels of layer-level decomposed blocks are prunable groups too.
    """
    from norton.detection.parts import detector_scope

    ignored_layers, prune_linear = detector_scope(model, detector_parts, ignored_layers, prune_linear)
    ignored_names = _resolve_ignored(model, ignored_layers)
    work = _working_copy(model)
    graph = _build_graph(work, example_inputs)
    ignored = {m for name in ignored_names for m in work.get_submodule(name).modules()}
    return work, graph, _discover_groups(graph, work, ignored, prune_linear=prune_linear, prune_ranks=prune_ranks)


# -------------------------------------------------------------------- tracing
def _working_copy(model: nn.Module) -> nn.Module:
    """A deep copy to plan and prune on; tracing needs gradients, so frozen parameters are unfrozen."""
    try:
        work = copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot work safely
        raise UserError(f"cannot copy the model to prune it safely: {type(error).__name__}: {error}") from None
    for parameter in work.parameters():
        parameter.requires_grad_(True)
    # A block in a training form (optimize_for_training) runs one conv on a rebuilt kernel, which the
    # trace cannot see into: the copy computes as written (the same function); the model keeps its forms.
    from norton.deploy.forms import as_written

    as_written(work)
    return work


def _build_graph(work: nn.Module, example_inputs: ExampleInputs) -> tp.DependencyGraph:
    """Trace ``work`` (eval mode, gradients on) into a dependency graph with norton's pruners."""
    outputs: list[Any] = []

    def forward(model: nn.Module, inputs: ExampleInputs) -> Any:
        outputs.append(call_model(model, inputs))
        return outputs[-1]

    from norton.detection.parts import with_head_outputs

    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                work,
                example_inputs=example_inputs,
                forward_fn=with_head_outputs(work, forward),
                customized_pruners=customized_pruners(work),
                verbose=False,
            )
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - tracing runs arbitrary user code
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot trace the model with the example inputs ({type(error).__name__}: {message}); "
            "pass inputs it accepts, e.g. torch.randn(1, 3, 32, 32)"
        ) from None
    # The model's outputs, to protect the layers that produce them (their widths are the model's interface).
    graph.norton_output_grad_fns = {o.grad_fn for o in tp.utils.flatten_as_list(outputs[-1]) if isinstance(o, Tensor)}
    return graph


# --------------------------------------------------------------------- groups
def filter_layer(module: nn.Module, prune_linear: bool) -> bool:
    """Layers whose output channels are filters a criterion can rank."""
    if isinstance(module, CPDBlock):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return prune_linear and isinstance(module, nn.Linear)


def side_of(graph: tp.DependencyGraph, dep: Any) -> str:
    pruner = graph.get_pruner_of_module(dep.target.module)
    return OUT if dep.handler == pruner.prune_out_channels else IN


def _discover_groups(
    graph: tp.DependencyGraph, work: nn.Module, ignored: set[nn.Module], *, prune_linear: bool,
    prune_ranks: bool = False,
) -> list[Group]:
    """Every coupled group with at least one filter layer, in model order, with why it is protected."""
    names = {module: name for name, module in work.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    rank_layers = {} if prune_ranks else rank_channel_layers(work)
    root_types = (CPDBlock, nn.Conv2d, nn.Linear) if prune_linear else (CPDBlock, nn.Conv2d)
    groups = []
    for group in graph.get_all_groups(root_module_types=root_types):
        layers, protected, effects, ranks = [], None, [], False
        channels = len(group[0].idxs)
        for item in group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if dep.target.type == tp.ops.OPTYPE.OUTPUT:
                protected = protected or "model output"
                continue
            if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                protected = protected or "unwrapped nn.Parameter"
                continue
            if module not in names:
                continue  # an operation (add, concat, reshape): nothing to slice
            name, side = names[module], side_of(graph, dep)
            if side == OUT and dep.target.grad_fn in graph.norton_output_grad_fns:
                protected = protected or "model output"
            if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
                protected = protected or f"grouped convolution {name}"
            if side == OUT and module in ignored:
                protected = protected or f"ignored: {name}"
            if side == OUT and name in rank_layers:
                protected = protected or f"rank channels of {rank_layers[name]} (set by its decomposition)"
                ranks = True
            if side == OUT and filter_layer(module, prune_linear):
                layers.append(name)
            effects.append((name, side, len(idxs) / channels))
        if not layers:
            continue
        layers.sort(key=order.__getitem__)
        groups.append(Group(group[0].dep.target.module, layers, channels, protected, effects, rank_channels=ranks))
    groups.sort(key=lambda g: order[g.layers[0]])
    return groups



def rank_channel_layers(model: nn.Module) -> dict[str, str]:
    """``{child name: block name}`` for the children of layer-level decomposed blocks whose outputs are rank channels.

    Every child but the block's last one (which produces the block's output).
    """
    inner = {}
    for name, module in model.named_modules():
        if isinstance(module, (FactorizedConv, LowRankLinear)):
            children = list(module.named_children())
            for child, _ in children[:-1]:
                inner[f"{name}.{child}" if name else child] = name
    return inner


def block_output_layers(model: nn.Module) -> dict[str, str]:
    """``{last child name: block name}`` of layer-level decomposed blocks: the child that holds the block's filters."""
    outputs = {}
    for name, module in model.named_modules():
        if isinstance(module, (FactorizedConv, LowRankLinear)):
            child = list(module.named_children())[-1][0]
            outputs[f"{name}.{child}" if name else child] = name
    return outputs


def _resolve_ignored(model: nn.Module, ignored_layers: Iterable[str | nn.Module]) -> list[str]:
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    modules = dict(model.named_modules())
    names_of = {module: name for name, module in modules.items()}
    names = []
    for item in ignored_layers:
        if isinstance(item, nn.Module):
            if item not in names_of:
                raise UserError(f"ignored_layers holds a {type(item).__name__} that is not part of the model")
            names.append(names_of[item])
        elif isinstance(item, str):
            if item not in modules:
                raise UserError(f"ignored_layers names {item!r}, which the model does not have")
            names.append(item)
        else:
            raise UserError(f"ignored_layers must hold layer names or modules, got {type(item).__name__}")
    return names




# ------------------------------------------------------------ one path only
def _probe_inputs(example_inputs: ExampleInputs) -> list[ExampleInputs]:
    """Other inputs of the example's shapes: the negated example and a seeded random draw.

    Only floating-point tensors change (integer inputs such as token ids stay), so
    a model that accepts the example accepts these.
    """
    generator = torch.Generator().manual_seed(0)

    def negated(value: Any) -> Any:
        return -value if isinstance(value, Tensor) and value.is_floating_point() else value

    def drawn(value: Any) -> Any:
        if not isinstance(value, Tensor) or not value.is_floating_point():
            return value
        return torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)

    probes: list[ExampleInputs] = []
    for change in (negated, drawn):
        if isinstance(example_inputs, Mapping):
            probes.append({key: change(value) for key, value in example_inputs.items()})
        elif isinstance(example_inputs, (tuple, list)):
            probes.append(type(example_inputs)(change(value) for value in example_inputs))
        else:
            probes.append(change(example_inputs))
    return probes


def modules_run(model: nn.Module, example_inputs: ExampleInputs) -> frozenset[str] | None:
    """Names of the modules ``model`` runs on ``example_inputs`` (eval, no grad); ``None`` if it fails."""
    ran: set[str] = set()
    handles = [
        module.register_forward_hook(lambda *_, name=name: ran.add(name))
        for name, module in model.named_modules()
    ]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception:  # noqa: BLE001 - any failure on another input is what the caller looks for
        return None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return frozenset(ran)


_ONE_PATH = (
    "the model's forward depends on the data (an if on the input or a loop whose length it sets): "
    "pruning traced only the path the example input takes, so "
)


def check_single_path(model: nn.Module, example_inputs: ExampleInputs) -> list[ExampleInputs]:
    """``UserError`` if ``model`` runs other modules on other inputs than on the example.

    Returns the probe inputs the model accepts, for :func:`check_pruned_runs` after pruning.
    """
    expected = modules_run(model, example_inputs)
    accepted: list[ExampleInputs] = []
    if expected is None:
        return accepted  # tracing ran it; a failure here (eval mode) leaves nothing to compare
    for probe in _probe_inputs(example_inputs):
        ran = modules_run(model, probe)
        if ran is None:
            continue  # the model does not accept this input (say, log of a negative): nothing to compare
        if ran != expected:
            differs = sorted(ran ^ expected)
            raise UserError(
                _ONE_PATH + f"other inputs run other modules (e.g. {differs[0]!r}); make forward take one path "
                "for every input before pruning"
            )
        accepted.append(probe)
    return accepted


def check_pruned_runs(model: nn.Module, example_inputs: ExampleInputs, probes: Sequence[ExampleInputs]) -> None:
    """``UserError`` if the pruned ``model`` fails, or takes another path, on an input the unpruned one ran."""
    expected = modules_run(model, example_inputs)
    if expected is None:
        raise UserError("the pruned model no longer runs on the example input; please report this model")
    for probe in probes:
        ran = modules_run(model, probe)
        if ran != expected:
            raise UserError(
                _ONE_PATH + "the pruned model fails (or runs other modules) on another input of the same shape; "
                "make forward take one path for every input before pruning"
            )
