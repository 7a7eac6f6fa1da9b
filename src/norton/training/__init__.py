"""Training and fine-tuning: datasets and loaders, the training loop, recipes and checkpoints.

=================================  ===================================================
:mod:`~norton.training.datasets`   ``build_datasets`` -> ``DataSplits`` (train/val/test)
:mod:`~norton.training.readers`    on-disk formats: CIFAR batches, image folders, idx files
:mod:`~norton.training.transforms` the paper's augmentations and evaluation transforms
:mod:`~norton.training.loaders`    ``build_loaders`` -> ``Loaders``, sharded under ``torchrun``
:mod:`~norton.training.recipes`    ``TrainingRecipe``, defaults per dataset, optimiser and schedule
:mod:`~norton.training.loop`       ``train_one_epoch``, ``evaluate``, ``fit``
:mod:`~norton.training.checkpoint` ``last.pt``/``best.pt``: format, loading, resume rules
:mod:`~norton.training.distributed` devices, process groups, seeds
=================================  ===================================================

The names below are loaded lazily, so ``import norton.training`` stays cheap.
"""
from __future__ import annotations

from norton._lazy import lazy_exports

# The datasets norton reads; a constant here (not in transforms) so the CLI builds its
# options without importing torch or torchvision.
DATASETS = ("cifar10", "cifar100", "imagenet", "fashion-mnist", "synthetic")

_EXPORTS = {
    "DataSplits": "norton.training.datasets",
    "build_datasets": "norton.training.datasets",
    "Loaders": "norton.training.loaders",
    "build_loaders": "norton.training.loaders",
    "TrainingRecipe": "norton.training.recipes",
    "recipe_for": "norton.training.recipes",
    "FitResult": "norton.training.loop",
    "fit": "norton.training.loop",
    "evaluate": "norton.training.loop",
    "train_one_epoch": "norton.training.loop",
    "distillation_loss": "norton.training.distillation",
    "Distillation": "norton.training.distillation",
    "load_checkpoint": "norton.training.checkpoint",
    "model_from_checkpoint": "norton.training.checkpoint",
    "is_training_checkpoint": "norton.training.checkpoint",
    "DistributedContext": "norton.training.distributed",
    "init_distributed": "norton.training.distributed",
    "cleanup_distributed": "norton.training.distributed",
    "resolve_device": "norton.training.distributed",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
