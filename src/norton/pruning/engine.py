"""Structural pruning of any ``nn.Module``: :func:`prune` and :func:`plan_prune`.

``prune(model, example_inputs, ratio=0.5)`` removes output filters of CPDBlocks
and plain convolutions and slices every consumer: batch norms (statistics of
the kept channels are kept exactly), the next layers' input channels, linear
layers after a flatten, channels coupled by residual additions, concatenations
and depthwise convolutions. One code path serves every architecture:

1. trace the model once into a dependency graph and split its channels into
   *coupled groups* (:mod:`norton.pruning.groups`);
2. decide how many channels each group keeps (:mod:`norton.pruning.budget`:
   ``ratio``, the zoo's ``compress_rate`` or ``target_macs`` of the original model);
3. score each group's channels with the criterion (:mod:`norton.pruning.criteria`;
   mean over its layers of per-layer normalised rank scores) and remove the lowest,
   step by step, on a working copy (this module);
4. write what was removed as a plain-data record and replay it on the caller's
   model (:mod:`norton.pruning.plan`), which therefore changes only on success;
5. with ``calibration=``: refit the consumers of removed channels to reproduce the
   unpruned layers' outputs and re-estimate BatchNorm statistics (:mod:`norton.recovery`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.errors import UserError
from norton.example_inputs import ExampleInputs, model_device
from norton.limits import MAX_STEPS, check_int, check_ratios, check_target_macs
from norton.limits import check_round_to as check_round_to_value
from norton.pruning.budget import (
    MacModel,
    check_matches_zoo,
    check_round_to_widths,
    keep_from_compress_rate,
    keep_from_ratio,
    keep_from_target_macs,
)
from norton.pruning.criteria import filter_removal_order, get_criterion, importance_from_removal_order
from norton.pruning.groups import (
    CoupledGroup,
    Group,
    check_pruned_runs,
    check_single_path,
    coupled_groups,
    filter_layer,
    side_of,
    traced,
)
from norton.pruning.plan import RemovalLog, replay_prune
from norton.pruning.surgery import OUT, side_sizes

Criterion = Callable[[nn.Module], Tensor]  # layer -> removal order (N,), first removed first

__all__ = ["CoupledGroup", "check_round_to", "coupled_groups", "plan_prune", "prune", "replay_prune"]

NO_PRUNABLE_LAYERS = (
    "the model has no prunable layers (Conv2d with groups=1 or CPDBlock; Conv1d/Conv3d are not supported, "
    "and nn.Linear only with prune_linear=True): nothing to prune"
)


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
    calibration: Iterable[Any] | None = None,
    detector_parts: Sequence[str] | None = None,
    prune_ranks: bool = False,
) -> nn.Module:
    """Remove filters of ``model`` in place and return it; ``model`` is unchanged if this raises.

    Say how much in exactly one way:

    * ``ratio``: a fraction of filters to remove from every prunable layer, or a
      mapping ``{layer name or fnmatch pattern: fraction}`` (other layers kept);
      a layer keeps ``int(N * (1 - ratio))`` filters, at least one;
    * ``compress_rate``: the paper's per-layer list (or ``"[0.6]*6+[0.8]*7"``) for a
      zoo model: every layer ends with the width ``create_model(name,
      compress_rate=...)`` gives it, so published configurations are reproduced;
    * ``target_macs``: the fraction of the *original* model's MACs (conv + linear,
      on ``example_inputs``) to keep, where the original is the model before its
      first norton operation: after ``decompose``, ``target_macs=0.3`` still means
      30% of the uncompressed model. Met within 2% by one uniform ratio found by
      bisection, then refined a channel at a time; a model already at or under the
      target is refused.

    Args:
        model: any module; CPDBlocks and ``nn.Conv2d`` (``groups == 1``) are pruned
            (Conv1d/Conv3d are not). Its forward must take the same path for every
            input: tracing follows the example's path, and a model that runs other
            modules on other inputs (checked on two more inputs) is refused.
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors
            the model can run on (used to trace it and to measure MACs).
        criterion: a registered criterion name (:func:`norton.pruning.criteria.list_criteria`)
            or a callable ``(layer) -> removal order (N,)``.
        ignored_layers: names or modules whose output channels are kept (with
            their submodules). The layers producing the model's output are always kept.
        round_to: make every pruned width a multiple of this (e.g. 8 for tensor cores);
            a layer to prune that is narrower than ``round_to`` is refused.
        iterative_steps: remove the channels in this many steps, re-scoring the
            remaining filters after each (a criterion comparing filters with each
            other then sees the survivors only).
        prune_linear: also remove hidden units of ``nn.Linear`` layers.
        detector_parts: for a torchvision detector (``example_inputs`` a list of images), the
            parts pruned: ``("body",)`` by default, any of ``"body", "fpn", "rpn", "box_head",
            "mask_head", "keypoint_head"`` (:mod:`norton.detection.parts`); the widths outside
            them, and so the heads' outputs, are kept.
        calibration: unlabeled data to recover with before any fine-tuning: an iterable of
            batches, each an input tensor or an ``(input, target)`` pair (a DataLoader over a
            few hundred training images; targets are not read). After the surgery every
            layer that lost input channels is refitted by least squares to reproduce the
            unpruned layer's output, then BatchNorm statistics are re-estimated
            (:func:`norton.recovery.refit_pruned_consumers`, :func:`norton.recovery.recalibrate_batchnorm`).
            It is read and checked before anything else; the record notes how many images it had.
        prune_ranks: also prune the rank channels inside layer-level decomposed blocks (Tucker-2,
            layer CP, SVD), with a scalar ``ratio`` or ``target_macs`` only: the ratio then
            applies to every block's ranks too, so a block pruned after ``decompose`` does not keep
            a core sized for its unpruned widths. Off by default: ranks are the decomposition's
            decision (:mod:`norton.pruning.groups`).

    The record :func:`plan_prune` returns is applied with :func:`replay_prune`,
    which appends it to ``model.norton_plan``. Asking for a removal that removes
    nothing (no prunable layer, every layer protected, widths too small) is a ``UserError``.
    """
    inputs = None
    if calibration is not None:  # read and checked before any work: a bad iterable leaves the model as it is
        from norton.calibration import calibration_inputs, count_images

        inputs = calibration_inputs(calibration, example_inputs, device=model_device(model))
    record = plan_prune(
        model, example_inputs, ratio=ratio, compress_rate=compress_rate, target_macs=target_macs,
        criterion=criterion, ignored_layers=ignored_layers, round_to=round_to,
        iterative_steps=iterative_steps, prune_linear=prune_linear, detector_parts=detector_parts,
        prune_ranks=prune_ranks,
    )
    if inputs is None:
        return replay_prune(model, record)
    from norton.recovery import recalibrate_batchnorm, refit_pruned_consumers

    unpruned = copy.deepcopy(model)
    record["calibration_images"] = count_images(inputs)
    replay_prune(model, record)
    refit_pruned_consumers(unpruned, model, inputs)
    return recalibrate_batchnorm(model, inputs)


def check_round_to(round_to: int | None, compress_rate: Any) -> None:
    """``round_to`` is a whole number in ``[1, 4096]`` and is not combined with ``compress_rate``."""
    if round_to is None:
        return
    check_round_to_value(round_to)
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
    detector_parts: Sequence[str] | None = None,
    prune_ranks: bool = False,
) -> dict[str, Any]:
    """The ``{"op": "prune", ...}`` record :func:`prune` would apply, without changing ``model``.

    Same arguments as :func:`prune`. The pruning runs on a deep copy; the record
    lists the removed channels of every affected layer (see :mod:`norton.pruning.plan`).
    """
    amount = _check_amount(ratio, compress_rate, target_macs)
    check_int(iterative_steps, "iterative_steps", maximum=MAX_STEPS)
    check_round_to(round_to, compress_rate)
    if prune_ranks and (compress_rate is not None or isinstance(ratio, Mapping)):
        raise UserError("prune_ranks applies to a single ratio and to target_macs: a ratio mapping and compress_rate "
                        "name the model's layers, and rank channels are no layer of the model")
    score = _resolve_criterion(criterion)
    work, graph, groups = traced(model, example_inputs, ignored_layers, prune_linear, detector_parts=detector_parts,
                                 prune_ranks=prune_ranks)
    if not groups:
        raise UserError(NO_PRUNABLE_LAYERS)
    probes = check_single_path(work, example_inputs)  # before any scoring: a data-dependent forward fails fast
    modules = dict(work.named_modules())

    if "ratio" in amount:
        keep_from_ratio(groups, amount["ratio"], modules, round_to)
    elif "compress_rate" in amount:
        keep_from_compress_rate(groups, model, amount["compress_rate"])
    else:
        check_round_to_widths(groups, round_to)  # before the MACs count
        from norton.detection.parts import check_parts, parts_macs, parts_predicate

        parts = check_parts(model, detector_parts)  # a detector's target is a fraction of its parts' MACs
        macs = MacModel(work, example_inputs, groups, include=parts_predicate(parts))
        keep_from_target_macs(groups, macs, amount["target_macs"], round_to, model=model, example_inputs=example_inputs,
                              original=parts_macs(model, example_inputs, parts, original=True))
    _check_removes_something(groups, amount)

    log = RemovalLog()
    names = {module: name for name, module in modules.items()}
    for step in range(1, iterative_steps + 1):
        for group in groups:
            _prune_group(graph, group, step, iterative_steps, score, names, log)
    if "compress_rate" in amount:
        check_matches_zoo(work, model, amount["compress_rate"])
    check_pruned_runs(work, example_inputs, probes)

    label = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", type(criterion).__name__)
    info: dict[str, Any] = {"criterion": label, "amount": {k: _plain(v) for k, v in amount.items()}}
    if iterative_steps > 1:
        info["iterative_steps"] = iterative_steps
    if prune_ranks:
        info["prune_ranks"] = True
    record = log.record(**info)
    order = {name: i for i, name in enumerate(modules)}
    for key in ("removed", "removed_inputs"):  # model order reads better than discovery order
        record[key] = dict(sorted(record[key].items(), key=lambda item: order[item[0]]))
    return record


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
        given["ratio"] = check_ratios(given["ratio"])
    if "target_macs" in given:
        given["target_macs"] = check_target_macs(given["target_macs"])
    if "compress_rate" in given:
        from norton.compress_rate import parse_compress_rate

        parse_compress_rate(given["compress_rate"])  # a bad spec fails here, before any work
    return given


def _check_removes_something(groups: Sequence[Group], amount: Mapping[str, Any]) -> None:
    """``UserError`` when the amount asks for a removal but every group keeps all its channels."""
    if any(g.keep is not None and g.keep < g.channels for g in groups):
        return
    ratio = amount.get("ratio")
    asked = (
        any(v > 0 for v in ratio.values()) if isinstance(ratio, Mapping)
        else (ratio or 0) > 0 if "ratio" in amount
        else "compress_rate" in amount  # a compress rate equal to the model's widths removes nothing either
    )
    if not asked:
        return
    if all(g.protected for g in groups):
        reasons = sorted({g.protected for g in groups if g.protected})
        raise UserError(
            "nothing to prune: every prunable layer's channels are protected (" + "; ".join(reasons)
            + "): the layers producing the model's output keep their width"
        )
    widths = sorted({g.channels for g in groups if not g.protected})
    raise UserError(
        f"the amount asked removes no channel: the prunable layers have {', '.join(map(str, widths[:6]))} "
        "channels; ask for a larger ratio"
    )


def _resolve_criterion(criterion: str | Criterion) -> Criterion:
    if callable(criterion):
        return criterion
    if not isinstance(criterion, str):
        raise UserError(f"criterion must be a name or a callable (layer) -> order, got {type(criterion).__name__}")
    return get_criterion(criterion)  # UserError naming the known criteria


def _plain(value: Any) -> Any:
    """JSON-friendly copy of an amount (mappings to dicts, sequences to lists)."""
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [float(v) for v in value]
    return value


# ------------------------------------------------------------------- removal
def _prune_group(
    graph: tp.DependencyGraph, group: Group, step: int, steps: int, score: Criterion,
    names: Mapping[nn.Module, str], log: RemovalLog,
) -> None:
    """Remove this step's share of ``group``'s channels: the lowest combined scores go first."""
    to_remove = group.channels - (group.channels if group.keep is None else group.keep)
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
            side = side_of(graph, item.dep)
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
        if module not in names or side_of(graph, item.dep) != OUT or not filter_layer(module, prune_linear=True):
            continue
        order = filter_removal_order(module, score)  # (N_layer,), checked to be a permutation
        # Rank scores in [0, 1] (1 = removed last) make layers comparable whatever the criterion's scale.
        own = importance_from_removal_order(order).double() / max(order.numel() - 1, 1)  # (N_layer,)
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)
        roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
        total.index_add_(0, roots, own[idxs])
        count.index_add_(0, roots, torch.ones(len(idxs), dtype=torch.float64))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, 0.5))
