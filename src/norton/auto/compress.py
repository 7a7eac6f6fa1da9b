"""``auto_compress``: per-layer widths and decompositions chosen from data to meet a MACs budget.

Four steps, each in its own module:

1. **sensitivity** (:mod:`norton.auto.sensitivity`): on a few calibration images, how much
   the output changes when one coupled group of channels keeps 3/4, 1/2, 1/4, 1/8 of its
   channels (the ones the criterion would keep), or one convolution is replaced by a
   rank-4/2/1 CPDBlock;
2. **allocation** (:mod:`norton.auto.allocation`): a greedy multiple-choice knapsack on the
   exact MAC model (:mod:`norton.auto.costs`) picks every group's width and every
   layer's rank so the MACs land within 2% of the budget with the least summed change;
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from norton.auto.allocation import Allocation, allocate
from norton.auto.costs import ChoiceMacs, LayerOption, cp_filter_coefficients
from norton.auto.sensitivity import Curve, Unit, decompose_unit, prune_unit, sensitivity_curves
from norton.complexity import count_complexity, original_complexity
from norton.compress_arguments import AUTO_CRITERION
from norton.errors import UserError
from norton.example_inputs import ExampleInputs, model_device, module_input_shapes
from norton.limits import check_int, check_target_macs

FRACTIONS = (0.75, 0.5, 0.25, 0.125)  # kept fractions of a group whose output change is measured
RANKS = (4, 2, 1)  # CP ranks tried per 3x3 convolution (rank 4 costs about half of it)
MACS_TOLERANCE = 0.02


@dataclass
class AutoReport:
    """What :func:`auto_compress` chose and measured (``model.norton_auto_report``)."""

    target_macs: float
    macs_before: int
    macs_after: int
    predicted_change: float
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)  # group's first layer -> (kept, of)
    ranks: dict[str, int] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)


def auto_compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    target_macs: float,
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
) -> nn.Module:
    """A new model with ``target_macs`` of ``model``'s MACs (conv + linear, within 2%); ``model`` is unchanged.

    Args:
        model: any module :func:`norton.prune` can trace (one forward path, convolutions
            with ``groups == 1`` or depthwise).
        example_inputs: what the model runs on, e.g. ``torch.randn(1, 3, 32, 32)``; MACs are
            counted on it (per sample).
        target_macs: the fraction of the original model's MACs to keep, in (0, 1): the
            model before its first norton operation, as for :func:`norton.prune`.
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
    """
    from norton.calibration import calibration_inputs
    from norton.pruning.criteria import get_criterion

    target = check_target_macs(target_macs)
    if target >= 1:
        raise UserError(f"target_macs must lie in (0, 1) for auto_compress, got {target_macs!r}")
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

    allocation, plan = _plan(
        model, example_inputs, target, inputs, criterion=criterion, ranks=ranks, fractions=fractions,
        sensitivity_images=sensitivity_images, samples=samples, ignored_layers=ignored_layers, progress=progress,
    )
    result = _apply(model, example_inputs, plan, inputs[:_images(inputs, calibration_images)], criterion, recover)
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


def _plan(
    model: nn.Module, example_inputs: ExampleInputs, target: float, inputs: Sequence[Tensor], *,
    criterion: str, ranks: Sequence[int], fractions: Sequence[float], sensitivity_images: int, samples: int,
    ignored_layers: Iterable[str | nn.Module], progress: bool,
) -> tuple[Allocation, _Plan]:
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
    goal = target * original

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
        units.append(prune_unit(group.layers[0], torch.argsort(scores, stable=True), consumers, fractions))
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
    allocation = allocate(macs, prune_curves, decompose_curves, goal, tolerance=MACS_TOLERANCE)

    unchanged = float(macs(torch.tensor([g.channels for g in groups])[None],
                           torch.zeros(1, len(macs.layers), dtype=torch.long))[0])  # equals count_complexity(model)
    plan = _Plan(widths={}, ranks={}, original_macs=int(original), macs_before=round(unchanged))
    for group, kept in zip(groups, allocation.keep.tolist(), strict=True):
        if kept < group.channels:
            plan.widths[group.layers[0]] = (int(kept), group.channels)
    for name, index in zip(macs.layers, allocation.choice.tolist(), strict=True):
        option = options[name][index]
        if option.rank is not None:
            plan.ranks[name] = option.rank
    return allocation, plan


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
