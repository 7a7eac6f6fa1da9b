"""``auto_compress``: per-layer widths and decompositions chosen from data to meet a MACs or latency budget.

Four steps, each in its own module:

1. **sensitivity** (:mod:`norton.auto.sensitivity`): on a few calibration images, how much
   the output changes when one coupled group of channels keeps 3/4, 1/2, 1/4, 1/8 of its
   channels (the ones the criterion would keep), or one convolution is replaced by one of
   the ``methods``' blocks at a few ranks (rank-4/2/1 CPDBlocks, Tucker-2, layer CP, spatial
   SVD: the reconstructed kernel in the layer); per layer, the options no other beats on both
   MACs and output change are kept;
2. **allocation** (:mod:`norton.auto.allocation`): a greedy multiple-choice knapsack on the
   exact MAC model (:mod:`norton.auto.costs`) picks every group's width and every
   layer's rank so the MACs land within 2% of the budget with the least summed change;
   with ``target_latency`` the cost is the latency predicted from a per-device table of
   layer timings (:mod:`norton.auto.latency`), and the result is timed and, if it misses
   the target by more than 10%, allocated again with the measured/predicted ratio (until a
   narrower model is no faster);
3. **apply**: :func:`norton.prune` with the chosen widths (a ratio per group), then
   :func:`norton.decompose` of the pruned convolutions at the chosen ranks (one call per method),
   so the plan holds ordinary ``prune`` and ``decompose`` records that ``norton.load`` replays;
4. **recovery** (:mod:`norton.recovery`): the consumers of removed channels, the CPDBlocks'
   factors and the other blocks' last layers are refitted by least squares to reproduce the
   uncompressed layers' outputs on the calibration images, then BatchNorm statistics are
   re-estimated; with ``distill_steps``, the whole model is then trained to match the input
   model's outputs on those images (:mod:`norton.calibration_distillation`).

Pruning comes before decomposition here (the paper decomposes first): the channels
and the sensitivity curves are then both measured on the model the user gave, and the
CP factors are fitted to the filters that remain.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from norton.auto.allocation import Allocation, allocate
from norton.auto.costs import ChoiceMacs, LayerOption, decomposition_options, option_macs
from norton.auto.sensitivity import Curve, Unit, decompose_unit, prune_unit, sensitivity_curves
from norton.complexity import count_complexity
from norton.compress_arguments import AUTO_CRITERION, parse_target_latency
from norton.deploy.tolerance import DTYPES, dtype_name
from norton.detection.parts import AUTO_PARTS, check_parts, parts_macs, parts_predicate
from norton.errors import UserError
from norton.example_inputs import ExampleInputs, first_tensor, model_device, module_input_shapes
from norton.limits import check_finite, check_int, check_target_macs

FRACTIONS = (0.75, 0.5, 0.25, 0.125)  # kept fractions of a group whose output change is measured
MIN_LATENCY_GAIN = 0.02  # a latency correction pass this much faster than the one before, or the passes stop
RANKS = (4, 2, 1)  # CP ranks tried per 3x3 convolution (rank 4 costs about half of it)
# Decompositions offered per layer by default. Layer CP is left out: its blocks (four thin layers in a row)
# fit best before fine-tuning but lose it in the first epoch (docs/auto_compress.md, docs/pareto.md).
METHODS = ("cp-filter", "tucker2", "svd")
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
    ranks: dict[str, Any] = field(default_factory=dict)  # decomposed layer -> rank ((R1, R2) for tucker2)
    methods: dict[str, str] = field(default_factory=dict)  # decomposed layer -> its method ("cp-filter", "tucker2", ...)
    recovery: dict[str, Any] = field(default_factory=dict)
    # With distill_steps: {"steps", "images", "mismatch_before", "mismatch_after"} (calibration_distillation).
    distillation: dict[str, Any] = field(default_factory=dict)
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
    methods: Sequence[str] | None = None,
    ranks: Sequence[int] = RANKS,
    fractions: Sequence[float] = FRACTIONS,
    sensitivity_images: int = 128,
    samples: int = 4,
    calibration_images: int = 512,
    ignored_layers: Iterable[str | nn.Module] = (),
    detector_parts: Sequence[str] | None = None,
    recover: bool = True,
    distill_steps: int = 0,
    distill_lr: float = 1e-3,
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
        methods: the decompositions each convolution with a kernel larger than 1x1 may get, any of
            ``"cp-filter"``, ``"tucker2"``, ``"cp-layer"``, ``"svd"`` (each at a few ranks,
            :func:`norton.auto.costs.decomposition_options`); the allocation picks one per layer, or
            keeps it dense. Default :data:`METHODS` (``("cp-filter",)`` with ``target_latency``,
            whose timing table knows CPDBlocks only); ``()`` prunes only.
        ranks: cp-filter ranks tried for each convolution with a kernel larger than 1x1.
        fractions: kept fractions of each group's channels whose effect is measured.
        sensitivity_images: calibration images used to measure the sensitivity curves.
        samples: labels sampled per image from the model's prediction for the Fisher estimate.
        calibration_images: calibration images used for recovery.
        ignored_layers: layers (names or modules) whose output channels are kept.
        detector_parts: for a torchvision detector (``example_inputs`` a list of images), the
            parts compressed: ``"body"`` (default) and ``"fpn"`` (:mod:`norton.detection.parts`; the
            FPN's output width, which the RoI heads read, is kept). ``target_macs`` is then a fraction
            of those parts' MACs (the RoI heads' cost depends on the number of proposals), and the
            sensitivity and recovery run on the FPN maps and RPN outputs
            (:class:`norton.detection.features.DetectorFeatures`); calibration batches are lists of
            images or ``(images, targets)`` pairs, as a detection DataLoader yields.
        recover: refit consumers and CP factors and re-estimate BatchNorm on the calibration images.
        distill_steps: after recovery, train the compressed model this many Adam steps to reproduce
            ``model``'s outputs on the calibration images (no labels;
            :func:`norton.calibration_distillation.distill_on_calibration`). Raises top-1 right after
            compression (ResNet-20 at 0.1 of the MACs: 75.7% -> 86.4% with 200), not after a
            fine-tuning epoch; classifiers and other single-tensor outputs only. Default 0 (off).
        distill_lr: its learning rate at the first step (cosine to 0).
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
    offered = _check_methods(methods, latency=target_latency is not None)
    for rank in ranks:
        check_int(rank, "auto_compress rank", maximum=4096)
    for fraction in fractions:
        if not 0 < fraction < 1:
            raise UserError(f"auto_compress fractions must lie in (0, 1), got {fraction!r}")
    check_int(sensitivity_images, "sensitivity_images", maximum=100_000)
    check_int(samples, "samples", maximum=64)
    check_int(calibration_images, "calibration_images", maximum=100_000)
    check_int(distill_steps, "distill_steps", minimum=0, maximum=1_000_000)
    check_finite(distill_lr, "distill_lr", positive=True)
    get_criterion(criterion)
    parts = check_parts(model, detector_parts)
    if parts is not None and distill_steps:
        raise UserError("auto_compress's distill_steps needs a model whose output is one tensor (a classifier); "
                        "for a detector leave it at 0 and fine-tune instead")
    if parts is not None:
        from norton.detection.features import detector_calibration_inputs

        if target_latency is not None:
            raise UserError("auto_compress on a detector takes target_macs (a fraction of the compressed parts' "
                            "MACs); target_latency is for classifiers")
        if set(parts) - set(AUTO_PARTS):
            raise UserError(f"auto_compress compresses a detector's {' and '.join(AUTO_PARTS)}; compress the rpn "
                            "and heads with norton.prune / norton.decompose(..., detector_parts=...)")
        if "fpn" in parts:  # its outputs feed the RoI heads, which the sensitivity does not run: kept whole
            ignored_layers = [*_listed(ignored_layers), "backbone.fpn.layer_blocks"]
        inputs = detector_calibration_inputs(calibration, model, max_images=max(calibration_images,
                                             sensitivity_images), device=model_device(model))
    else:
        inputs = calibration_inputs(
            calibration, example_inputs, max_images=max(calibration_images, sensitivity_images),
            device=model_device(model),
        )

    reference: tuple[nn.Module, float, float] | None = None
    if target_macs is None:  # time the input model first: a target it already meets is refused before the search
        reference = _latency_reference(model, first_tensor(example_inputs), latency_goal, DTYPES[latency_precision])
    search = _search(
        model, example_inputs, inputs, criterion=criterion, methods=offered, ranks=ranks, fractions=fractions,
        sensitivity_images=sensitivity_images, samples=samples, ignored_layers=ignored_layers, progress=progress,
        parts=parts, round_to=_ROUND_TO_CUDA if reference is not None and first_tensor(example_inputs).is_cuda else None,
    )
    calibration_batches = inputs[:_images(inputs, calibration_images)]
    if reference is not None:
        result = _latency_compress(model, example_inputs, search, reference, latency_goal[0], calibration_batches,
                                   criterion, recover, DTYPES[latency_precision], latency_cache, latency_passes)
        return _distilled(model, result, calibration_batches, distill_steps, distill_lr, progress)
    allocation = allocate(search.macs, search.prune_curves, search.decompose_curves, target * search.original,
                          tolerance=MACS_TOLERANCE)
    plan = _plan_of(search, allocation)
    result = _apply(model, example_inputs, plan, calibration_batches, criterion, recover, parts)
    macs = parts_macs(result, example_inputs, parts)
    original = plan.original_macs
    if abs(macs - target * original) > MACS_TOLERANCE * target * original:
        raise UserError(  # the MAC model is exact for conv + linear, so this is norton's fault
            f"auto_compress reached {macs / original:.1%} of the MACs instead of {target:.1%}; "
            "this is a bug in norton, please report it with the model"
        )
    result.norton_auto_report = AutoReport(  # type: ignore[assignment]
        target_macs=target, macs_before=plan.macs_before,
        macs_after=int(macs), predicted_change=allocation.cost, widths=plan.widths, ranks=plan.ranks,
        methods=plan.methods, recovery=plan.recovery,
    )
    return _distilled(model, result, calibration_batches, distill_steps, distill_lr, progress)


def _distilled(model: nn.Module, result: nn.Module, inputs: Sequence[Tensor], steps: int, lr: float,
               progress: bool) -> nn.Module:
    """``result`` after ``steps`` of distillation from ``model`` on ``inputs`` (recorded in its report)."""
    if steps:
        from norton.calibration_distillation import distill_on_calibration

        report: AutoReport = result.norton_auto_report  # type: ignore[assignment]  # set by auto_compress
        report.distillation = distill_on_calibration(model, result, inputs, steps=steps, lr=lr, progress=progress)
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
    best: tuple[float, float, nn.Module, _Plan, Any, dict[str, float]] | None = None  # miss, measured, ...
    history: list[dict[str, float]] = []
    floor = False  # stopped because a narrower model was no faster
    for _ in range(passes):
        try:
            allocation = allocate(latency, search.prune_curves, search.decompose_curves, target_ms / correction,
                                  tolerance=MACS_TOLERANCE, round_to=search.round_to, budget="latency")
        except UserError:
            if best is None:
                raise
            break  # the corrected goal is out of reach: keep the closest result so far
        plan = _plan_of(search, allocation)
        result = _apply(model, example_inputs, plan, inputs, criterion, recover, None)
        optimized = optimize_for_inference(result, x, device=device, dtype=dtype, memory_format=fmt)
        times = measure_models({"reference": reference, "result": optimized}, x)
        # Against the fraction asked for, the same-run ratio: load on a shared machine hits both alike.
        measured = times["result"] * (before / times["reference"] if unit == "fraction" else 1.0)
        history.append({"goal_ms": target_ms / correction, "predicted_ms": allocation.macs, "measured_ms": measured})
        miss = abs(measured / target_ms - 1)
        if len(history) > 1 and measured > target_ms and measured >= history[-2]["measured_ms"] * (1 - MIN_LATENCY_GAIN):
            # A narrower model that is no faster: what is left is per-operator time (activations,
            # additions, launches) that no width removes. Stop before losing more accuracy for nothing.
            floor = True
            break
        if best is None or miss < best[0]:
            best = (miss, measured, result, plan, allocation, times)
        if miss <= LATENCY_TOLERANCE:
            break
        correction = measured / allocation.macs
    assert best is not None
    miss, reached, result, plan, allocation, times = best
    if miss > LATENCY_TOLERANCE:
        warnings.warn(f"target_latency {target_ms:.3g} ms not reached within {LATENCY_TOLERANCE:.0%}: the closest "
                      f"model runs in {reached:.3g} ms ({len(history)} allocation pass(es), see "
                      f"norton_auto_report.latency_passes)"
                      + ("; narrower layers stopped buying time" if floor else ""), stacklevel=3)
    macs = count_complexity(result, example_inputs=example_inputs).macs
    result.norton_auto_report = AutoReport(  # type: ignore[assignment]
        target_macs=None, macs_before=plan.macs_before, macs_after=int(macs), predicted_change=allocation.cost,
        widths=plan.widths, ranks=plan.ranks, methods=plan.methods, recovery=plan.recovery, target_latency_ms=target_ms,
        latency_before_ms=times["reference"], latency_after_ms=times["result"],
        latency_predicted_ms=allocation.macs, latency_passes=history,
        latency_table={"path": str(table.path), "points": len(table.entries), "timed": table.timed},
    )
    return result


@dataclass
class _Plan:
    widths: dict[str, tuple[int, int]]  # group's first layer -> (kept, channels), pruned groups only
    ranks: dict[str, Any]  # decomposed layer -> rank ((R1, R2) for tucker2)
    original_macs: int  # the original model's (before its first norton operation), which target_macs divides
    macs_before: int  # the input model's
    recovery: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)  # decomposed layer -> method


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
    parts: tuple[str, ...] | None = None, methods: Sequence[str] = ("cp-filter",),
) -> _Search:
    from norton.decomposition.decompose import eligible_convs
    from norton.pruning.budget import MacModel
    from norton.pruning.criteria import get_criterion
    from norton.pruning.engine import _group_scores
    from norton.pruning.groups import filter_layer, side_of, traced
    from norton.pruning.surgery import IN

    work, graph, groups = traced(model, example_inputs, ignored_layers, False, detector_parts=parts)
    work.eval()
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    inside = parts_predicate(parts)  # a detector: its parts' MACs only
    widths = MacModel(work, example_inputs, groups, include=inside)
    leaf_names = widths.leaf_names
    convs = {
        name: conv for name, conv in eligible_convs(work).items()
        if name in leaf_names and isinstance(conv, nn.Conv2d) and (inside is None or inside(name))
    }
    shapes = module_input_shapes(work, convs, example_inputs, eval_mode=True)
    # Every method's options per layer; after their sensitivity, the Pareto frontier of them is kept.
    candidates: dict[str, list[LayerOption]] = {}
    for name, conv in convs.items():
        found = decomposition_options(conv, shapes[name][-2:], methods, ranks)
        if found:
            candidates[name] = found
    original = parts_macs(model, example_inputs, parts, original=True)

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
    # One unit per layer and method: a method's options are a chain (a lower rank never costs less).
    kernels = _option_kernels(convs, candidates)
    chains = [
        (name, chain) for name, found in candidates.items()
        for chain in ([o for o in found if o.method == m] for m in methods) if chain
    ]
    units.extend(
        decompose_unit(name, convs[name], [None, *(kernels[name, o.method, o.rank] for o in chain)])
        for name, chain in chains
    )
    curves = iter(sensitivity_curves(
        _calibrated(work, parts), inputs[:_images(inputs, sensitivity_images)], units, samples=samples,
        progress=progress,
    ))
    prune_curves = [
        Curve("prune", g.layers[0], [g.channels], [0.0]) if g.protected else next(curves) for g in groups
    ]
    options, decompose_curves = _frontier(convs, widths.weight, leaf_names, chains, list(curves))
    macs = ChoiceMacs(widths, options, leaf_names)
    return _Search(work, list(groups), options, macs, prune_curves, decompose_curves, int(original), round_to)


def _check_methods(methods: Sequence[str] | None, *, latency: bool) -> tuple[str, ...]:
    """The decomposition methods offered: known names, no duplicates; ``UserError`` in one line otherwise."""
    from norton.decomposition.methods import METHODS as KNOWN

    if methods is None:
        return ("cp-filter",) if latency else METHODS
    if isinstance(methods, str) or not isinstance(methods, Iterable):
        raise UserError(f"auto_compress methods must be a sequence of names such as ('cp-filter', 'tucker2'), "
                        f"got {methods!r:.40}")
    names = tuple(dict.fromkeys(methods))
    for name in names:
        if name not in KNOWN:
            raise UserError(f"unknown decomposition method {name!r:.40} in auto_compress methods; use any of "
                            f"{', '.join(KNOWN)}")
    if latency and set(names) - {"cp-filter"}:
        raise UserError("target_latency predicts cp-filter blocks only: pass methods=('cp-filter',), or use "
                        "target_macs to offer tucker2, cp-layer or svd")
    return names


_SWEEPS = {"cp-filter": 25, "tucker2": 10, "cp-layer": 10}  # short fits: the curves need the error's size only


def _reconstructed(method: str, ranks: Sequence[Any], weights: list[Tensor]) -> list[list[Tensor]]:
    """``[rank][layer]``: the kernels ``method`` at each of ``ranks`` stands for, batched over ``weights``
    (one shape, except for cp-filter, whose batched CP-ALS takes any)."""
    if method == "cp-filter":
        from norton.decomposition.cp_als import cp_als_many
        from norton.decomposition.cp_tensor import cp_to_tensor

        return [[cp_to_tensor(f) for f, _ in cp_als_many(weights, r, n_iter_max=_SWEEPS[method], tol=1e-4)]
                for r in ranks]
    stacked = torch.stack(weights)  # (B, N, C, k_h, k_w)
    if method == "tucker2":
        from norton.decomposition.tucker2 import tucker2, tucker2_to_tensor

        return [list(tucker2_to_tensor(tucker2(stacked, r, n_iter_max=_SWEEPS[method], tol=1e-4)[0]).unbind(0))
                for r in ranks]
    if method == "cp-layer":
        from norton.decomposition.layer_cp import layer_cp, layer_cp_to_tensor

        return [list(layer_cp_to_tensor(layer_cp(stacked, r, n_iter_max=_SWEEPS[method], tol=1e-4)[0]).unbind(0))
                for r in ranks]
    from norton.decomposition.svd import spatial_svd, spatial_svd_to_tensor

    # One SVD at the highest rank: its leading r components are the rank-r truncation.
    vertical, horizontal, _ = spatial_svd(stacked, max(ranks))  # (B, R, C, k_h, 1), (B, N, R, 1, k_w)
    return [list(spatial_svd_to_tensor(vertical[:, :r], horizontal[:, :, :r]).unbind(0)) for r in ranks]


def _option_kernels(convs: dict[str, nn.Conv2d], candidates: dict[str, list[LayerOption]],
                    ) -> dict[tuple[str, str, Any], Tensor]:
    """Each candidate's reconstructed kernel by ``(layer, method, rank)``: one batched fit per method and rank
    over the layers of one kernel shape and the same candidate ranks (cp-filter: over every layer)."""
    jobs: dict[tuple[str, tuple[Any, ...], tuple[int, ...]], list[str]] = {}
    for name, found in candidates.items():
        for method in dict.fromkeys(o.method for o in found):
            ranks = tuple(o.rank for o in found if o.method == method)
            for key in ([(method, (r,), ()) for r in ranks] if method == "cp-filter"
                        else [(method, ranks, tuple(convs[name].weight.shape))]):
                jobs.setdefault(key, []).append(name)
    kernels = {}
    for (method, ranks, _), names in jobs.items():
        fitted = _reconstructed(method, ranks, [convs[n].weight.detach() for n in names])
        for rank, layers in zip(ranks, fitted, strict=True):
            for name, kernel in zip(names, layers, strict=True):
                kernels[name, method, rank] = kernel.to(convs[name].weight.dtype)
    return kernels


def _frontier(
    convs: dict[str, nn.Conv2d], dense_weight: Tensor, leaf_names: Sequence[str],
    chains: Sequence[tuple[str, list[LayerOption]]], curves: Sequence[Curve],
) -> tuple[dict[str, list[LayerOption]], list[Curve]]:
    """Per layer, dense then the options no other beats on both MACs (at full widths) and output change,
    most MACs first, with their curve: the allocator moves along it one way."""
    points: dict[str, list[tuple[float, float, LayerOption]]] = {}
    for (name, chain), curve in zip(chains, curves, strict=True):
        points.setdefault(name, []).extend(
            (option_macs(o, convs[name]), cost, o) for o, cost in zip(chain, curve.costs[1:], strict=True))
    options: dict[str, list[LayerOption]] = {}
    frontier_curves = []
    for name, found in points.items():
        kept, least = [], float("inf")
        for _, cost, option in sorted(found, key=lambda p: (p[0], p[1])):  # fewest MACs first
            if cost <= least:  # more MACs must buy a smaller change (ties kept: one method's chain is unchanged)
                kept.append((cost, option))
                least = cost
        kept.reverse()
        dense = LayerOption("dense", None, (float(dense_weight[leaf_names.index(name)]), 0.0, 0.0, 0.0))
        options[name] = [dense, *(option for _, option in kept)]
        frontier_curves.append(Curve("decompose", name, list(range(len(kept) + 1)), [0.0, *(c for c, _ in kept)]))
    return options, frontier_curves


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
            plan.methods[name] = option.method
    return plan


def _listed(layers: Iterable[str | nn.Module]) -> list[str | nn.Module]:
    return [layers] if isinstance(layers, (str, nn.Module)) else list(layers)


def _calibrated(model: nn.Module, parts: tuple[str, ...] | None) -> nn.Module:
    """What the calibration batches run through: the model, or a detector's FPN and RPN outputs."""
    if parts is None:
        return model
    from norton.detection.features import DetectorFeatures

    return DetectorFeatures(model)


def _apply(
    model: nn.Module, example_inputs: ExampleInputs, plan: _Plan, inputs: Sequence[Tensor], criterion: str,
    recover: bool, parts: tuple[str, ...] | None = None,
) -> nn.Module:
    """Prune to the chosen widths, recover, decompose at the chosen ranks, recover; a new model."""
    from norton.decomposition.decompose import decompose
    from norton.pruning.engine import prune

    result = copy.deepcopy(model)
    if plan.widths:
        # int(C * (1 - ratio)) must give exactly the kept width: aim half a channel above it.
        ratio = {layer: (channels - kept - 0.5) / channels for layer, (kept, channels) in plan.widths.items()}
        prune(result, example_inputs, ratio=ratio, criterion=criterion, detector_parts=parts)
        if recover:
            from norton.recovery import recalibrate_batchnorm, refit_pruned_consumers

            errors = refit_pruned_consumers(_calibrated(model, parts), _calibrated(result, parts), inputs)
            recalibrate_batchnorm(_calibrated(result, parts), inputs)
            plan.recovery["pruned_consumers"] = len(errors)
    if plan.ranks:
        pruned = copy.deepcopy(result) if recover else None
        for method in dict.fromkeys(plan.methods.values()):  # one plan record per method
            chosen = {name: rank for name, rank in plan.ranks.items() if plan.methods[name] == method}
            decompose(result, chosen, method=method, progress=False, detector_parts=parts)
        if recover and pruned is not None:
            from norton.recovery import recalibrate_batchnorm, refit_cp_blocks

            errors = refit_cp_blocks(_calibrated(pruned, parts), _calibrated(result, parts), inputs)
            recalibrate_batchnorm(_calibrated(result, parts), inputs)
            plan.recovery["refitted_blocks"] = len(errors)
    result.train(model.training)
    return result
