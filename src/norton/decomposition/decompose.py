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
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.decomposition.cpd_block import CPDBlock, check_decomposable, conv_padding
from norton.errors import UserError

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
    input_shapes = _capture_input_shapes(model, convs, example_inputs) if example_inputs is not None else {}

    report: list[LayerDecomposition] = []
    ranks: dict[str, int] = {}
    bar = tqdm(convs.items(), desc="decompose", unit="layer", disable=not progress, leave=False)
    for name, conv in bar:
        bar.set_postfix_str(name)
        weight = conv.weight.detach()  # (N, C_in, k_h, k_w)

        def run(r: int) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
            return cp_als(weight, r, n_iter_max=n_iter_max, tol=tol, init=init, seed=seed)

        if isinstance(mapping, MaxError):
            chosen, result = _smallest_rank_meeting(run, mapping, conv)
        elif isinstance(mapping, Mapping):
            chosen, result = mapping[name], None
        else:
            chosen, result = mapping(name, conv), None
            if chosen is not None and (not isinstance(chosen, int) or isinstance(chosen, bool) or chosen < 1):
                raise UserError(f"rank rule returned {chosen!r} for layer {name!r}; expected a positive int or None")
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
        _set_submodule(model, name, block)
        ranks[name] = chosen
        report.append(_row(name, conv, chosen, errors, macs_before, _block_macs(block, input_shapes.get(name))))

    if ranks:
        plan = getattr(model, "norton_plan", None)
        if plan is None:
            plan = []
            model.norton_plan = plan
        plan.append({"op": "decompose", "ranks": ranks})
    return (model, report) if return_report else model


def replay_decompose(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Rebuild the structure of a ``{"op": "decompose", "ranks": {...}}`` record on ``model``.

    No CP-ALS runs: the CPDBlocks are freshly initialised and expect a state dict
    to be loaded next. The record is appended to ``model.norton_plan``.
    """
    if record.get("op") != "decompose" or not isinstance(record.get("ranks"), Mapping):
        raise UserError(f"not a decomposition record: {record!r:.80}")
    modules = dict(model.named_modules())
    for name, rank in record["ranks"].items():
        conv = modules.get(name)
        if conv is None:
            raise UserError(f"decomposition record names layer {name!r}, which the model does not have")
        check_decomposable(conv)
        block = CPDBlock(
            conv.in_channels, conv.out_channels, int(rank), conv.kernel_size, stride=conv.stride,
            padding=conv_padding(conv), dilation=conv.dilation, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        _set_submodule(model, name, block)
    if not hasattr(model, "norton_plan"):
        model.norton_plan = []
    model.norton_plan.append({"op": "decompose", "ranks": dict(record["ranks"])})
    return model


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
def _normalise_rank(rank: RankSpec) -> RankSpec:
    if isinstance(rank, bool):
        raise UserError(f"rank must be a positive integer, a mapping, or a rule, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise UserError(f"rank must be a positive integer, got {rank}; use e.g. rank=8")
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


def _capture_input_shapes(
    model: nn.Module, convs: Mapping[str, nn.Conv2d], example_inputs: Tensor | tuple[Tensor, ...]
) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    handles = [
        conv.register_forward_hook(lambda m, args, out, name=name: shapes.__setitem__(name, args[0].shape))
        for name, conv in convs.items()
    ]
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1


def _conv_macs(conv: nn.Conv2d, input_shape: torch.Size | None) -> int | None:
    if input_shape is None:
        return None
    (ph, pw) = conv_padding(conv)
    h = _out_size(input_shape[-2], conv.kernel_size[0], conv.stride[0], ph, conv.dilation[0])
    w = _out_size(input_shape[-1], conv.kernel_size[1], conv.stride[1], pw, conv.dilation[1])
    return h * w * conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def _block_macs(block: CPDBlock, input_shape: torch.Size | None) -> int | None:
    if input_shape is None:
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = block.kernel_size, block.stride, block.padding, block.dilation
    h_in, w_in = input_shape[-2], input_shape[-1]
    channels = block.rank * block.out_channels
    h_out = _out_size(h_in, kh, sh, ph, dh)
    w_out = _out_size(w_in, kw, sw, pw, dw)
    pointwise = h_in * w_in * channels * block.in_channels
    vertical = h_out * w_in * channels * kh
    horizontal = h_out * w_out * channels * kw
    return pointwise + vertical + horizontal


def _row(name, conv, rank, errors: Tensor, before, after) -> LayerDecomposition:
    return LayerDecomposition(
        name=name, in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size), rank=rank,
        mean_error=float(errors.mean()) if errors.numel() else 0.0,
        max_error=float(errors.max()) if errors.numel() else 0.0,
        macs_before=before, macs_after=after,
    )
