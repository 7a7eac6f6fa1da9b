"""The compression pipeline's stages for a detector: COCO AP, the detection recipe, detector MACs.

:func:`norton.compress` runs the same stages for every model (compress, score before
fine-tuning, fine-tune resumably, score, count, save); what changes with the kind of model
is behind :class:`norton.pipeline.Task`. For a torchvision R-CNN:

* the score is COCO AP (:func:`norton.detection.evaluate.evaluate_detector`; keypoint AP for a
  Keypoint R-CNN, box AP otherwise, as :func:`norton.detection.train.primary_ap` chooses), with
  every AP/AR of every iou type in the stage record under ``"coco"``;
* fine-tuning is :func:`norton.detection.train.train_detector` (SGD with warm-up and the
  reference's steps scaled to the epochs; the best epoch on the validation split);
* MACs and params are :func:`norton.detection.complexity.detector_complexity`'s on one square
  image of the pipeline's ``input_size`` (the paper's protocol: a fixed number of proposals).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from norton.compress_arguments import FineTune
from norton.detection.parts import AUTO_PARTS
from norton.errors import UserError
from norton.training.loaders import Loaders


@dataclass
class DetectionTask:
    """AP on the loaders' splits (``test`` may be the validation loader), ``train_detector``, detector MACs."""

    loaders: Loaders
    input_size: tuple[int, ...]  # (3, S, S): MACs are counted on one S x S image
    device: torch.device
    progress: bool = True
    metric: str = "AP"
    label: str = "AP"
    warmup_iters: int = 100

    def check(self, *recipes: FineTune, order: str, target_latency: Any, compress_rate: Any,
              parts: tuple[str, ...]) -> None:
        """One-line errors for what a detector's pipeline cannot do, before any work."""
        if order == "auto" and set(parts) - set(AUTO_PARTS):
            raise UserError(f"auto_compress compresses a detector's {' and '.join(AUTO_PARTS)}, not its "
                            f"{', '.join(sorted(set(parts) - set(AUTO_PARTS)))}: give -r/--ratio for those parts")
        if any(recipe.distill and recipe.epochs > 0 for recipe in recipes):
            raise UserError("distillation is for classifiers: fine-tune a detector without --distill")
        if any(recipe.label_smoothing for recipe in recipes):
            raise UserError("label smoothing is for classifiers: a detector's losses are its own")
        if target_latency is not None:
            raise UserError("target_latency is for classifiers: give a detector target_macs (a fraction of the "
                            "compressed parts' MACs)")
        if compress_rate is not None:
            raise UserError("compress_rate names a zoo classifier's widths: prune a detector with ratio or target_macs")
        if self.input_size[-1] != self.input_size[-2]:
            raise UserError(f"a detector's input_size is (3, S, S), one square image side; got {self.input_size}")

    def example(self) -> list[torch.Tensor]:
        """One image of ``S x S``: detectors take a list of images."""
        return [torch.zeros(*self.input_size[-3:])]

    def before_split(self) -> str:
        return "validation" if self.loaders.val is not None else "test"

    def score(self, model: nn.Module, *, before: bool) -> dict[str, Any]:
        from norton.detection.evaluate import evaluate_detector
        from norton.detection.train import primary_ap

        loader = self.loaders.val if before and self.loaders.val is not None else self.loaders.test
        metrics = evaluate_detector(model.to(self.device), loader, progress=self.progress)
        return {"AP": primary_ap(metrics), "coco": metrics}

    def fine_tune(self, model: nn.Module, recipe: FineTune, folder: Path | None, *, resume: bool, seed: int,
                  stage: str, teacher: nn.Module | None) -> float | None:
        from norton.detection.train import train_detector

        assert teacher is None  # refused by check()
        history = train_detector(
            model, self.loaders.train, self.loaders.val, epochs=recipe.epochs, lr=recipe.lr, momentum=recipe.momentum,
            weight_decay=recipe.weight_decay, warmup_iters=self.warmup_iters, amp=recipe.amp, checkpoint_dir=folder,
            resume=resume, progress=self.progress, device=self.device, seed=seed, verbose=self.progress,
            args={"stage": stage},
        )
        return history[-1]["best_val_ap"] if history else None

    def complexity(self, model: nn.Module) -> dict[str, int]:
        from norton.detection.complexity import detector_complexity

        counted = detector_complexity(model, int(self.input_size[-1]))
        return {"macs": int(counted.macs), "params": int(counted.params)}
