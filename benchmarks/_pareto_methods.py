"""The compression methods of ``bench_pareto.py``: each makes a NEW model at a fraction of the baseline's MACs.

Every method is ``method(model, example, budget, calibration, seed) -> (compressed, details)``:
``model`` is left unchanged, ``budget`` is the fraction of its conv+linear MACs to keep
(:func:`norton.count_complexity`), ``calibration`` is a list of ``(images, labels)`` training
batches (512 images), ``details`` is plain data stored with the result (ranks, ratios, ...).

* ``dense``: the baseline itself, run at budget 1 only: the control that measures what the
  fine-tuning recipe alone does to an uncompressed model;
* ``auto``: :func:`norton.auto_compress` on the calibration images (no labels given);
* ``auto-all`` / ``auto-prune``: the same offered all four decompositions (layer CP too: the
  default until 2026-12-05) / none (pruning only): how the default's choice was made;
* ``auto-cp-filter``, ``auto-tucker2-svd``, ``auto-sensitivity-512``, ``auto-fine-fractions``,
  ``auto-calibration-distill``: the same with one option changed (:data:`METHODS` says which),
  tried against the goals missed at 0.2 and 0.1 of the MACs;
* ``auto-latency``: the same with ``target_latency=budget``: for this method (``_pareto_report.LATENCY_METHODS``)
  the budget is a fraction of the baseline's CPU latency at batch :data:`LATENCY_BATCH` (the batch
  the benchmark's latency column is timed at), not of its MACs;
* ``paper``: the paper's uniform path, :func:`norton.decompose` at rank :func:`paper_rank`, then
  :func:`norton.prune` with ``target_macs=budget`` and the ``pabs`` criterion;
* ``tp-*``: Torch-Pruning 1.6's documented pruner (``tp.pruner.BasePruner``, of which
  ``MetaPruner`` is the deprecated alias) with L1-magnitude, Taylor or LAMP importance, uniform
  (``global_pruning=False``) or global; its one ``pruning_ratio`` is found by bisection until
  norton's counter says the budget is met within 2%. The classifier keeps its outputs; the
  zoo ResNets' parameter-free padding shortcuts get norton's channel re-mapper
  (``customized_pruners``, a documented BasePruner argument), as Torch-Pruning needs for any
  custom layer.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import norton
from norton.decomposition.methods import METHODS as DECOMPOSITIONS

Batches = list[tuple[Tensor, Tensor]]
Method = Callable[[nn.Module, Tensor, float, Batches, int], tuple[nn.Module, dict[str, Any]]]

MACS_TOLERANCE = 0.02  # a budget is met when |MACs / (budget * baseline MACs) - 1| <= 2%
MAX_TRIALS = 24  # bisection steps on Torch-Pruning's pruning_ratio


def macs_fraction(model: nn.Module, reference_macs: int, example: Tensor) -> float:
    """``model``'s conv+linear MACs as a fraction of ``reference_macs`` (norton's counter)."""
    return norton.count_complexity(model, example_inputs=example).macs / reference_macs


# ------------------------------------------------------------------ norton
def auto(model: nn.Module, example: Tensor, budget: float, calibration: Batches, seed: int,
         **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`norton.auto_compress` with the calibration images only (labels are not given) and ``options``
    as its keyword arguments (none: its defaults)."""
    torch.manual_seed(seed)
    images = [x for x, _ in calibration]
    compressed = norton.auto_compress(model, example, target_macs=budget, calibration=images, progress=False, **options)
    plan = getattr(compressed, "norton_plan", [])
    report = getattr(compressed, "norton_auto_report", None)
    layers = Counter(getattr(report, "methods", {}).values())
    details = {"plan_ops": [record.get("op") for record in plan], "decomposed_layers": dict(sorted(layers.items()))}
    if getattr(report, "distillation", None):
        details["calibration_distillation"] = report.distillation
    return compressed, details


def _auto_with(**options: Any) -> Method:
    def method(model: nn.Module, example: Tensor, budget: float, calibration: Batches, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        return auto(model, example, budget, calibration, seed, **options)

    return method


LATENCY_BATCH = 64


def auto_latency(model: nn.Module, example: Tensor, budget: float, calibration: Batches,
                 seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`norton.auto_compress` with ``target_latency=budget`` at batch :data:`LATENCY_BATCH` on the CPU."""
    torch.manual_seed(seed)
    images = [x for x, _ in calibration]
    batch = example.expand(LATENCY_BATCH, *example.shape[1:]).contiguous()
    compressed = norton.auto_compress(model, batch, target_latency=budget, calibration=images, progress=False)
    report = compressed.norton_auto_report
    return compressed, {"plan_ops": [record.get("op") for record in getattr(compressed, "norton_plan", [])],
                        "target_latency_ms": report.target_latency_ms, "latency_before_ms": report.latency_before_ms,
                        "latency_after_ms": report.latency_after_ms, "latency_passes": report.latency_passes}


def paper_rank(budget: float) -> int:
    """The paper path's CP rank: 4 down to 0.3 of the MACs, 2 below (the decomposed model must stay above the budget).

    Each layer's rank is capped at its ``C_in * k`` (the single-channel stem: 3).
    """
    return 4 if budget >= 0.3 - 1e-9 else 2


def paper(model: nn.Module, example: Tensor, budget: float, calibration: Batches, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The paper's uniform path: decompose every conv at one rank, then prune to the budget with pabs."""
    rank = paper_rank(budget)
    work = copy.deepcopy(model)
    # A single-channel stem (Fashion-MNIST) allows rank <= 1 x 3: it gets its largest rank, 3 (exact).
    norton.decompose(work, lambda name, conv: min(rank, conv.in_channels * max(conv.kernel_size)), seed=seed,
                     progress=False)
    decomposed = macs_fraction(work, norton.count_complexity(model, example_inputs=example).macs, example)
    norton.prune(work, example, target_macs=budget, criterion="pabs")
    return work, {"rank": rank, "decomposed_macs_fraction": decomposed}


# ------------------------------------------------------------------ Torch-Pruning
def _importance(kind: str) -> Any:
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance()
    raise ValueError(f"unknown importance {kind!r}")


def _classifier(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear`` of ``model``: its outputs are the classes, never pruned."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear classifier to keep")
    return linears[-1]


def _with_gradients(model: nn.Module, calibration: Batches) -> nn.Module:
    """A copy of ``model`` holding the summed cross-entropy gradients of the calibration batches (Taylor)."""
    work = copy.deepcopy(model).eval()  # eval: BatchNorm statistics stay as they are
    work.zero_grad(set_to_none=True)
    for x, y in calibration:
        nn.functional.cross_entropy(work(x), y).backward()
    return work


def _copy_with_gradients(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` drops ``.grad``: copy them across (parameters come in the same order)."""
    work = copy.deepcopy(model)
    for source, target in zip(model.parameters(), work.parameters(), strict=True):
        target.grad = None if source.grad is None else source.grad.clone()
    return work


def tp_prune(
    model: nn.Module, example: Tensor, ratio: float, *, importance: str, global_pruning: bool,
    layer_ratios: Mapping[str, float] | None = None,
) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at ``pruning_ratio=ratio`` (``layer_ratios``: its
    ``pruning_ratio_dict``, by layer name); ``model``'s gradients, if any, are what Taylor scores."""
    import torch_pruning as tp

    from norton.pruning.surgery import customized_pruners

    work = _copy_with_gradients(model)
    pruner = tp.pruner.BasePruner(
        work, example, importance=_importance(importance), global_pruning=global_pruning, pruning_ratio=ratio,
        pruning_ratio_dict={work.get_submodule(name): r for name, r in (layer_ratios or {}).items()} or None,
        ignored_layers=[_classifier(work)], customized_pruners=customized_pruners(work),
    )
    pruner.step()
    work.zero_grad(set_to_none=True)
    return work


def tp_to_budget(
    model: nn.Module, example: Tensor, budget: float, calibration: Batches, *, importance: str, global_pruning: bool,
    tolerance: float = MACS_TOLERANCE,
) -> tuple[nn.Module, dict[str, Any]]:
    """Bisection on ``pruning_ratio`` until norton's MACs count is within ``tolerance`` of ``budget``.

    Pruned widths are integers, so the MACs fall in steps as the ratio grows: with one uniform
    ratio every layer of a width steps at once (ResNet-20 at 0.3: 0.317 or 0.276), and a global
    ratio steps by a whole residual-stream channel. When no ratio lands within the tolerance,
    the model just above the budget is trimmed by a second local Torch-Pruning pass (same
    importance) removing one more channel from each of its ``k`` deepest layers, ``k`` found by
    bisection (as norton's ``target_macs`` refines its uniform ratio a channel at a time). The
    closest trial is returned if even that misses (``details["budget_error"]`` says how close).
    """
    reference = norton.count_complexity(model, example_inputs=example).macs
    trials: list[tuple[float, float, dict[str, Any], nn.Module]] = []  # (relative error, fraction, settings, model)

    def trial(source: nn.Module, ratio: float, settings: dict[str, Any], layer_ratios: Mapping[str, float] | None = None,
              global_: bool = global_pruning) -> float:
        pruned = tp_prune(source, example, ratio, importance=importance, global_pruning=global_, layer_ratios=layer_ratios)
        fraction = macs_fraction(pruned, reference, example)
        trials.append((abs(fraction / budget - 1.0), fraction, settings, pruned))
        return fraction

    source = _with_gradients(model, calibration) if importance == "taylor" else model
    low, high = 0.0, 0.99  # MACs(low) > budget >= MACs(high) as far as the search knows
    ratio = 1.0 - budget ** 0.5  # uniform pruning of both sides of every conv: MACs ~ (1 - ratio)^2
    above: nn.Module | None = None  # the model at `low`: the least pruned one above the budget
    while len(trials) < MAX_TRIALS and high - low > 1e-4:
        fraction = trial(source, ratio, {"pruning_ratio": ratio, "trimmed_layers": 0})
        if abs(fraction / budget - 1.0) <= tolerance:
            break
        if fraction > budget:
            low, above = ratio, trials[-1][3]
        else:
            high = ratio
        ratio = (low + high) / 2
    if min(t[0] for t in trials) > tolerance and above is not None:
        base = _with_gradients(above, calibration) if importance == "taylor" else above
        layers = [(name, m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
                  for name, m in base.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not _classifier(base)][::-1]
        layers = [(name, width) for name, width in layers if width >= 2]
        k_low, k_high = 0, len(layers)  # MACs(k_low) > budget >= MACs(k_high), as far as the search knows
        while k_high - k_low > 1 and len(trials) < 2 * MAX_TRIALS:
            k = (k_low + k_high) // 2
            settings = {"pruning_ratio": low, "trimmed_layers": k}
            fraction = trial(base, 0.0, settings, {name: min(0.99, 1.5 / width) for name, width in layers[:k]},
                             global_=False)
            if abs(fraction / budget - 1.0) <= tolerance:
                break
            k_low, k_high = (k, k_high) if fraction > budget else (k_low, k)
    error, fraction, settings, pruned = min(trials, key=lambda t: t[0])
    return pruned.eval(), {**settings, "macs_fraction": fraction, "trials": len(trials), "budget_error": error}


def _tp_method(importance: str, global_pruning: bool) -> Method:
    def method(model: nn.Module, example: Tensor, budget: float, calibration: Batches, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(seed)
        return tp_to_budget(model, example, budget, calibration, importance=importance, global_pruning=global_pruning)

    return method


def dense(model: nn.Module, example: Tensor, budget: float, calibration: Batches, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The baseline itself, uncompressed: the control that shows what the fine-tuning recipe alone does.

    Run at budget 1 only (:data:`_pareto_report.FIXED_BUDGETS`).
    """
    return copy.deepcopy(model), {}


# Not in the default grid: auto_compress with other options, to show why its defaults are what they are.
# The one-option variants are left out of the plots (their rows are in the tables).
OPTION_VARIANTS = ("auto-cp-filter", "auto-tucker2-svd", "auto-sensitivity-512", "auto-fine-fractions",
                   "auto-calibration-distill")
VARIANTS = ("auto-all", "auto-prune", *OPTION_VARIANTS)
METHODS: dict[str, Method] = {
    "dense": dense,
    "auto": auto,
    # auto_compress offered all four decompositions, layer CP included (its default until 2026-12-05)
    "auto-all": _auto_with(methods=tuple(DECOMPOSITIONS)),
    "auto-prune": _auto_with(methods=()),  # auto_compress with pruning only
    # Tried against the misses at 0.2 and 0.1 of the MACs (docs/pareto.md, "What else was tried"):
    "auto-cp-filter": _auto_with(methods=("cp-filter",)),  # NORTON's blocks only
    "auto-tucker2-svd": _auto_with(methods=("tucker2", "svd")),
    "auto-sensitivity-512": _auto_with(sensitivity_images=512),  # 4x the images for the sensitivity curves
    "auto-fine-fractions": _auto_with(fractions=(0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)),  # finer widths
    "auto-calibration-distill": _auto_with(distill_steps=200),  # then 200 Adam steps matching the baseline
    "auto-latency": auto_latency,
    "paper": paper,
    "tp-l1-uniform": _tp_method("l1", False),
    "tp-l1-global": _tp_method("l1", True),
    "tp-taylor-uniform": _tp_method("taylor", False),
    "tp-lamp-global": _tp_method("lamp", True),
}
