"""Model-level filter decomposition: replace the convolutions of any ``nn.Module`` by CPDBlocks.

``decompose(model, rank)`` walks the model, picks every eligible ``nn.Conv2d``
(``groups == 1`` and a kernel larger than 1x1, by default), decomposes all its
filters at once with batched CP-ALS and swaps in a :class:`~norton.decomposition.cpd_block.CPDBlock`.
What was done is appended to ``model.norton_plan`` as plain data
(``{"op": "decompose", "ranks": {name: rank}}``) so :func:`replay_decompose`
can rebuild the same structure in a fresh process before a state dict loads.
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

from norton.complexity import conv2d_macs, cpd_block_macs
from norton.decomposition.cpd_block import CPDBlock, check_decomposable, conv_padding
from norton.errors import UserError
from norton.example_inputs import module_input_shapes
from norton.limits import MAX_RANK, check_int, check_rank
from norton.plan import PlanOperation, append_record, record_original, register_operation

RankRule = Callable[[str, nn.Conv2d], "int | None"]
RankSpec = int | Mapping[str, int] | RankRule


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
    kernel_size: tuple[int, int]
    rank: int | None  # None: left dense (rule not met)
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
) -> dict[str, nn.Conv2d]:
    """The convolutions :func:`decompose` would replace, by qualified name.

    Eligible: ``nn.Conv2d`` with ``groups == 1`` and ``k_h * k_w >= min_kernel_elements``,
    not already inside a CPDBlock. ``include``/``exclude`` are qualified names or
    ``fnmatch`` patterns (``"layer1.*"``); an ``include`` entry that matches no
    eligible layer is an error, so typos do not pass silently.
    """
    inside_blocks = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, CPDBlock)
        for child, _ in module.named_modules()
    }
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and name not in inside_blocks
        and module.groups == 1
        and module.kernel_size[0] * module.kernel_size[1] >= min_kernel_elements
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
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    seed: int | None = 0,
    progress: bool = True,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, list[LayerDecomposition]]:
    """Replace, in place, every eligible ``nn.Conv2d`` of ``model`` by a CPDBlock.

    Args:
        model: any module; it is modified in place and returned.
        rank: one int for every layer; a mapping ``{qualified_name: rank}`` (only
            those layers are decomposed); a :class:`MaxError` rule; or a callable
            ``(name, conv) -> rank | None`` (``None`` leaves the layer dense).
        include, exclude: qualified names or ``fnmatch`` patterns restricting the layers.
        example_inputs: when given, the report carries each layer's MACs before and after.
        n_iter_max, tol, init, seed: passed to :func:`norton.decomposition.cp_als.cp_als`.
        progress: show a progress bar over layers.
        return_report: also return the per-layer :class:`LayerDecomposition` rows.
    """
    from norton.decomposition.cp_als import cp_als

    mapping = _normalise_rank(rank)
    convs = eligible_convs(model, include=include, exclude=exclude)
    if isinstance(mapping, Mapping):
        unknown = sorted(set(mapping) - set(convs))
        if unknown:
            raise UserError(
                f"rank mapping names {unknown[0]!r}, which is not an eligible convolution of the model "
                f"(eligible: {', '.join(list(convs)[:5])}{', ...' if len(convs) > 5 else ''})"
            )
        convs = {name: conv for name, conv in convs.items() if name in mapping}
    # Every rank is chosen and checked against its layer before any CP-ALS runs (a MaxError
    # rule chooses by running it, within bounds), and layers are swapped only at the end,
    # so a mistake or an interruption leaves the model as it was.
    chosen_ranks: dict[str, int | None] = {}
    if not isinstance(mapping, MaxError):
        for name, conv in convs.items():
            value = mapping[name] if isinstance(mapping, Mapping) else mapping(name, conv)
            if value is not None:
                check_rank(value, f"rank for layer {name!r}", in_channels=conv.in_channels,
                           kernel_size=conv.kernel_size)
            chosen_ranks[name] = value
    input_shapes = (
        module_input_shapes(model, convs, example_inputs, eval_mode=True) if example_inputs is not None else {}
    )
    record_original(model)

    report: list[LayerDecomposition] = []
    ranks: dict[str, int] = {}
    blocks: dict[str, CPDBlock] = {}
    bar = tqdm(convs.items(), desc="decompose", unit="layer", disable=not progress, leave=False)
    for name, conv in bar:
        bar.set_postfix_str(name)
        weight = conv.weight.detach()  # (N, C_in, k_h, k_w)

        def run(r: int, weight: Tensor = weight) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
            return cp_als(weight, r, n_iter_max=n_iter_max, tol=tol, init=init, seed=seed)

        if isinstance(mapping, MaxError):
            chosen, result = _smallest_rank_meeting(run, mapping, conv)
        else:
            chosen, result = chosen_ranks[name], None
        macs_before = _conv_macs(conv, input_shapes.get(name))
        if chosen is None:
            errors = torch.zeros(conv.out_channels)
            report.append(_row(name, conv, None, errors, macs_before, macs_before))
            continue
        factors, errors = result if result is not None else run(chosen)
        block = CPDBlock.from_factors(
            factors,
            bias=conv.bias.detach() if conv.bias is not None else None,
            stride=tuple(conv.stride), padding=conv_padding(conv), dilation=tuple(conv.dilation),
            padding_mode=conv.padding_mode,
        )
        block.train(conv.training)
        block.reconstruction_error = errors
        blocks[name] = block
        ranks[name] = chosen
        report.append(_row(name, conv, chosen, errors, macs_before, _block_macs(block, input_shapes.get(name))))

    for name, block in blocks.items():
        _set_submodule(model, name, block)
    if ranks:
        append_record(model, {"op": "decompose", "ranks": ranks})
    return (model, report) if return_report else model


def replay_decompose(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Rebuild the structure of a ``{"op": "decompose", "ranks": {...}}`` record on ``model``.

    No CP-ALS runs: the CPDBlocks are freshly initialised and expect a state dict
    to be loaded next. The record is appended to ``model.norton_plan``.
    """
    check_decompose_record(record)
    modules = dict(model.named_modules())
    for name, rank in record["ranks"].items():  # every layer checked before the model changes
        conv = modules.get(name)
        if conv is None:
            raise UserError(f"decomposition record names layer {name!r}, which the model does not have")
        check_decomposable(conv)
        check_rank(rank, f"rank of layer {name!r}", in_channels=conv.in_channels, kernel_size=conv.kernel_size)
    record_original(model)
    for name, rank in record["ranks"].items():
        conv = modules[name]
        block = CPDBlock(
            conv.in_channels, conv.out_channels, int(rank), conv.kernel_size, stride=conv.stride,
            padding=conv_padding(conv), dilation=conv.dilation, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        _set_submodule(model, name, block)
    append_record(model, {"op": "decompose", "ranks": dict(record["ranks"])})
    return model


def _decompose_in_place(model: nn.Module, rank: int) -> nn.Module:
    decompose(model, rank, progress=False)
    return model


def check_decompose_record(record: Mapping[str, Any]) -> None:
    """``{"op": "decompose", "ranks": {layer name: rank}}`` with ranks in ``[1, MAX_RANK]``."""
    if not isinstance(record, Mapping) or record.get("op") != "decompose":
        raise UserError(f"not a decomposition record: {str(record)[:80]}")
    ranks = record.get("ranks")
    if not isinstance(ranks, Mapping) or not ranks:
        raise UserError("a decomposition record needs 'ranks': {layer name: rank}")
    for name, rank in ranks.items():
        if not isinstance(name, str):
            raise UserError(f"decomposition record: layer names must be strings, got {name!r}")
        check_int(rank, f"rank of layer {name!r}", minimum=1, maximum=MAX_RANK)


def describe_decompose_record(record: Mapping[str, Any]) -> str:
    """``decompose 19 layers (rank 3 x19)``."""
    counts = Counter(record["ranks"].values())
    ranks = ", ".join(f"rank {rank} x{count}" for rank, count in sorted(counts.items()))
    return f"decompose {len(record['ranks'])} layers ({ranks})"


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
        shape = f"{row.out_channels}x{row.in_channels}x{row.kernel_size[0]}x{row.kernel_size[1]}"
        rank = "dense" if row.rank is None else str(row.rank)
        before = "-" if row.macs_before is None else f"{row.macs_before:,}"
        after = "-" if row.macs_after is None else f"{row.macs_after:,}"
        lines.append(
            f"{row.name:<32} {shape:>18} {rank:>5} {row.mean_error:>9.4f} {row.max_error:>8.4f} {before:>13} {after:>12}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------- helpers
def _normalise_rank(rank: RankSpec) -> Mapping[str, int] | RankRule | MaxError:
    if isinstance(rank, bool):
        raise UserError(f"rank must be a positive integer, a mapping, or a rule, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise UserError(f"rank must be a positive integer, got {rank}; use e.g. rank=8")
        check_int(rank, "rank", maximum=MAX_RANK)
        return lambda name, conv: rank
    if isinstance(rank, Mapping):
        for name, value in rank.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"rank for layer {name!r} must be a positive integer, got {value!r}")
        return rank
    if isinstance(rank, MaxError) or callable(rank):
        return rank
    raise UserError(f"rank must be a positive integer, a mapping, or a rule, got {type(rank).__name__}")


def _smallest_rank_meeting(run, rule: MaxError, conv: nn.Conv2d):
    kh, kw = conv.kernel_size
    high = rule.max_rank if rule.max_rank is not None else max(1, kh * kw - 1)
    high = min(high, conv.in_channels * max(kh, kw))  # higher CP ranks never lower the error
    low, best = 1, None
    while low <= high:  # bisection over ranks: the error falls with the rank
        mid = (low + high) // 2
        result = run(mid)
        if result[1].mean().item() <= rule.max_error:
            best, high = (mid, result), mid - 1
        else:
            low = mid + 1
    return best if best is not None else (None, None)


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


def _conv_macs(conv: nn.Conv2d, input_shape: torch.Size | None) -> int | None:
    return None if input_shape is None else conv2d_macs(conv, input_shape[-2:])


def _block_macs(block: CPDBlock, input_shape: torch.Size | None) -> int | None:
    return None if input_shape is None else cpd_block_macs(block, input_shape[-2:])


def _row(name, conv, rank, errors: Tensor, before, after) -> LayerDecomposition:
    return LayerDecomposition(
        name=name, in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size), rank=rank,
        mean_error=float(errors.mean()) if errors.numel() else 0.0,
        max_error=float(errors.max()) if errors.numel() else 0.0,
        macs_before=before, macs_after=after,
    )
