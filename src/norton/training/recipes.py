"""Training recipes: the SGD settings of a run as one small dataclass, the defaults per dataset and stage,
and the optimiser and learning-rate schedule a recipe turns into.

``TrainingRecipe`` checks its fields when it is made (through :mod:`norton.limits`), so a
typo such as ``--lr nan`` or ``--epochs 0`` fails in microseconds, before any data is loaded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from norton.errors import UserError
from norton.limits import check_distillation, check_epochs, check_finite, check_learning_rate

if TYPE_CHECKING:  # torch is imported where an optimiser is built: the CLI reads RECIPES without it
    import torch
    from torch import nn

STAGES = ("train", "finetune")
# Knowledge distillation's defaults (docs/training.md says why): equal weight to the teacher
# and the labels, and a temperature that softens the teacher's scores without flattening them.
DISTILL_ALPHA = 0.5
DISTILL_TEMPERATURE = 4.0


@dataclass(frozen=True)
class TrainingRecipe:
    """How :func:`norton.training.loop.fit` trains: SGD with momentum and weight decay, a per-iteration
    linear warm-up then cosine schedule, optional label smoothing and mixed precision, and (with a
    teacher) the weight and temperature of knowledge distillation.
    """

    epochs: int  # passes over the training split, numbered from 1
    lr: float  # peak learning rate (after the warm-up)
    momentum: float = 0.9  # SGD momentum, in [0, 1)
    weight_decay: float = 5e-4  # L2 penalty on every parameter (as the reference does), >= 0
    warmup_epochs: float = 0.0  # linear warm-up length in epochs (fractions allowed), in [0, epochs]
    warmup_start_factor: float = 0.01  # the warm-up starts at this fraction of lr, in (0, 1]
    label_smoothing: float = 0.0  # of the training loss only (evaluation uses plain cross-entropy), in [0, 1)
    amp: bool = False  # float16 autocast with a gradient scaler; CUDA only
    # Knowledge distillation, used only when fit() is given a teacher (norton.training.distillation):
    distill_alpha: float = DISTILL_ALPHA  # weight of the teacher's (KL) term, 1 - alpha of the labels'; in [0, 1]
    distill_temperature: float = DISTILL_TEMPERATURE  # softmax temperature T > 0

    def __post_init__(self) -> None:
        check_epochs(self.epochs, "epochs", minimum=1)
        check_learning_rate(self.lr, "learning rate")
        if check_finite(self.momentum, "momentum", minimum=0) >= 1:
            raise UserError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        check_finite(self.weight_decay, "weight decay", minimum=0)
        if check_finite(self.warmup_epochs, "warmup epochs", minimum=0) > self.epochs:
            raise UserError(f"warmup epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs!r}")
        if check_finite(self.warmup_start_factor, "warmup start factor", positive=True) > 1:
            raise UserError(f"warmup start factor must lie in (0, 1], got {self.warmup_start_factor!r}")
        if check_finite(self.label_smoothing, "label smoothing", minimum=0) >= 1:
            raise UserError(f"label smoothing must lie in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.amp, bool):
            raise UserError(f"amp must be True or False, got {self.amp!r}")
        check_distillation(self.distill_alpha, self.distill_temperature)

    def replace(self, **changes: Any) -> TrainingRecipe:
        """A copy with ``changes`` applied; ``None`` values leave a field as it is."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"TrainingRecipe has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Defaults per dataset group and stage (training from scratch vs fine-tuning after
# decomposition/pruning). The fine-tuning rows are the NORTON reference's
# (prune.py: CIFAR; main_imagenet.py: ImageNet); docs/training.md lists the sources.
RECIPES: dict[tuple[str, str], TrainingRecipe] = {
    ("cifar", "train"): TrainingRecipe(epochs=200, lr=0.1, momentum=0.9, weight_decay=5e-4),
    ("cifar", "finetune"): TrainingRecipe(epochs=400, lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_epochs=5),
    ("imagenet", "train"): TrainingRecipe(epochs=90, lr=0.1, momentum=0.9, weight_decay=1e-4),
    ("imagenet", "finetune"): TrainingRecipe(epochs=200, lr=0.01, momentum=0.99, weight_decay=1e-4,
                                             warmup_epochs=5, label_smoothing=0.1),
}


def recipe_for(dataset: str, *, stage: str = "train", **overrides: Any) -> TrainingRecipe:
    """The recipe of ``dataset`` (ImageNet, or the CIFAR-sized sets) and ``stage``, with ``overrides``.

    ``None`` overrides are ignored (an option not given). Unless ``warmup_epochs`` is
    given, the recipe's warm-up is shortened to at most a tenth of the epochs, so a
    10-epoch fine-tune warms up for 1.
    """
    if stage not in STAGES:
        raise UserError(f"unknown training stage {stage!r}: use train or finetune")
    base = RECIPES[("imagenet" if dataset == "imagenet" else "cifar", stage)]
    epochs = overrides.get("epochs")
    if overrides.get("warmup_epochs") is None and epochs is not None:
        # Check the epochs first so a bad value gets its own message, not a warm-up one.
        overrides["warmup_epochs"] = min(base.warmup_epochs, check_epochs(epochs, "epochs", minimum=1) / 10)
    return base.replace(**overrides)


def check_recipe(**settings: Any) -> TrainingRecipe:
    """The :class:`TrainingRecipe` of ``settings`` (keys that are not recipe fields are ignored).

    Raises a one-line ``UserError`` for a setting :func:`fit` cannot use.
    """
    names = {f.name for f in dataclasses.fields(TrainingRecipe)}
    if "epochs" not in settings or "lr" not in settings:
        raise UserError("a training recipe needs epochs and lr")
    return TrainingRecipe(**{k: v for k, v in settings.items() if k in names})


# --------------------------------------------------------------------------- optimiser and schedule


class WarmupCosine:
    """LR factor at optimiser step ``t``: linear from ``start_factor`` to 1 over ``warmup_steps``,
    then cosine from 1 to 0 at ``total_steps``.

    A plain object (not a lambda) so ``LambdaLR.state_dict()`` records its fields.
    """

    def __init__(self, *, total_steps: int, warmup_steps: int = 0, start_factor: float = 0.01) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter (as the reference does)."""
    import torch

    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start_factor: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration :class:`WarmupCosine` schedule; call ``step()`` after every optimiser step."""
    factor = WarmupCosine(
        total_steps=epochs * steps_per_epoch,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        start_factor=warmup_start_factor,
    )
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
