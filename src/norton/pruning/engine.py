"""Structural pruning of any ``nn.Module`` over a dependency graph (torch-pruning's DepGraph).

``prune(model, example_inputs, ratio=0.5)`` removes output filters of CPDBlocks
and plain convolutions and slices every consumer: batch norms (statistics of
the kept channels are kept exactly), the next layers' input channels, linear
layers after a flatten, channels coupled by residual additions, concatenations
and depthwise convolutions. One code path serves every architecture:

1. trace the model once into a dependency graph; a CPDBlock is one node (its
   inner convs are not separate layers) pruned by :class:`~norton.pruning.plan.CPDBlockPruner`;
2. split the prunable channels into *coupled groups* (channels that must go
   together, e.g. every conv feeding one chain of residual additions);
3. decide how many channels each group keeps (``ratio``, the zoo's
   ``compress_rate`` or a global ``target_macs``);
4. score each group's channels with the criterion (mean over its layers of
   per-layer normalised rank scores) and remove the lowest, step by step;
5. write what was removed as a plain-data record (``model.norton_plan``) and
   replay it on the caller's model, which therefore changes only on success.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.pruning.criteria import filter_removal_order, get_criterion, importance_from_removal_order
from norton.pruning.plan import IN, OUT, RemovalLog, customized_pruners, replay_prune, side_sizes

Criterion = Callable[[nn.Module], Tensor]  # layer -> removal order (N,), first removed first
ExampleInputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
MACS_TOLERANCE = 0.02  # target_macs is met within this relative error

__all__ = ["CoupledGroup", "coupled_groups", "plan_prune", "prune", "replay_prune"]


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
class _Group:
    """A coupled group inside the engine: its root layer (for the graph) and its filter layers."""

    root: nn.Module
    layers: list[str]
    channels: int
    protected: str | None
    # (layer name, side, channels that side loses per channel the group removes)
    effects: list[tuple[str, str, float]] = field(default_factory=list)
    keep: int | None = None  # the final number of channels, once decided


# ------------------------------------------------------------------ public API
def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ratio: float | Mapping[str, float] | None = None,
    compress_rate: str | Sequence[float] | None = None,
    target_macs: float | None = None,
    criterion: str | Criterion = "pabs",
    ignored_layers: Iterable[str | nn.Module] = (),
    round_to: int | None = None,
    iterative_steps: int = 1,
    prune_linear: bool = False,
) -> nn.Module:
    """Remove filters of ``model`` in place and return it; ``model`` is unchanged if this raises.

    Say how much in exactly one way:

    * ``ratio``: a fraction of filters to remove from every prunable layer, or a
      mapping ``{layer name or fnmatch pattern: fraction}`` (other layers kept);
      a layer keeps ``int(N * (1 - ratio))`` filters, at least one;
    * ``compress_rate``: the paper's per-layer list (or ``"[0.6]*6+[0.8]*7"``) for a
      zoo model: every layer ends with the width ``create_model(name,
      compress_rate=...)`` gives it, so published configurations are reproduced;
    * ``target_macs``: the fraction of ``model``'s MACs (conv + linear) to keep,
      met within 2% by one uniform ratio found by bisection, then refined a
      channel at a time.

    Args:
        model: any module; CPDBlocks and ``nn.Conv2d`` (``groups == 1``) are pruned.
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors
            the model can run on (used to trace it and to measure MACs).
        criterion: a registered criterion name (:func:`norton.pruning.criteria.list_criteria`)
            or a callable ``(layer) -> removal order (N,)``.
        ignored_layers: names or modules whose output channels are kept (with
            their submodules). The layers producing the model's output are always kept.
        round_to: make every pruned width a multiple of this (e.g. 8 for tensor cores).
        iterative_steps: remove the channels in this many steps, re-scoring the
            remaining filters after each (a criterion comparing filters with each
            other then sees the survivors only).
        prune_linear: also remove hidden units of ``nn.Linear`` layers.

    The record :func:`plan_prune` returns is applied with :func:`replay_prune`,
    which appends it to ``model.norton_plan``.
    """
    record = plan_prune(
        model, example_inputs, ratio=ratio, compress_rate=compress_rate, target_macs=target_macs,
        criterion=criterion, ignored_layers=ignored_layers, round_to=round_to,
        iterative_steps=iterative_steps, prune_linear=prune_linear,
    )
    return replay_prune(model, record)


def check_round_to(round_to: int | None, compress_rate: Any) -> None:
    """``round_to`` is a positive int and is not combined with ``compress_rate`` (which fixes every width)."""
    if round_to is None:
        return
    _check_int(round_to, "round_to")
    if compress_rate is not None:
        raise UserError("round_to applies to ratio and target_macs; compress_rate fixes every width itself")


def plan_prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ratio: float | Mapping[str, float] | None = None,
    compress_rate: str | Sequence[float] | None = None,
    target_macs: float | None = None,
    criterion: str | Criterion = "pabs",
    ignored_layers: Iterable[str | nn.Module] = (),
    round_to: int | None = None,
    iterative_steps: int = 1,
    prune_linear: bool = False,
) -> dict[str, Any]:
    """The ``{"op": "prune", ...}`` record :func:`prune` would apply, without changing ``model``.

    Same arguments as :func:`prune`. The pruning runs on a deep copy; the record
    lists the removed channels of every affected layer (see :mod:`norton.pruning.plan`).
    """
    amount = _check_amount(ratio, compress_rate, target_macs)
    _check_int(iterative_steps, "iterative_steps")
    check_round_to(round_to, compress_rate)
    score = _resolve_criterion(criterion)
    work, graph, groups = _traced(model, example_inputs, ignored_layers, prune_linear)
    modules = dict(work.named_modules())

    if "ratio" in amount:
        _keep_from_ratio(groups, amount["ratio"], modules, round_to)
    elif "compress_rate" in amount:
        _keep_from_compress_rate(groups, model, amount["compress_rate"])
    else:
        _keep_from_target_macs(groups, _MacModel(work, example_inputs, groups), amount["target_macs"], round_to)

    log = RemovalLog()
    names = {module: name for name, module in modules.items()}
    for step in range(1, iterative_steps + 1):
        for group in groups:
            _prune_group(graph, group, step, iterative_steps, score, names, log)
    if "compress_rate" in amount:
        _check_matches_zoo(work, model, amount["compress_rate"])

    label = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", type(criterion).__name__)
    info: dict[str, Any] = {"criterion": label, "amount": {k: _plain(v) for k, v in amount.items()}}
    if iterative_steps > 1:
        info["iterative_steps"] = iterative_steps
    record = log.record(**info)
    order = {name: i for i, name in enumerate(modules)}
    for key in ("removed", "removed_inputs"):  # model order reads better than discovery order
        record[key] = dict(sorted(record[key].items(), key=lambda item: order[item[0]]))
    return record


def coupled_groups(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ignored_layers: Iterable[str | nn.Module] = (),
    prune_linear: bool = False,
) -> list[CoupledGroup]:
    """The coupled channel groups of ``model`` as :func:`prune` sees them (inspection only)."""
    _, _, groups = _traced(model, example_inputs, ignored_layers, prune_linear)
    return [CoupledGroup(tuple(g.layers), g.channels, g.protected) for g in groups]


def _traced(
    model: nn.Module, example_inputs: ExampleInputs, ignored_layers: Iterable[str | nn.Module], prune_linear: bool
) -> tuple[nn.Module, tp.DependencyGraph, list[_Group]]:
    """A working copy of ``model``, its dependency graph and its coupled groups."""
    ignored_names = _resolve_ignored(model, ignored_layers)
    work = _working_copy(model)
    graph = _build_graph(work, example_inputs)
    ignored = {m for name in ignored_names for m in work.get_submodule(name).modules()}
    return work, graph, _discover_groups(graph, work, ignored, prune_linear=prune_linear)


# ------------------------------------------------------------- argument checks
def _check_amount(ratio: Any, compress_rate: Any, target_macs: Any) -> dict[str, Any]:
    amounts = {"ratio": ratio, "compress_rate": compress_rate, "target_macs": target_macs}
    given = {key: value for key, value in amounts.items() if value is not None}
    if len(given) != 1:
        names = ", ".join(given) if given else "none"
        raise UserError(
            f"say how much to prune with exactly one of ratio=, compress_rate= or target_macs= (got {names})"
        )
    if "ratio" in given:
        ratios = given["ratio"].items() if isinstance(given["ratio"], Mapping) else [("ratio", given["ratio"])]
        for where, value in ratios:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                label = "ratio" if where == "ratio" else f"ratio for {where!r}"
                raise UserError(f"{label} must be a fraction of filters to remove in [0, 1), got {value!r}")
    if "target_macs" in given:
        value = given["target_macs"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise UserError(f"target_macs is the fraction of MACs to keep and must lie in (0, 1], got {value!r}")
    if "compress_rate" in given:
        from norton.compress_rate import parse_compress_rate

        parse_compress_rate(given["compress_rate"])  # a bad spec fails here, before any work
    return given


def _check_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _resolve_criterion(criterion: str | Criterion) -> Criterion:
    if callable(criterion):
        return criterion
    if not isinstance(criterion, str):
        raise UserError(f"criterion must be a name or a callable (layer) -> order, got {type(criterion).__name__}")
    return get_criterion(criterion)  # UserError naming the known criteria


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


def _plain(value: Any) -> Any:
    """JSON-friendly copy of an amount (mappings to dicts, sequences to lists)."""
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [float(v) for v in value]
    return value


# -------------------------------------------------------------------- tracing
def _working_copy(model: nn.Module) -> nn.Module:
    """A deep copy to plan and prune on; tracing needs gradients, so frozen parameters are unfrozen."""
    try:
        work = copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot work safely
        raise UserError(f"cannot copy the model to prune it safely: {type(error).__name__}: {error}") from None
    for parameter in work.parameters():
        parameter.requires_grad_(True)
    return work


def _call(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _build_graph(work: nn.Module, example_inputs: ExampleInputs) -> tp.DependencyGraph:
    """Trace ``work`` (eval mode, gradients on) into a dependency graph with norton's pruners."""
    outputs: list[Any] = []

    def forward(model: nn.Module, inputs: ExampleInputs) -> Any:
        outputs.append(_call(model, inputs))
        return outputs[-1]

    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                work,
                example_inputs=example_inputs,
                forward_fn=forward,
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
def _filter_layer(module: nn.Module, prune_linear: bool) -> bool:
    """Layers whose output channels are filters a criterion can rank."""
    if isinstance(module, CPDBlock):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return prune_linear and isinstance(module, nn.Linear)


def _side(graph: tp.DependencyGraph, dep: Any) -> str:
    pruner = graph.get_pruner_of_module(dep.target.module)
    return OUT if dep.handler == pruner.prune_out_channels else IN


def _discover_groups(
    graph: tp.DependencyGraph, work: nn.Module, ignored: set[nn.Module], *, prune_linear: bool
) -> list[_Group]:
    """Every coupled group with at least one filter layer, in model order, with why it is protected."""
    names = {module: name for name, module in work.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    root_types = (CPDBlock, nn.Conv2d, nn.Linear) if prune_linear else (CPDBlock, nn.Conv2d)
    groups = []
    for group in graph.get_all_groups(root_module_types=root_types):
        layers, protected, effects = [], None, []
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
            name, side = names[module], _side(graph, dep)
            if side == OUT and dep.target.grad_fn in graph.norton_output_grad_fns:
                protected = protected or "model output"
            if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
                protected = protected or f"grouped convolution {name}"
            if side == OUT and module in ignored:
                protected = protected or f"ignored: {name}"
            if side == OUT and _filter_layer(module, prune_linear):
                layers.append(name)
            effects.append((name, side, len(idxs) / channels))
        if not layers:
            continue
        layers.sort(key=order.__getitem__)
        groups.append(_Group(group[0].dep.target.module, layers, channels, protected, effects))
    groups.sort(key=lambda g: order[g.layers[0]])
    return groups


# ------------------------------------------------------------ how much to keep
def _kept_width(channels: int, ratio: float, round_to: int | None) -> int:
    keep = int(channels * (1.0 - ratio))  # the reference's truncation
    if round_to:
        keep = round_to * round(keep / round_to)
    return max(1, min(channels, keep if keep > 0 else (round_to or 1)))


def _keep_from_ratio(
    groups: list[_Group], ratio: float | Mapping[str, float], modules: Mapping[str, nn.Module], round_to: int | None
) -> None:
    if not isinstance(ratio, Mapping):
        for group in groups:
            group.keep = group.channels if group.protected else _kept_width(group.channels, float(ratio), round_to)
        return
    by_layer = {layer: group for group in groups for layer in group.layers}
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
        group.keep = _kept_width(group.channels, value, round_to) if value > 0 else group.channels


def _keep_from_compress_rate(groups: list[_Group], model: nn.Module, compress_rate: Any) -> None:
    """Each group keeps the width its layers have in the zoo's compressed model of the same name."""
    target = _zoo_model(model, compress_rate)
    widths = {name: _out_width(m) for name, m in target.named_modules() if _out_width(m) is not None}
    for group in groups:
        wanted = {}
        for name in group.layers:
            if name not in widths:
                raise UserError(
                    f"the compressed {model.norton_architecture['name']} has no layer {name!r}; "
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


def _check_matches_zoo(work: nn.Module, model: nn.Module, compress_rate: Any) -> None:
    """Every tensor the pruned model shares with the zoo's compressed model has its shape."""
    target = _zoo_model(model, compress_rate).state_dict()
    for key, tensor in work.state_dict().items():
        if key in target and target[key].shape != tensor.shape:
            raise UserError(
                f"compress_rate: after pruning {key} has shape {tuple(tensor.shape)} but the compressed zoo model "
                f"has {tuple(target[key].shape)}; this architecture's widths are not reachable by pruning"
            )


# ------------------------------------------------------------------ MAC model
class _MacModel:
    """MACs (conv + linear, per sample) as a function of how many channels each group removes.

    A conv or linear leaf (CPDBlock internals included) costs ``w * out * in_per_group``
    with ``w = output positions * kernel size``. Removing ``r_g`` channels of group
    ``g`` changes ``out`` and ``in_per_group`` linearly in ``r_g``, so with
    ``out = out0 + r @ d_out`` and ``inner = in0 + r @ d_in`` (``d_* (G, L)``)
    ``MACs(r) = sum_l w_l * out_l * inner_l``, evaluated for many ``r`` at once.
    """

    def __init__(self, work: nn.Module, example_inputs: ExampleInputs, groups: Sequence[_Group]) -> None:
        modules = dict(work.named_modules())
        leaves = self._leaves(work, example_inputs)  # name -> (w, out, in_per_group)
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
        leaves: dict[str, tuple[float, int, int]] = {}
        names = {module: name for name, module in work.named_modules()}

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 1:
                return
            batch = output.shape[0] if output.dim() > 1 else 1
            if isinstance(module, nn.Linear):
                positions = output.numel() / (batch * module.out_features)
                leaves[names[module]] = (positions, module.out_features, module.in_features)
            else:
                positions = output.numel() / (batch * module.out_channels) * math.prod(module.kernel_size)
                leaves[names[module]] = (positions, module.out_channels, module.in_channels // module.groups)

        kinds = (nn.modules.conv._ConvNd, nn.Linear)
        handles = [m.register_forward_hook(hook) for m in work.modules() if isinstance(m, kinds)]
        try:
            with torch.no_grad():
                _call(work, example_inputs)
        finally:
            for handle in handles:
                handle.remove()
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


def _keep_from_target_macs(groups: list[_Group], macs: _MacModel, target: float, round_to: int | None) -> None:
    """One uniform ratio by bisection, then step-by-step refinement, to land within 2% of the target."""
    full = torch.tensor([g.channels for g in groups], dtype=torch.float64)
    base = float(macs(full))
    goal = target * base

    def keeps(ratio: float) -> Tensor:
        widths = [g.channels if g.protected else _kept_width(g.channels, ratio, round_to) for g in groups]
        return torch.tensor(widths, dtype=torch.float64)

    smallest = float(macs(keeps(1.0)))
    if smallest > goal * (1 + MACS_TOLERANCE):
        raise UserError(
            f"target_macs={target} cannot be met: pruning every prunable layer to {round_to or 1} channel(s) "
            f"still leaves {smallest / base:.1%} of the MACs (protected and input/output layers are not pruned)"
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
            f"{achieved / base:.1%} of the MACs (too few channels for this precision)"
        )
    for group, kept in zip(groups, keep.tolist()):
        group.keep = int(kept)


def _refine(groups: Sequence[_Group], macs: _MacModel, keep: Tensor, goal: float, step: int) -> Tensor:
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


# ------------------------------------------------------------------- removal
def _prune_group(
    graph: tp.DependencyGraph, group: _Group, step: int, steps: int, score: Criterion,
    names: Mapping[nn.Module, str], log: RemovalLog,
) -> None:
    """Remove this step's share of ``group``'s channels: the lowest combined scores go first."""
    to_remove = group.channels - group.keep
    if to_remove <= 0:
        return
    keep_now = group.channels - round(to_remove * step / steps)
    pruner = graph.get_pruner_of_module(group.root)
    current = pruner.get_out_channels(group.root)
    if current <= keep_now:
        return
    # One graph walk with every channel: it gives the scores and, filtered, the removal.
    full = graph.get_pruning_group(group.root, pruner.prune_out_channels, list(range(current)))
    scores = _group_scores(graph, full, current, score, names)  # (current,)
    removed = torch.zeros(current, dtype=torch.bool)
    removed[torch.argsort(scores, stable=True)[: current - keep_now]] = True
    for item in full:  # in the walk's order, so concatenation offsets update as torch-pruning expects
        # item.idxs are this layer's channels, item.root_idxs the group channels they come from
        chosen = removed[torch.as_tensor(item.root_idxs, dtype=torch.long)]  # (len(item.idxs),)
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)[chosen].tolist()
        if not idxs:
            continue
        module = item.dep.target.module
        if module in names:
            side = _side(graph, item.dep)
            log.remove(names[module], side, side_sizes(module)[side], idxs)
        item.dep(idxs)


def _group_scores(
    graph: tp.DependencyGraph, full: Any, channels: int, score: Criterion, names: Mapping[nn.Module, str]
) -> Tensor:
    """Mean over the group's filter layers of each layer's normalised rank score, per group channel ``(C,)``."""
    total = torch.zeros(channels, dtype=torch.float64)
    count = torch.zeros(channels, dtype=torch.float64)
    for item in full:
        module = item.dep.target.module
        if module not in names or _side(graph, item.dep) != OUT or not _filter_layer(module, prune_linear=True):
            continue
        order = filter_removal_order(module, score)  # (N_layer,), checked to be a permutation
        # Rank scores in [0, 1] (1 = removed last) make layers comparable whatever the criterion's scale.
        own = importance_from_removal_order(order).double() / max(order.numel() - 1, 1)  # (N_layer,)
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)
        roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
        total.index_add_(0, roots, own[idxs])
        count.index_add_(0, roots, torch.ones(len(idxs), dtype=torch.float64))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, 0.5))
