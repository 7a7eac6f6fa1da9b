"""The NORTON compression path as one function: decompose, fine-tune, prune, fine-tune, report.

:func:`compress` takes a trained model and data loaders and runs the paper's
framework in either order (``"decompose-prune"``, NORTON's, or
``"prune-decompose"``). Each stage lives in its own folder under ``output_dir``:
``start.pt`` (the model before fine-tuning), the fine-tuning run's
``metrics.jsonl``/``last.pt``/``best.pt``, and ``final.pt`` with the stage's
measurements. A killed run continues with ``resume=True``: finished stages are
loaded, an unfinished fine-tuning resumes from its ``last.pt``.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from norton.complexity import count_complexity

# Re-exported: the arguments of compress() are defined (and checked without torch) there.
from norton.compress_arguments import (
    FineTune,
    check_compress_arguments,
    check_compress_output,
    resolve_criterion,
    resolve_order,
)
from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.decompose import RankSpec, decompose, eligible_convs, replay_decompose
from norton.deploy.forms import forms_restored
from norton.detection.parts import check_parts, layers_in_parts, parts_macs
from norton.example_inputs import takes_image_list
from norton.limits import (
    check_input_size,
    check_rank,
)
from norton.serialization import load_checkpoint, model_from_state, save
from norton.training.checkpoint import cpu_state_dict
from norton.training.distributed import resolve_device
from norton.training.loaders import Loaders
from norton.training.loop import evaluate, fit


@dataclass
class CompressionResult:
    """What :func:`compress` returns: the compressed model and one measurement per stage."""

    model: nn.Module
    stages: list[dict[str, Any]]
    channels: dict[str, dict[str, int]] = field(default_factory=dict)


def output_channels(model: nn.Module) -> dict[str, int]:
    """``{layer: out_channels}`` for every CPDBlock and plain conv (not those inside blocks)."""
    inside = {f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, CPDBlock) for child, _ in m.named_modules() if child}
    return {
        name: m.out_channels
        for name, m in model.named_modules()
        if isinstance(m, (CPDBlock, nn.Conv2d)) and name not in inside
    }


class Task(Protocol):
    """What a stage needs from the kind of model: its score, its fine-tuning and its complexity.

    :class:`ClassificationTask` (top-1 with :func:`norton.fit`) and
    :class:`norton.detection.task.DetectionTask` (COCO AP with ``train_detector``).
    """

    metric: str  # the stage record's key of the score ("top1", "AP")
    label: str  # how the score is named in the log ("top-1", "AP")

    def example(self) -> Any:
        """Example inputs to trace the model on (a batch tensor, or a detector's list of images)."""
        ...

    def before_split(self) -> str:
        """The split that scores a stage's model before fine-tuning ("validation" or "test")."""
        ...

    def score(self, model: nn.Module, *, before: bool) -> dict[str, Any]:
        """The record's scores on the test split (``before``: on :meth:`before_split`), ``metric`` among them."""
        ...

    def fine_tune(self, model: nn.Module, recipe: FineTune, folder: Path | None, *, resume: bool, seed: int,
                  stage: str, teacher: nn.Module | None) -> float | None:
        """Fine-tune ``model`` in place by ``recipe``, checkpointing into ``folder`` (resumable); leaves it
        holding its best epoch and returns that epoch's validation ``metric`` (``None`` without a
        validation split)."""
        ...

    def complexity(self, model: nn.Module) -> dict[str, int]:
        """``{"macs": ..., "params": ...}`` of ``model``."""
        ...


@dataclass
class ClassificationTask:
    """Top-1 on the loaders' splits, fine-tuning by :func:`norton.fit`, MACs on one ``(C, H, W)`` image."""

    loaders: Loaders
    input_size: tuple[int, ...]
    device: torch.device
    progress: bool = True
    metric: str = "top1"
    label: str = "top-1"

    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_size)

    def before_split(self) -> str:
        return "validation" if self.loaders.val is not None else "test"

    def score(self, model: nn.Module, *, before: bool) -> dict[str, Any]:
        # Before fine-tuning only the validation split is scored: it is smaller, and the number
        # only says how much the step itself cost.
        loader = self.loaders.val if before and self.loaders.val is not None else self.loaders.test
        metrics = evaluate(model.to(self.device), loader, device=self.device)
        return {"top1": metrics["top1"], "top5": metrics["top5"], "test_loss": metrics["loss"]}

    def fine_tune(self, model: nn.Module, recipe: FineTune, folder: Path | None, *, resume: bool, seed: int,
                  stage: str, teacher: nn.Module | None) -> float | None:
        return fit(
            model, self.loaders, epochs=recipe.epochs, lr=recipe.lr, momentum=recipe.momentum,
            weight_decay=recipe.weight_decay, warmup_epochs=recipe.warmup_epochs,
            label_smoothing=recipe.label_smoothing, amp=recipe.amp, teacher=teacher,
            distill_alpha=recipe.distill_alpha, distill_temperature=recipe.distill_temperature,
            device=self.device, output_dir=folder, resume=resume, seed=seed, progress=self.progress,
            args={"stage": stage}, training_form=None,  # compress chose each block's form by timing (_use_training_forms)
        ).best_val_top1

    def complexity(self, model: nn.Module) -> dict[str, int]:
        counted = count_complexity(model, tuple(self.input_size))
        return {"macs": int(counted.macs), "params": int(counted.params)}


def compress(
    model: nn.Module,
    loaders: Loaders,
    *,
    input_size: Sequence[int],
    rank: RankSpec | None,
    compress_rate: str | Sequence[float] | None = None,
    ratio: float | Mapping[str, float] | None = None,
    target_macs: float | None = None,
    target_latency: float | str | None = None,
    criterion: str | None = None,
    round_to: int | None = None,
    order: str | None = None,
    decompose_method: str = "cp-filter",
    decompose_finetune: FineTune | None = None,
    prune_finetune: FineTune | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    detector_parts: Sequence[str] | None = None,
    calibration_distill_steps: int = 0,
    prune_ranks: bool = False,
) -> CompressionResult:
    """Compress a trained ``model`` with NORTON and fine-tune after each step.

    Args:
        model: a trained model (it is not modified; a copy is compressed): a classifier, or a
            torchvision detector (:func:`norton.detection.create_detector`), whose stages are scored
            by COCO AP and fine-tuned by :func:`norton.detection.train.train_detector`
            (:class:`norton.detection.task.DetectionTask`; ``detector_parts`` says what is compressed).
        loaders: train/val/test loaders; the best fine-tuning epoch is chosen on
            ``val``, the reported accuracies are on ``test``. A detector's are detection loaders
            (:func:`norton.detection.coco.detection_loader`).
        input_size: ``(C, H, W)`` of one image, for MACs and tracing (a detector: ``(3, S, S)``, the
            square image side the MACs are counted at).
        rank: the decomposition's rank (an int, a Tucker-2 pair, a spec such as ``"vbmf"``, a mapping or
            a rule, see :func:`norton.decomposition.decompose.decompose`); ``None`` skips decomposition.
        compress_rate, ratio, target_macs: how much to prune (at most one; none skips
            pruning). ``target_macs`` is the fraction of the *original* model's MACs
            the final model keeps, whatever the order.
        target_latency: instead of ``target_macs``, a latency budget for ``order="auto"``: a fraction
            of the model's latency or ``"12ms"``, measured at batch 1 on the run's device
            (:func:`norton.auto_compress`, docs/latency.md).
        decompose_method: ``"cp-filter"`` (NORTON's CPDBlocks), ``"tucker2"``, ``"cp-layer"`` or ``"svd"``
            (:mod:`norton.decomposition.methods`).
        criterion: pruning criterion name (``pabs``, ``csa``, ``vbd``, ``l1``, ``random``, ...);
            ``None``: ``l1`` for ``order="auto"``, the paper's ``pabs`` otherwise.
        round_to: make every pruned width a multiple of this (``ratio`` and ``target_macs``;
            e.g. 16 for the 16-channel blocks of oneDNN and onnxruntime on AVX-512 CPUs).
        order: ``"decompose-prune"`` (NORTON), ``"prune-decompose"``, or ``"auto"``: one stage,
            :func:`norton.auto_compress` to ``target_macs`` with 512 training images (labels
            unused) as calibration, fine-tuned with ``prune_finetune``. ``None``: ``"auto"`` when
            only ``target_macs`` is given, else ``"decompose-prune"``.
        decompose_finetune, prune_finetune: recipes of the two fine-tuning stages. A stage whose
            recipe has ``distill=True`` distils from the uncompressed ``model`` (a frozen copy taken
            before the first stage) as its teacher.
        output_dir: where stage folders go; ``None`` writes nothing (no resume).
        resume: continue a killed run in ``output_dir``.
        detector_parts: a detector's parts to compress (default its body; :mod:`norton.detection.parts`).
        calibration_distill_steps: with ``order="auto"``, train the compressed model this many steps to
            reproduce ``model``'s outputs on the calibration images before fine-tuning (auto_compress's
            ``distill_steps``; classifiers only). Default 0.
        prune_ranks: on NORTON's path with a single ``ratio`` or ``target_macs``, let pruning cut the
            ranks of layer-level decomposed blocks (``decompose_method`` ``tucker2``, ``cp-layer``,
            ``svd``) with their widths (:func:`norton.prune`). Default off.
    """
    order = resolve_order(order, rank=rank, compress_rate=compress_rate, ratio=ratio, target_macs=target_macs,
                          target_latency=target_latency)
    criterion = resolve_criterion(criterion, order)
    amounts = check_compress_arguments(
        rank=rank, compress_rate=compress_rate, ratio=ratio, target_macs=target_macs, criterion=criterion,
        round_to=round_to, order=order, decompose_finetune=decompose_finetune, prune_finetune=prune_finetune,
        target_latency=target_latency, calibration_distill_steps=calibration_distill_steps, prune_ranks=prune_ranks,
    )
    shape = check_input_size(input_size)
    input_size = shape[1:] if len(shape) == 4 else shape  # one sample: (C, H, W)
    check_rank_fits(model, rank, decompose_method)
    out = Path(output_dir) if output_dir is not None else None
    check_compress_output(out, resume=resume)
    device = resolve_device(device)
    decompose_finetune = decompose_finetune or FineTune()
    prune_finetune = prune_finetune or FineTune()
    task: Task
    parts = check_parts(model, detector_parts)  # None for a classifier (UserError if it was given parts)
    if takes_image_list(model):
        from norton.detection.task import DetectionTask

        task = DetectionTask(loaders, tuple(input_size), device, progress=progress)
        assert parts is not None  # a detector
        task.check(decompose_finetune, prune_finetune, order=order, target_latency=target_latency,
                   compress_rate=compress_rate, parts=parts)
    else:
        task = ClassificationTask(loaders, tuple(input_size), device, progress=progress)
    example: Any = task.example()  # a batch tensor, or a detector's list of images

    model = copy.deepcopy(model).to("cpu")
    # Knowledge distillation's teacher: the uncompressed model, frozen before any stage changes its copy.
    distill = any(f.distill and f.epochs > 0 for f in (decompose_finetune, prune_finetune))
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if distill else None
    baseline = {"name": "baseline", **task.complexity(model), **task.score(model, before=False)}
    model.to("cpu")
    stages = [baseline]
    channels = {"baseline": output_channels(model)}
    log(f"baseline: test {task.label} {baseline[task.metric]:.2f}%  MACs {baseline['macs']:,}  "
        f"params {baseline['params']:,}")

    def decompose_step(m: nn.Module) -> nn.Module:
        assert rank is not None  # the step is only added with a rank
        decompose(m, rank, method=decompose_method, example_inputs=example, seed=seed, progress=progress,
                  detector_parts=parts)
        return m

    def prune_step(m: nn.Module) -> nn.Module:
        amount = dict(amounts)
        if target_macs is not None:
            # prune() keeps target_macs of the *original* model's MACs, so after decomposing
            # it is passed as is. Pruning first, the decomposition still to come lowers the
            # MACs again: prune to target / (MACs after / before decomposing) to end at target.
            goal = target_macs
            if order == "prune-decompose" and rank is not None:
                goal = target_macs / _decomposition_ratio(m, rank, example, decompose_method, parts)
            original = parts_macs(m, example, parts, original=True)
            current = parts_macs(m, example, parts)
            if goal >= 1 or current <= goal * original:
                log(f"prune: the model is already at {current / original:.1%} of the original's MACs; nothing to prune")
                return m
            amount["target_macs"] = goal
        return _prune(m, example, criterion=criterion, round_to=round_to, detector_parts=parts,
                      prune_ranks=prune_ranks, **amount)

    def auto_step(m: nn.Module) -> nn.Module:
        from norton.auto import auto_compress

        # check_compress_arguments requires exactly one of the two budgets for "auto"
        budget = {"target_latency": target_latency} if target_latency is not None else {"target_macs": target_macs}
        return auto_compress(m, example, calibration=loaders.train, criterion=criterion, progress=progress,
                             detector_parts=parts, distill_steps=calibration_distill_steps, **budget)

    steps: list[tuple[str, Callable[[nn.Module], nn.Module], FineTune]] = []
    do_prune = bool(amounts)
    if order == "auto":
        steps.append(("auto", auto_step, prune_finetune))
    elif order == "decompose-prune":
        if rank is not None:
            steps.append(("decomposed", decompose_step, decompose_finetune))
        if do_prune:
            steps.append(("pruned", prune_step, prune_finetune))
    else:
        if do_prune:
            steps.append(("pruned", prune_step, prune_finetune))
        if rank is not None:
            steps.append(("decomposed", decompose_step, decompose_finetune))

    for name, step, recipe in steps:
        model, record = _run_stage(
            name, model, step, recipe, task, out=out, resume=resume, seed=seed, log=log,
            teacher=teacher if recipe.distill else None,
        )
        stages.append(record)
        channels[name] = output_channels(model)
    return CompressionResult(model=model, stages=stages, channels=channels)


def check_rank_fits(model: nn.Module, rank: RankSpec | None, method: str = "cp-filter") -> None:
    """An int ``rank`` suits every layer :func:`decompose` would replace with ``method`` (before any work)."""
    from norton.decomposition.methods import get_method

    decomposition = get_method(method)  # UserError naming the known methods
    if isinstance(rank, bool) or not isinstance(rank, int):
        return  # None, a pair, a spec, a mapping or a rule: decompose() checks each layer before any work
    check_rank(rank)
    for name, layer in eligible_convs(model, method=method).items():
        decomposition.check_rank(rank, layer, f"rank for layer {name!r}")


def _run_stage(
    name: str,
    model: nn.Module,
    step: Callable[[nn.Module], nn.Module],
    recipe: FineTune,
    task: Task,
    *,
    out: Path | None,
    resume: bool,
    seed: int,
    log: Callable[[str], None],
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    folder = out / name if out is not None else None
    if resume and folder is not None and (folder / "final.pt").exists():
        checkpoint = load_checkpoint(folder / "final.pt")
        log(f"{name}: finished in an earlier run ({folder / 'final.pt'})")
        return model_from_state(checkpoint), dict(checkpoint["metadata"]["stage"])
    started = time.perf_counter()
    if resume and folder is not None and (folder / "start.pt").exists():
        model = model_from_state(load_checkpoint(folder / "start.pt"))
    else:
        model = step(model)
        if folder is not None:
            save(model, folder / "start.pt", stage=name)
    split = task.before_split()
    # Training forms compute the same function faster (e.g. one dense conv rebuilt
    # from the factors); they serve the evaluations too, and are undone before
    # the MACs are counted and the model is saved.
    with forms_restored(model):
        if isinstance(task, ClassificationTask):
            _use_training_forms(model, task)
        before = task.score(model, before=True)
        log(f"{name}: {split} {task.label} {before[task.metric]:.2f}% before fine-tuning")
        kept_start = False
        if recipe.epochs > 0:
            # The model before fine-tuning is a candidate too ("epoch 0"): a fine-tuning whose best
            # validation epoch scores below it (too high an lr for a model that recovery already
            # brought close) is undone. Judged on validation only, never on the test split.
            start_state = cpu_state_dict(model) if split == "validation" else None
            best = task.fine_tune(model, recipe, folder,
                                  resume=resume and folder is not None and (folder / "last.pt").exists(),
                                  seed=seed, stage=name, teacher=teacher)
            if start_state is not None and best is not None and best < before[task.metric]:
                kept_start = True
                model.load_state_dict(start_state)
                log(f"{name}: fine-tuning's best validation {task.label} {best:.2f}% is below the "
                    f"{before[task.metric]:.2f}% before it: keeping the model before fine-tuning")
            del start_state
        test = task.score(model, before=False)
    model.to("cpu")
    record: dict[str, Any] = {"name": name, **task.complexity(model), **test}
    record.update({f"{split}_{task.metric}_before_finetune": before[task.metric], "finetune_epochs": recipe.epochs,
                   "kept_model_before_finetune": kept_start, "seconds": time.perf_counter() - started})
    log(f"{name}: test {task.label} {record[task.metric]:.2f}% after {recipe.epochs} fine-tuning epoch(s), "
        f"MACs {record['macs']:,}")
    if folder is not None:
        save(model, folder / "final.pt", stage=record)
    return model, record


def _prune(model: nn.Module, example: Any, **kwargs: Any) -> nn.Module:
    from norton.pruning.engine import prune

    return prune(model, example, **kwargs)


def _decomposition_ratio(model: nn.Module, rank: RankSpec, example: Any, method: str,
                         parts: Sequence[str] | None = None) -> float:
    """MACs after / before decomposing ``model`` at ``rank`` (of a detector's ``parts``), from structure alone."""
    if not isinstance(rank, int):
        return 1.0  # rules pick ranks from the weights: no estimate before pruning
    probe = copy.deepcopy(model)
    layers = layers_in_parts(probe, eligible_convs(probe, method=method), parts, method)
    replay_decompose(probe, {"op": "decompose", "method": method, "ranks": dict.fromkeys(layers, rank)})
    return parts_macs(probe, example, parts) / parts_macs(model, example, parts)


def _use_training_forms(model: nn.Module, task: ClassificationTask) -> None:
    """Switch CPDBlocks to their fastest training implementation (same parameters and function)."""
    if not any(isinstance(m, CPDBlock) for m in model.modules()):
        return
    from norton.deploy.optimize import optimize_for_training

    model.to(task.device)
    optimize_for_training(model, torch.zeros(8, *task.input_size, device=task.device))
