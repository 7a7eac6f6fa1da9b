"""``auto_compress``: per-layer widths and decompositions chosen from data to meet a MACs or latency budget.

Four steps, each in its own module:

1. **sensitivity** (:mod:`norton.auto.sensitivity`): on a few calibration images, how much
   the output changes when one coupled group of channels keeps 3/4, 1/2, 1/4, 1/8 of its
   channels (the ones the criterion would keep), or one convolution is replaced by a
   rank-4/2/1 CPDBlock;
2. **allocation** (:mod:`norton.auto.allocation`): a greedy multiple-choice knapsack on the
   exact MAC model (:mod:`norton.auto.costs`) picks every group's width and every
   layer's rank so the MACs land within 2% of the budget with the least summed change;
   with ``target_latency`` the cost is the latency predicted from a per-device table of
   layer timings (:mod:`norton.auto.latency`), and the result is timed and, if it misses
   the target by more than 10%, allocated again with the measured/predicted ratio;
3. **apply**: :func:`norton.prune` with the chosen widths (a ratio per group), then
   :func:`norton.decompose` of the pruned convolutions at the chosen ranks, so the plan
   holds ordinary ``prune`` and ``decompose`` records that ``norton.load`` replays;
4. **recovery** (:mod:`norton.recovery`): the consumers of removed channels and the CP
   factors are refitted by least squares to reproduce the uncompressed layers' outputs
   on the calibration images, then BatchNorm statistics are re-estimated.

Pruning comes before decomposition here (the paper decomposes first): the channels
and the sensitivity curves are then both measured on the model the user gave, and the
CP factors are fitted to the filters that remain.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from norton.auto.allocation import Allocation, allocate
from norton.auto.costs import ChoiceMacs, LayerOption, cp_filter_coefficients
from norton.auto.sensitivity import Curve, Unit, decompose_unit, prune_unit, sensitivity_curves
from norton.complexity import count_complexity, original_complexity
from norton.compress_arguments import AUTO_CRITERION, parse_target_latency
from norton.deploy.tolerance import DTYPES, dtype_name
from norton.errors import UserError
from norton.example_inputs import ExampleInputs, first_tensor, model_device, module_input_shapes
from norton.limits import check_int, check_target_macs

FRACTIONS = (0.75, 0.5, 0.25, 0.125)  # kept fractions of a group whose output change is measured
RANKS = (4, 2, 1)  # CP ranks tried per 3x3 convolution (rank 4 costs about half of it)
MACS_TOLERANCE = 0.02
_ROUND_TO_CUDA = 8  # with a latency budget on CUDA, kept widths are multiples of 8 (tensor-core tiles)


@dataclass
class AutoReport:
    """What :func:`auto_compress` chose and measured (``model.norton_auto_report``)."""

    target_macs: float | None  # None with a latency budget
    macs_before: int
    macs_after: int
    predicted_change: float
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)  # group's first layer -> (kept, of)
    ranks: dict[str, int] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)
    # With target_latency (milliseconds, optimize_for_inference's form, measured on example_inputs' device
    # and batch): the target, the input model's latency and the result's (the last timing, interleaved),
    # the allocation's prediction, and each allocation pass {"goal_ms", "predicted_ms", "measured_ms"}.
    target_latency_ms: float | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    latency_predicted_ms: float | None = None
    latency_passes: list[dict[str, float]] = field(default_factory=list)
    latency_table: dict[str, Any] = field(default_factory=dict)  # {"path", "points", "timed"}


def auto_compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    target_macs: float | None = None,
    target_latency: float | str | None = None,
    calibration: Iterable[Any],
    criterion: str = AUTO_CRITERION,
    ranks: Sequence[int] = RANKS,
    fractions: Sequence[float] = FRACTIONS,
    sensitivity_images: int = 128,
    samples: int = 4,
    calibration_images: int = 512,
    ignored_layers: Iterable[str | nn.Module] = (),
    recover: bool = True,
    progress: bool = True,
    latency_dtype: torch.dtype | str = torch.float32,
    latency_cache: str | os.PathLike | None = None,
    latency_passes: int = 3,
) -> nn.Module:
    """A new model with ``target_macs`` of ``model``'s MACs (conv + linear, within 2%), or running in
    ``target_latency``; ``model`` is unchanged.

    Args:
        model: any module :func:`norton.prune` can trace (one forward path, convolutions
            with ``groups == 1`` or depthwise).
        example_inputs: what the model runs on, e.g. ``torch.randn(1, 3, 32, 32)``; MACs are
            counted on it (per sample).
        target_macs: the fraction of the original model's MACs to keep, in (0, 1): the
            model before its first norton operation, as for :func:`norton.prune`.
        target_latency: instead of ``target_macs``: a fraction in (0, 1) of the *input* model's
            latency, or milliseconds as a string (``"12ms"``). Latency is the median time of one
            forward of :func:`norton.optimize_for_inference`'s form on ``example_inputs`` (their
            device and batch size; CUDA widths are multiples of 8). See docs/latency.md.
        calibration: an iterable of batches, each an input tensor ``(B, ...)`` or an
            ``(input, target)`` pair (targets are ignored); a few hundred images suffice.
        criterion: which channels a group loses (a registered pruning criterion).
        ranks: CP ranks tried for each convolution with a kernel larger than 1x1.
        fractions: kept fractions of each group's channels whose effect is measured.
        sensitivity_images: calibration images used to measure the sensitivity curves.
        samples: labels sampled per image from the model's prediction for the Fisher estimate.
        calibration_images: calibration images used for recovery.
        ignored_layers: layers (names or modules) whose output channels are kept.
        recover: refit consumers and CP factors and re-estimate BatchNorm on the calibration images.
        latency_dtype: the dtype the latency is measured in (``optimize_for_inference``'s ``dtype``).
        latency_cache: the folder of the layer-latency tables (default ``$NORTON_LATENCY_CACHE``,
            else ``~/.cache/norton/latency``).
        latency_passes: allocations at most (each one after the first corrects the prediction by the
            measured/predicted ratio of the one before).
    """
    from norton.calibration import calibration_inputs
    from norton.pruning.criteria import get_criterion

    if (target_macs is None) == (target_latency is None):
        raise UserError("give auto_compress exactly one budget: target_macs (a fraction of the MACs) or "
                        "target_latency (a fraction of the latency, or milliseconds such as '12ms')")
    if target_macs is not None:
        target = check_target_macs(target_macs)
        if target >= 1:
            raise UserError(f"target_macs must lie in (0, 1) for auto_compress, got {target_macs!r}")
    else:
        latency_goal = parse_target_latency(target_latency)
        check_int(latency_passes, "latency_passes", maximum=10)
        latency_precision = dtype_name(latency_dtype)
    for rank in ranks:
        check_int(rank, "auto_compress rank", maximum=4096)
    for fraction in fractions:
        if not 0 < fraction < 1:
            raise UserError(f"auto_compress fractions must lie in (0, 1), got {fraction!r}")
    check_int(sensitivity_images, "sensitivity_images", maximum=100_000)
    check_int(samples, "samples", maximum=64)
    check_int(calibration_images, "calibration_images", maximum=100_000)
    get_criterion(criterion)
    inputs = calibration_inputs(
        calibration, example_inputs, max_images=max(calibration_images, sensitivity_images),
        device=model_device(model),
    )

    reference: tuple[nn.Module, float, float] | None = None
    if target_macs is None:  # time the input model first: a target it already meets is refused before the search
        reference = _latency_reference(model, first_tensor(example_inputs), latency_goal, DTYPES[latency_precision])
    search = _search(
        model, example_inputs, inputs, criterion=criterion, ranks=ranks, fractions=fractions,
        sensitivity_images=sensitivity_images, samples=samples, ignored_layers=ignored_layers, progress=progress,
        round_to=_ROUND_TO_CUDA if reference is not None and first_tensor(example_inputs).is_cuda else None,
    )
    calibration_batches = inputs[:_images(inputs, calibration_images)]
    if reference is not None:
        return _latency_compress(model, example_inputs, search, reference, latency_goal[0], calibration_batches,
                                 criterion, recover, DTYPES[latency_precision], latency_cache, latency_passes)
    allocation = allocate(search.macs, search.prune_curves, search.decompose_curves, target * search.original,
                          tolerance=MACS_TOLERANCE)
    plan = _plan_of(search, allocation)
    result = _apply(model, example_inputs, plan, calibration_batches, criterion, recover)
    macs = count_complexity(result, example_inputs=example_inputs).macs
    original = plan.original_macs
    if abs(macs - target * original) > MACS_TOLERANCE * target * original:
        raise UserError(  # the MAC model is exact for conv + linear, so this is norton's fault
            f"auto_compress reached {macs / original:.1%} of the MACs instead of {target:.1%}; "
            "this is a bug in norton, please report it with the model"
        )
    result.norton_auto_report = AutoReport(  # type: ignore[assignment]
        target_macs=target, macs_before=plan.macs_before,
        macs_after=int(macs), predicted_change=allocation.cost, widths=plan.widths, ranks=plan.ranks,
        recovery=plan.recovery,
    )
    return result


def _latency_reference(model: nn.Module, x: Tensor, goal: tuple[str, float], dtype: torch.dtype,
                       ) -> tuple[nn.Module, float, float]:
    """The input model's optimized form, its milliseconds and the target's; ``UserError`` if it already meets it."""
    from norton.auto.latency import latency_memory_format, measure_models
    from norton.deploy.optimize import optimize_for_inference

    fmt = latency_memory_format(x.device)
    reference = optimize_for_inference(model, x, device=x.device, dtype=dtype, memory_format=fmt)
    before = measure_models({"reference": reference}, x)["reference"]
    unit, amount = goal
    target_ms = amount * before if unit == "fraction" else amount
    if target_ms >= before:
        raise UserError(f"the model already runs in {before:.3g} ms, within target_latency {target_ms:.3g} ms: "
                        "nothing to compress")
    return reference, before, target_ms


def _latency_compress(
    model: nn.Module, example_inputs: ExampleInputs, search: _Search, timed: tuple[nn.Module, float, float],
    unit: str, inputs: Sequence[Tensor], criterion: str, recover: bool, dtype: torch.dtype,
    cache: str | os.PathLike | None, passes: int,
) -> nn.Module:
    """Allocate on predicted latency, apply, time; again with the measured/predicted ratio while > 10% off."""
    from norton.auto.latency import (
        LATENCY_TOLERANCE,
        ChoiceLatency,
        LatencyTable,
        cache_path,
        latency_memory_format,
        measure_models,
    )
    from norton.deploy.optimize import optimize_for_inference

    x = first_tensor(example_inputs)
    device = x.device
    reference, before, target_ms = timed
    fmt = latency_memory_format(device)
    table = LatencyTable(cache_path(device, dtype, cache), device, dtype)
    modules = dict(search.work.named_modules())
    shapes = module_input_shapes(search.work, search.macs.widths.leaf_names, example_inputs, eval_mode=True)
    latency = ChoiceLatency(search.macs, modules, shapes, table, fmt)
    full = search.full_widths[None]
    latency.scale = before / float(latency(full, torch.zeros(1, len(search.macs.layers), dtype=torch.long))[0])

    correction = 1.0  # measured / predicted of the last pass
    best: tuple[float, nn.Module, _Plan, Any, dict[str, float]] | None = None
    history: list[dict[str, float]] = []
    for _ in range(passes):
        try:
            allocation = allocate(latency, search.prune_curves, search.decompose_curves, target_ms / correction,
                                  tolerance=MACS_TOLERANCE, round_to=search.round_to, budget="latency")
        except UserError:
            if best is None:
                raise
            break  # the corrected goal is out of reach: keep the closest result so far
        plan = _plan_of(search, allocation)
        result = _apply(model, example_inputs, plan, inputs, criterion, recover)
        optimized = optimize_for_inference(result, x, device=device, dtype=dtype, memory_format=fmt)
        times = measure_models({"reference": reference, "result": optimized}, x)
        # Against the fraction asked for, the same-run ratio: load on a shared machine hits both alike.
        measured = times["result"] * (before / times["reference"] if unit == "fraction" else 1.0)
        history.append({"goal_ms": target_ms / correction, "predicted_ms": allocation.macs, "measured_ms": measured})
        miss = abs(measured / target_ms - 1)
        if best is None or miss < best[0]:
            best = (miss, result, plan, allocation, times)
        if miss <= LATENCY_TOLERANCE:
            break
        correction = measured / allocation.macs
    assert best is not None
    _, result, plan, allocation, times = best
    macs = count_complexity(result, example_inputs=example_inputs).macs
    result.norton_auto_report = AutoReport(  # type: ignore[assignment]
        target_macs=None, macs_before=plan.macs_before, macs_after=int(macs), predicted_change=allocation.cost,
        widths=plan.widths, ranks=plan.ranks, recovery=plan.recovery, target_latency_ms=target_ms,
        latency_before_ms=times["reference"], latency_after_ms=times["result"],
        latency_predicted_ms=allocation.macs, latency_passes=history,
        latency_table={"path": str(table.path), "points": len(table.entries), "timed": table.timed},
    )
    return result


@dataclass
class _Plan:
    widths: dict[str, tuple[int, int]]  # group's first layer -> (kept, channels), pruned groups only
    ranks: dict[str, int]
    original_macs: int  # the original model's (before its first norton operation), which target_macs divides
    macs_before: int  # the input model's
    recovery: dict[str, Any] = field(default_factory=dict)


def _images(inputs: Sequence[Tensor], images: int) -> int:
    """How many leading batches of ``inputs`` hold ``images`` images (at least one batch)."""
    count = 0
    for i, batch in enumerate(inputs):
        count += batch.shape[0]
        if count >= images:
            return i + 1
    return len(inputs)


@dataclass
class _Search:
    """Everything the allocation chooses from: the cost model of choices and each unit's sensitivity curve."""

    work: nn.Module  # the traced copy the groups and leaves are named in
    groups: list[Any]
    options: dict[str, list[LayerOption]]
    macs: ChoiceMacs
    prune_curves: list[Curve]
    decompose_curves: list[Curve]
    original: int  # the original model's MACs (before its first norton operation)
    round_to: int | None

    @property
    def full_widths(self) -> Tensor:
        return torch.tensor([g.channels for g in self.groups], dtype=torch.float64)  # (G,)


def _group_fractions(channels: int, fractions: Sequence[float], round_to: int | None) -> list[float]:
    """``fractions`` of a group, moved so that each kept width is a multiple of ``round_to``."""
    if not round_to or channels <= round_to:
        return list(fractions)
    kept = {max(round_to, round_to * round(channels * f / round_to)) for f in fractions}
    return [k / channels for k in sorted(kept, reverse=True) if k < channels]


def _search(
    model: nn.Module, example_inputs: ExampleInputs, inputs: Sequence[Tensor], *,
    criterion: str, ranks: Sequence[int], fractions: Sequence[float], sensitivity_images: int, samples: int,
    ignored_layers: Iterable[str | nn.Module], progress: bool, round_to: int | None,
) -> _Search:
    from norton.decomposition.cp_als import cp_als_many
    from norton.decomposition.cp_tensor import cp_to_tensor
    from norton.decomposition.decompose import eligible_convs
    from norton.pruning.budget import MacModel
    from norton.pruning.criteria import get_criterion
    from norton.pruning.engine import _group_scores
    from norton.pruning.groups import filter_layer, side_of, traced
    from norton.pruning.surgery import IN

    work, graph, groups = traced(model, example_inputs, ignored_layers, False)
    work.eval()
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    widths = MacModel(work, example_inputs, groups)
    leaf_names = widths.leaf_names
    convs = {
        name: conv for name, conv in eligible_convs(work).items()
        if name in leaf_names and isinstance(conv, nn.Conv2d)
    }
    shapes = module_input_shapes(work, convs, example_inputs, eval_mode=True)
    options: dict[str, list[LayerOption]] = {}
    for name, conv in convs.items():
        hw = shapes[name][-2:]
        dense = (float(widths.weight[leaf_names.index(name)]), 0.0, 0.0, 0.0)
        dense_macs = dense[0] * conv.out_channels * conv.in_channels
        layer = [LayerOption("dense", None, dense)]
        for rank in sorted(set(ranks), reverse=True):
            coefficients = cp_filter_coefficients(conv, hw, rank)
            block_macs = coefficients[0] * conv.out_channels * conv.in_channels + coefficients[1] * conv.out_channels
            if block_macs < 0.8 * dense_macs and rank <= conv.in_channels * max(conv.kernel_size):
                layer.append(LayerOption("cp-filter", rank, coefficients))
        if len(layer) > 1:
            options[name] = layer
    macs = ChoiceMacs(widths, options, leaf_names)
    original = original_complexity(model, example_inputs=example_inputs).macs

    score = get_criterion(criterion)
    names = {module: name for name, module in work.named_modules()}
    units: list[Unit] = []
    for group in groups:
        if group.protected:
            continue
        pruner = graph.get_pruner_of_module(group.root)
        full = graph.get_pruning_group(group.root, pruner.prune_out_channels, list(range(group.channels)))
        scores = _group_scores(graph, full, group.channels, score, names)  # (C,)
        consumers = [
            (item.dep.target.module, torch.as_tensor(item.idxs, dtype=torch.long),
             torch.as_tensor(item.root_idxs, dtype=torch.long))
            for item in full
            if item.dep.target.module in names and side_of(graph, item.dep) == IN
            and filter_layer(item.dep.target.module, prune_linear=True)
        ]
        units.append(prune_unit(group.layers[0], torch.argsort(scores, stable=True), consumers,
                                _group_fractions(group.channels, fractions, round_to)))
    # One batched CP-ALS per rank over every layer that offers it (cp_als_many shares the sweeps).
    kernels: dict[str, list[Tensor | None]] = {name: [None] for name in macs.layers}
    for rank in sorted({o.rank for name in macs.layers for o in options[name][1:] if o.rank}, reverse=True):
        wanted = [name for name in macs.layers if any(o.rank == rank for o in options[name][1:])]
        fitted = cp_als_many([convs[n].weight.detach() for n in wanted], rank, n_iter_max=25, tol=1e-4)
        for name, (factors, _) in zip(wanted, fitted, strict=True):
            kernels[name].append(cp_to_tensor(factors).to(convs[name].weight.dtype))
    units.extend(decompose_unit(name, convs[name], kernels[name]) for name in macs.layers)
    curves = iter(sensitivity_curves(
        work, inputs[:_images(inputs, sensitivity_images)], units, samples=samples, progress=progress,
    ))
    prune_curves = [
        Curve("prune", g.layers[0], [g.channels], [0.0]) if g.protected else next(curves) for g in groups
    ]
    decompose_curves = list(curves)
    return _Search(work, list(groups), options, macs, prune_curves, decompose_curves, int(original), round_to)


def _plan_of(search: _Search, allocation: Allocation) -> _Plan:
    """The widths and ranks ``allocation`` chose, by layer name."""
    macs = search.macs
    unchanged = float(macs(search.full_widths[None],
                           torch.zeros(1, len(macs.layers), dtype=torch.long))[0])  # equals count_complexity(model)
    plan = _Plan(widths={}, ranks={}, original_macs=search.original, macs_before=round(unchanged))
    for group, kept in zip(search.groups, allocation.keep.tolist(), strict=True):
        if kept < group.channels:
            plan.widths[group.layers[0]] = (int(kept), group.channels)
    for name, index in zip(macs.layers, allocation.choice.tolist(), strict=True):
        option = search.options[name][index]
        if option.rank is not None:
            plan.ranks[name] = option.rank
    return plan


def _apply(
    model: nn.Module, example_inputs: ExampleInputs, plan: _Plan, inputs: Sequence[Tensor], criterion: str,
    recover: bool,
) -> nn.Module:
    """Prune to the chosen widths, recover, decompose at the chosen ranks, recover; a new model."""
    from norton.decomposition.decompose import decompose
    from norton.pruning.engine import prune

    result = copy.deepcopy(model)
    if plan.widths:
        # int(C * (1 - ratio)) must give exactly the kept width: aim half a channel above it.
        ratio = {layer: (channels - kept - 0.5) / channels for layer, (kept, channels) in plan.widths.items()}
        prune(result, example_inputs, ratio=ratio, criterion=criterion)
        if recover:
            from norton.recovery import recalibrate_batchnorm, refit_pruned_consumers

            errors = refit_pruned_consumers(model, result, inputs)
            recalibrate_batchnorm(result, inputs)
            plan.recovery["pruned_consumers"] = len(errors)
    if plan.ranks:
        pruned = copy.deepcopy(result) if recover else None
        decompose(result, dict(plan.ranks), progress=False)
        if recover and pruned is not None:
            from norton.recovery import recalibrate_batchnorm, refit_cp_blocks

            errors = refit_cp_blocks(pruned, result, inputs)
            recalibrate_batchnorm(result, inputs)
            plan.recovery["refitted_blocks"] = len(errors)
    result.train(model.training)
    return result
