"""Model-level decomposition: replace the layers of any ``nn.Module`` by decomposed blocks.

``decompose(model, rank, method=...)`` walks the model, picks every layer the method
takes (for ``"cp-filter"``, the default: every ``nn.Conv2d`` with ``groups == 1`` and a
kernel larger than 1x1), decomposes it and swaps in the method's block
(:mod:`norton.decomposition.methods`: CPDBlock, Tucker2Conv, LayerCPConv, the SVD layers).
What was done is appended to ``model.norton_plan`` as plain data,
``{"op": "decompose", "method": m, "ranks": {name: rank}}`` (``[R1, R2]`` for Tucker-2;
``cp-filter`` records carry no ``"method"``, as they did before the other methods), so
:func:`replay_decompose` can rebuild the same structure in a fresh process before a
state dict loads.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.complexity import cpd_block_macs
from norton.decomposition.cpd_block import CPDBlock, check_decomposable
from norton.decomposition.factorized import chain_macs
from norton.decomposition.low_rank_layers import LowRankLinear
from norton.decomposition.methods import (
    DEFAULT_METHOD,
    SPEC_KINDS,
    DecompositionMethod,
    Rank,
    get_method,
    is_block,
    layer_macs,
)
from norton.detection.parts import layers_in_parts
from norton.errors import RankAboveLayerError, UserError
from norton.example_inputs import module_input_shapes
from norton.limits import MAX_RANK, check_int
from norton.plan import PlanOperation, append_record, record_original, register_operation

RankRule = Callable[[str, nn.Module], "Rank | None"]
# An int (a pair for tucker2), a mapping {layer: rank}, a spec string ("vbmf", "energy:0.9",
# "macs:0.5"), a MaxError or a rule (see decompose).
RankSpec = int | tuple[int, int] | str | Mapping[str, Any] | RankRule


@dataclass(frozen=True)
class MaxError:
    """Rank rule: per layer, the smallest rank whose mean relative filter error is ``<= max_error``.

    Ranks ``1 .. max_rank`` are searched by bisection (the error falls with the
    rank). A layer that misses the threshold even at ``max_rank`` is left dense:
    a dense layer is exact, and at ``R >= k_h * k_w`` a CPDBlock costs more MACs
    than the convolution it replaces. ``max_rank=None`` means ``k_h * k_w - 1``.
    """

    max_error: float
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.max_error < 1:
            raise UserError(f"MaxError.max_error must lie in (0, 1), got {self.max_error!r}")
        if self.max_rank is not None and self.max_rank < 1:
            raise UserError(f"MaxError.max_rank must be a positive integer, got {self.max_rank!r}")


@dataclass
class LayerDecomposition:
    """One row of the decomposition report."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]  # () for an nn.Linear
    rank: int | tuple[int, int] | None  # None: left dense (rule not met); (R1, R2) for Tucker-2
    mean_error: float
    max_error: float
    macs_before: int | None  # None when no example input was given
    macs_after: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def eligible_convs(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    min_kernel_elements: int = 2,
    method: str = DEFAULT_METHOD,
) -> dict[str, nn.Module]:
    """The layers :func:`decompose` would replace with ``method``, by qualified name.

    Eligible: what the method takes (:mod:`norton.decomposition.methods`; for the conv
    methods an ``nn.Conv2d`` with ``groups == 1`` and ``k_h * k_w >= min_kernel_elements``),
    not already inside a decomposed block. ``include``/``exclude`` are qualified names or
    ``fnmatch`` patterns (``"layer1.*"``); an ``include`` entry that matches no
    eligible layer is an error, so typos do not pass silently.
    """
    spec = get_method(method)
    inside_blocks = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if is_block(module)
        for child, _ in module.named_modules()
    }
    candidates = {
        name: module
        for name, module in model.named_modules()
        if name not in inside_blocks and spec.eligible(module)
        and (not isinstance(module, nn.Conv2d) or method == "svd"
             or module.kernel_size[0] * module.kernel_size[1] >= min_kernel_elements)
    }
    _check_patterns(include or (), candidates, "include")
    _check_patterns(exclude, dict(model.named_modules()), "exclude")
    selected = {}
    for name, module in candidates.items():
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        selected[name] = module
    return selected


def decompose(
    model: nn.Module,
    rank: RankSpec,
    *,
    method: str = DEFAULT_METHOD,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    seed: int | None = 0,
    progress: bool = True,
    return_report: bool = False,
    detector_parts: Sequence[str] | None = None,
) -> nn.Module | tuple[nn.Module, list[LayerDecomposition]]:
    """Replace, in place, every eligible layer of ``model`` by a block of ``method``.

    Args:
        model: any module; it is modified in place and returned.
        rank: one int for every layer (a pair ``(R1, R2)`` for ``tucker2``); a mapping
            ``{qualified_name: rank}`` (only those layers are decomposed); a spec string
            ``"vbmf"``, ``"energy:0.9"`` or ``"macs:0.5"`` (chosen per layer, see
            :mod:`norton.decomposition.methods`; ``macs`` needs ``example_inputs``); a
            :class:`MaxError` rule (``cp-filter`` only); or a callable ``(name, layer) -> rank | None``
            (``None`` leaves the layer dense).
        method: ``"cp-filter"`` (NORTON's CPDBlock, default), ``"tucker2"``, ``"cp-layer"`` or ``"svd"``.
        include, exclude: qualified names or ``fnmatch`` patterns restricting the layers.
        example_inputs: when given, the report carries each layer's MACs before and after.
        n_iter_max, tol, init, seed: passed to the iterative algorithms (CP-ALS, HOOI).
        progress: show a progress bar over layers.
        return_report: also return the per-layer :class:`LayerDecomposition` rows.
        detector_parts: for a torchvision detector, the parts whose layers are decomposed:
            ``("body",)`` by default, any of ``"body", "fpn", "rpn", "box_head", "mask_head",
            "keypoint_head"`` (:mod:`norton.detection.parts`; the box head's fc6/fc7 take ``method="svd"``).

    Every rank is chosen and checked before any layer changes: a bad rank, method or
    spec raises a one-line ``UserError`` and leaves ``model`` as it was.
    """
    spec = get_method(method)
    chooser = _rank_chooser(rank, spec)
    layers = eligible_convs(model, include=include, exclude=exclude, method=method)
    layers = layers_in_parts(model, layers, detector_parts, method)  # a detector: its body unless asked
    if isinstance(chooser, Mapping):
        unknown = sorted(set(chooser) - set(layers))
        if unknown:
            raise UserError(
                f"rank mapping names {unknown[0]!r}, which is not a layer {method} can decompose in the model "
                f"(eligible: {', '.join(list(layers)[:5])}{', ...' if len(layers) > 5 else ''})"
            )
        layers = {name: layer for name, layer in layers.items() if name in chooser}
    wants_macs = isinstance(chooser, tuple) and chooser[0] == "macs"
    if wants_macs and example_inputs is None and any(isinstance(m, nn.Conv2d) for m in layers.values()):
        raise UserError(f"rank {rank!r} needs example_inputs: a layer's MACs depend on its input size")
    input_shapes = (
        module_input_shapes(model, layers, example_inputs, eval_mode=True) if example_inputs is not None else {}
    )
    # Ranks first (a MaxError rule chooses by running CP-ALS, within bounds); layers are
    # swapped only at the end, so a mistake or an interruption leaves the model as it was.
    chosen_ranks: dict[str, Rank | None] = {}
    if not isinstance(chooser, MaxError):
        for name, layer in layers.items():
            check_decomposable_layer(layer, name)
            chosen_ranks[name] = _choose(chooser, spec, name, layer, input_shapes.get(name))
    record_original(model)
    options = {"n_iter_max": n_iter_max, "tol": tol, "init": init, "seed": seed}

    report: list[LayerDecomposition] = []
    ranks: dict[str, Any] = {}
    blocks: dict[str, nn.Module] = {}
    bar = tqdm(layers.items(), desc=f"decompose ({method})", unit="layer", disable=not progress, leave=False)
    for name, layer in bar:
        bar.set_postfix_str(name)
        shape = input_shapes.get(name)
        macs_before = None if shape is None else layer_macs(layer, shape[-2:])
        if isinstance(chooser, MaxError):
            chosen, block, errors = _smallest_rank_meeting(layer, chooser, options)
        else:
            chosen, block, errors = chosen_ranks[name], None, None
        if chosen is None:
            report.append(_row(name, layer, None, torch.zeros(1), macs_before, macs_before))
            continue
        if block is None:
            block, errors = spec.build(layer, chosen, options)
        assert errors is not None
        block.train(layer.training)
        blocks[name] = block
        ranks[name] = spec.record_rank(chosen)
        after = None if shape is None else _block_macs(block, shape)
        report.append(_row(name, layer, chosen, errors, macs_before, after))

    for name, block in blocks.items():
        _set_submodule(model, name, block)
    if ranks:
        append_record(model, _record(method, ranks))
    return (model, report) if return_report else model


def replay_decompose(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Rebuild the structure of a ``{"op": "decompose", "method": ..., "ranks": {...}}`` record on ``model``.

    No decomposition runs: the blocks are freshly initialised and expect a state dict
    to be loaded next. A record without ``"method"`` is a ``cp-filter`` one (files
    written before the other methods existed). The record is appended to ``model.norton_plan``.
    """
    check_decompose_record(record)
    method = record.get("method", DEFAULT_METHOD)
    spec = get_method(method)
    modules = dict(model.named_modules())
    ranks: dict[str, Rank] = {}
    for name, rank in record["ranks"].items():  # every layer checked before the model changes
        layer = modules.get(name)
        if layer is None:
            raise UserError(f"decomposition record names layer {name!r}, which the model does not have")
        if not spec.eligible(layer):
            raise UserError(f"decomposition record decomposes {name!r} with {method}, but the model has a "
                            f"{type(layer).__name__} there that {method} does not take")
        check_decomposable_layer(layer, name)
        ranks[name] = spec.check_rank(rank, layer, f"rank of layer {name!r}")
    record_original(model)
    for name, rank in ranks.items():
        _set_submodule(model, name, spec.empty(modules[name], rank))
    append_record(model, _record(method, {name: spec.record_rank(rank) for name, rank in ranks.items()}))
    return model


def _decompose_in_place(model: nn.Module, rank: int) -> nn.Module:
    decompose(model, rank, progress=False)
    return model


def check_decompose_record(record: Mapping[str, Any]) -> None:
    """``{"op": "decompose", ["method": m,] "ranks": {layer name: rank}}`` with ranks in ``[1, MAX_RANK]``.

    Tucker-2 ranks may be pairs ``[R1, R2]``; the others are ints.
    """
    if not isinstance(record, Mapping) or record.get("op") != "decompose":
        raise UserError(f"not a decomposition record: {str(record)[:80]}")
    method = record.get("method", DEFAULT_METHOD)
    get_method(method)
    ranks = record.get("ranks")
    if not isinstance(ranks, Mapping) or not ranks:
        raise UserError("a decomposition record needs 'ranks': {layer name: rank}")
    for name, rank in ranks.items():
        if not isinstance(name, str):
            raise UserError(f"decomposition record: layer names must be strings, got {name!r}")
        values = rank if method == "tucker2" and isinstance(rank, (list, tuple)) and len(rank) == 2 else [rank]
        for value in values:
            check_int(value, f"rank of layer {name!r}", minimum=1, maximum=MAX_RANK)


def describe_decompose_record(record: Mapping[str, Any]) -> str:
    """``decompose 19 layers with cp-filter (rank 3 x19)``; Tucker-2 pairs read ``rank 8x4``."""
    counts = Counter(_rank_text(rank) for rank in record["ranks"].values())
    ranks = ", ".join(f"rank {rank} x{count}" for rank, count in sorted(counts.items(), key=lambda item: -item[1]))
    return f"decompose {len(record['ranks'])} layers with {record.get('method', DEFAULT_METHOD)} ({ranks})"


register_operation(PlanOperation(
    name="decompose",
    check=check_decompose_record,
    replay=replay_decompose,
    describe=describe_decompose_record,
    example=lambda model, example_inputs: _decompose_in_place(model, 2),
))


def format_report(report: Iterable[LayerDecomposition]) -> str:
    """A fixed-width text table of a decomposition report."""
    rows = list(report)
    lines = [f"{'layer':<32} {'shape':>18} {'rank':>5} {'mean err':>9} {'max err':>8} {'MACs before':>13} {'MACs after':>12}"]
    for row in rows:
        shape = "x".join(str(d) for d in (row.out_channels, row.in_channels, *row.kernel_size))
        rank = "dense" if row.rank is None else _rank_text(row.rank)
        before = "-" if row.macs_before is None else f"{row.macs_before:,}"
        after = "-" if row.macs_after is None else f"{row.macs_after:,}"
        lines.append(
            f"{row.name:<32} {shape:>18} {rank:>5} {row.mean_error:>9.4f} {row.max_error:>8.4f} {before:>13} {after:>12}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------- helpers
def _rank_chooser(rank: Any, spec: DecompositionMethod) -> Mapping[str, Any] | RankRule | MaxError | tuple:
    """The rank argument in one of four shapes: a mapping, a rule, a :class:`MaxError`, or ``(kind, value)``."""
    if isinstance(rank, bool):
        raise UserError(f"rank must be a positive integer, a mapping, a spec or a rule, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise UserError(f"rank must be a positive integer, got {rank}; use e.g. rank=8")
        check_int(rank, "rank", maximum=MAX_RANK)
        return ("fixed", rank)
    if isinstance(rank, (tuple, list)):
        if spec.name != "tucker2":
            raise UserError(f"a pair of ranks {tuple(rank)!r} is for method='tucker2' (R1, R2); {spec.name} takes one int")
        return ("fixed", tuple(rank))
    if isinstance(rank, str) or (hasattr(rank, "kind") and hasattr(rank, "value")):
        kind, value = _parse_spec(rank)
        return _rank_chooser(value, spec) if kind == "fixed" else (kind, value)
    if isinstance(rank, MaxError):
        if spec.name != DEFAULT_METHOD:
            raise UserError(f"MaxError chooses CP ranks of cp-filter only; for {spec.name} use 'energy:F' or 'vbmf'")
        return rank
    if isinstance(rank, Mapping):
        for name, value in rank.items():
            if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
                raise UserError(f"rank for layer {name!r} must be a positive integer, got {value!r}")
            if isinstance(value, int) and value < 1:
                raise UserError(f"rank for layer {name!r} must be a positive integer, got {value!r}")
        return rank
    if callable(rank):
        return rank
    raise UserError(f"rank must be a positive integer, a mapping, a spec or a rule, got {type(rank).__name__}")


def _parse_spec(rank: Any) -> tuple[str, Any]:
    """A spec string (``"vbmf"``, ``"energy:0.9"``, ``"macs:0.5"``) or RankSpec as ``(kind, value)``."""
    if isinstance(rank, str):
        if rank.strip().lstrip("-").isdigit():  # "8": an int in disguise (the CLI converts, the API does not)
            raise UserError(f"rank {rank!r} is a string: pass the int {rank.strip()} (strings are specs such as "
                            "'vbmf', 'energy:0.9', 'macs:0.5')")
        from norton.decomposition.rank_selection import parse_rank_spec  # local: H1's parser

        rank = parse_rank_spec(rank)
    kind, value = rank.kind, rank.value
    if kind not in SPEC_KINDS:
        raise UserError(f"unknown rank spec kind {kind!r}; use one of {', '.join(SPEC_KINDS)}")
    return (kind, value)


def _choose(chooser: Any, spec: DecompositionMethod, name: str, layer: nn.Module,
            input_shape: torch.Size | None) -> Rank | None:
    """The checked rank of one layer (``None``: leave it dense)."""
    what = f"rank for layer {name!r}"
    if isinstance(chooser, tuple):
        kind, value = chooser
        if kind == "fixed":
            try:
                return spec.check_rank(value, layer, what)
            except RankAboveLayerError as error:  # one rank for all: this layer alone may be too small for it
                raise UserError(f"{error}, or leave the layer dense with exclude=[{name!r}]") from None
        hw = None if input_shape is None else input_shape[-2:]
        return spec.select_rank(layer, kind, value, hw)
    value = chooser[name] if isinstance(chooser, Mapping) else chooser(name, layer)
    return None if value is None else spec.check_rank(value, layer, what)


def _smallest_rank_meeting(layer: Any, rule: MaxError, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(rank, block, errors)`` of the smallest CP rank whose mean filter error is within the rule, or Nones."""
    spec = get_method(DEFAULT_METHOD)
    kh, kw = layer.kernel_size
    high = rule.max_rank if rule.max_rank is not None else max(1, kh * kw - 1)
    high = min(high, layer.in_channels * max(kh, kw))  # higher CP ranks never lower the error
    low = 1
    best: tuple[Any, Any, Any] = (None, None, None)
    while low <= high:  # bisection over ranks: the error falls with the rank
        mid = (low + high) // 2
        block, errors = spec.build(layer, mid, options)
        if errors.mean().item() <= rule.max_error:
            best, high = (mid, block, errors), mid - 1
        else:
            low = mid + 1
    return best


def check_decomposable_layer(layer: nn.Module, name: str) -> None:
    """``UserError`` naming the layer if its convolution cannot be split (asymmetric 'same' padding, ...)."""
    if isinstance(layer, nn.Conv2d):
        try:
            check_decomposable(layer)
        except ValueError as error:
            raise UserError(f"layer {name!r}: {error}") from None


def _record(method: str, ranks: Mapping[str, Any]) -> dict[str, Any]:
    # cp-filter records keep the pre-method shape, so older norton versions still read them
    record: dict[str, Any] = {"op": "decompose", "ranks": dict(ranks)}
    if method != DEFAULT_METHOD:
        record = {"op": "decompose", "method": method, "ranks": dict(ranks)}
    return record


def _rank_text(rank: Any) -> str:
    return "x".join(str(r) for r in rank) if isinstance(rank, (list, tuple)) else str(rank)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(patterns: Iterable[str], names: Mapping[str, Any], what: str) -> None:
    if isinstance(patterns, str):
        raise UserError(f"{what} must be a list of layer names or patterns, not a single string {patterns!r}")
    for pattern in patterns:
        if not any(_matches(name, [pattern]) for name in names):
            raise UserError(f"{what} pattern {pattern!r} matches no eligible layer of the model")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _block_macs(block: nn.Module, input_shape: torch.Size) -> int:
    if isinstance(block, CPDBlock):
        return cpd_block_macs(block, input_shape[-2:])
    if isinstance(block, LowRankLinear):
        return block.rank * (block.in_features + block.out_features)
    return chain_macs(block, input_shape[-2:])


def _row(name, layer, rank, errors: Tensor, before, after) -> LayerDecomposition:
    linear = isinstance(layer, nn.Linear)
    errors = torch.as_tensor(errors).reshape(-1)
    return LayerDecomposition(
        name=name, in_channels=layer.in_features if linear else layer.in_channels,
        out_channels=layer.out_features if linear else layer.out_channels,
        kernel_size=() if linear else tuple(layer.kernel_size), rank=rank,
        mean_error=float(errors.mean()) if errors.numel() else 0.0,
        max_error=float(errors.max()) if errors.numel() else 0.0,
        macs_before=before, macs_after=after,
    )
