"""Distillation on the calibration images: a compressed model trained to match its original, no labels.

The least-squares refits of :mod:`norton.recovery` repair one layer at a time, each with the
layers before it fixed. What they leave is the error that only builds up across layers. A few
hundred steps of gradient descent on the whole compressed model (the *student*), so that its
outputs match the original model's (the *teacher*) on the same unlabeled calibration images,
removes much of it (data-free / few-shot distillation, e.g. Hinton et al. 2015 with the
teacher's outputs as the only targets):

* classifier outputs ``(B, K)``: ``T^2 KL(softmax(teacher / T) || softmax(student / T))``
  (:func:`norton.training.distillation.distillation_loss` with no labels);
* any other tensor output: the mean squared error relative to the teacher's mean square.

Batches are drawn from the calibration images with replacement across steps; images
``(B, C, H, W)`` are mirrored left-right half the time, and the teacher sees the same
mirrored image, so the target stays the teacher's answer for exactly what the student saw.
Every module stays in eval mode: BatchNorm keeps the statistics recovery re-estimated (a
calibration batch is too small to replace them) and dropout is off. Adam, learning rate
cosine-annealed to 0. Only weights change, never the structure, so plans replay unchanged.

On ResNet-20 (Fashion-MNIST) compressed by :func:`norton.auto_compress` to 0.1 of the MACs,
200 steps raise top-1 right after compression from 75.7% to 86.4%; after one fine-tuning
epoch on the full training set the gain is gone (docs/pareto.md), so this step is for models
used without fine-tuning, or without labels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.calibration import evaluating
from norton.errors import UserError
from norton.limits import check_finite, check_int
from norton.training.distillation import distillation_loss

__all__ = ["distill_on_calibration"]

TEMPERATURE = 4.0  # softens the teacher's classifier scores (Hinton et al.'s usual range, 2-5)


def output_mismatch(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """How far ``student``'s output is from ``teacher``'s, a scalar: KL at ``temperature`` for ``(B, K)``
    scores, else the mean squared error over the teacher's mean square."""
    if student.shape != teacher.shape:
        raise UserError(f"the compressed model's output {tuple(student.shape)} differs in shape from the "
                        f"original's {tuple(teacher.shape)}: distil a model compressed from that original")
    if student.ndim == 2:
        return distillation_loss(student, teacher, None, alpha=1.0, temperature=temperature)
    teacher = teacher.detach().float()
    return (student.float() - teacher).square().mean() / teacher.square().mean().clamp_min(1e-12)


def distill_on_calibration(
    teacher: nn.Module,
    student: nn.Module,
    inputs: Sequence[Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``student`` in place for ``steps`` steps to reproduce ``teacher``'s outputs on ``inputs``.

    Args:
        teacher: the uncompressed model (not changed; no gradient reaches it).
        student: the compressed model, on the same device; every parameter that requires a
            gradient is trained.
        inputs: calibration batches ``(B, ...)`` of one input shape (labels are never needed),
            e.g. from :func:`norton.calibration_inputs`.
        steps: optimiser steps (``0`` does nothing).
        lr: Adam's learning rate at the first step (cosine to 0 at the last).
        batch_size: images per step (at most the number of calibration images).
        temperature: the softmax temperature for classifier outputs.
        seed: draws the batches and the mirroring.

    Returns ``{"steps", "images", "mismatch_before", "mismatch_after"}``: the mismatch (the loss
    above, at ``temperature``) over all calibration images before and after.
    """
    check_int(steps, "calibration distillation steps", minimum=0, maximum=1_000_000)
    check_finite(lr, "calibration distillation lr", positive=True)
    check_int(batch_size, "calibration distillation batch size", maximum=1_000_000)
    check_finite(temperature, "calibration distillation temperature", positive=True)
    if not isinstance(inputs, Sequence) or not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise UserError("calibration inputs must be a non-empty list of input tensors: build them with "
                        "norton.calibration_inputs(calibration, example_inputs)")
    if len({tuple(x.shape[1:]) for x in inputs}) != 1:
        raise UserError("calibration distillation needs calibration batches of one input shape, got "
                        f"{sorted({tuple(x.shape[1:]) for x in inputs})}")
    images = torch.cat(list(inputs))  # (n, ...)
    params = [p for p in student.parameters() if p.requires_grad]
    modes = {module: module.training for module in student.modules()}
    before = _mismatch(teacher, student, images, batch_size, temperature)
    if steps == 0 or not params:
        return {"steps": 0, "images": len(images), "mismatch_before": before, "mismatch_after": before}
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(images))
    teacher_modes = {module: module.training for module in teacher.modules()}
    try:
        student.eval()
        teacher.eval()
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="distil on calibration", unit="step", disable=not progress, leave=False):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                batch = images[torch.randperm(len(images), generator=generator)[:size].to(images.device)]
                if batch.ndim == 4:
                    mirror = (torch.rand(len(batch), generator=generator) < 0.5).to(batch.device)
                    batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
                with torch.no_grad():
                    target = _tensor_output(teacher(batch))
                loss = output_mismatch(_tensor_output(student(batch)), target, temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for module, training in (modes | teacher_modes).items():
            module.training = training
    optimizer.zero_grad(set_to_none=True)
    after = _mismatch(teacher, student, images, batch_size, temperature)
    return {"steps": steps, "images": len(images), "mismatch_before": before, "mismatch_after": after}


def _tensor_output(output: Any) -> Tensor:
    if not isinstance(output, Tensor):
        raise UserError(f"calibration distillation needs a model whose output is one tensor, got a "
                        f"{type(output).__name__} (a detector's outputs are not supported)")
    return output


@torch.no_grad()
def _mismatch(teacher: nn.Module, student: nn.Module, images: Tensor, batch_size: int, temperature: float) -> float:
    """The mismatch over all ``images``, in eval mode: the batch losses weighted by batch size."""
    total = 0.0
    with evaluating(teacher), evaluating(student):
        for batch in images.split(batch_size):
            mismatch = output_mismatch(_tensor_output(student(batch)), _tensor_output(teacher(batch)), temperature)
            total += float(mismatch) * len(batch)
    return total / len(images)
