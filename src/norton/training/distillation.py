"""Knowledge distillation (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

A compressed model (the student) is fine-tuned to match both the labels and the
softened scores of a teacher, usually the uncompressed model it came from:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

``alpha`` weighs the teacher's (KD) term, ``1 - alpha`` the labels'. The ``T^2`` factor keeps
the KD term's gradients at the same scale whatever the temperature (the soft targets'
gradients shrink as ``1 / T^2``), so changing ``T`` does not change the balance set by ``alpha``.

:func:`norton.training.loop.fit` distils when it is given ``teacher=``; ``alpha`` and ``T``
are the recipe's ``distill_alpha`` and ``distill_temperature`` (stored in checkpoints, checked
on resume). :class:`Distillation` bundles the three for callers that pass them around.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from norton.errors import UserError
from norton.limits import check_distillation
from norton.training.recipes import DISTILL_ALPHA, DISTILL_TEMPERATURE


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, targets)``, a scalar.

    Args:
        student_logits: ``(B, K)`` scores of the model being trained (gradients flow here).
        teacher_logits: ``(B, K)`` scores of the teacher (detached: no gradient reaches the teacher).
        targets: ``(B,)`` class indices, or ``None`` to distil without labels (then only the
            KD term is used, and ``alpha`` must be 1).
        alpha: weight of the KD term, in ``[0, 1]``; ``0`` is plain cross-entropy.
        temperature: ``T > 0``; both score sets are divided by it before the softmax.
        label_smoothing: of the cross-entropy term only.

    The KL divergence is summed over classes and averaged over the batch (``batchmean``,
    the mathematically correct mean of KL); both terms are computed in float32 even under
    autocast.
    """
    alpha, temperature = check_distillation(alpha, temperature)
    if student_logits.ndim != 2 or teacher_logits.shape != student_logits.shape:
        raise UserError(f"the teacher's scores {tuple(teacher_logits.shape)} differ in shape from the student's "
                        f"{tuple(student_logits.shape)}: distil from a teacher trained on the same classes")
    if targets is None and alpha != 1:
        raise UserError(f"distillation without labels uses the teacher's term only: alpha must be 1, got {alpha!r}")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    kd = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                  reduction="batchmean", log_target=True) * temperature**2
    if targets is None or alpha == 1:
        return kd
    ce = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    return alpha * kd + (1 - alpha) * ce


@dataclass(frozen=True)
class Distillation:
    """A teacher and how to distil from it: what :func:`~norton.training.loop.train_one_epoch` takes.

    ``fit(model, loaders, recipe, **Distillation(teacher, alpha, temperature).fit_kwargs())`` distils too.
    """

    teacher: nn.Module
    alpha: float = DISTILL_ALPHA  # weight of the teacher's term, in [0, 1]
    temperature: float = DISTILL_TEMPERATURE  # softmax temperature T > 0

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(self.teacher).__name__}")
        check_distillation(self.alpha, self.temperature)

    def fit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`norton.training.loop.fit` that distil from this teacher."""
        return {"teacher": self.teacher, "distill_alpha": self.alpha, "distill_temperature": self.temperature}


def prepare_teacher(teacher: nn.Module, student: nn.Module, device: torch.device) -> nn.Module:
    """``teacher`` in eval mode on ``device``; refused if it shares parameters with ``student``."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if teacher is student or shared:
        raise UserError("the teacher shares weights with the model being trained: pass a separate model "
                        "(e.g. copy.deepcopy of the uncompressed model, taken before compressing it)")
    return teacher.to(device).eval()


@torch.no_grad()
def check_teacher(teacher: nn.Module, student: nn.Module, example_inputs: Any) -> None:
    """``UserError`` unless ``teacher`` and ``student`` give scores of the same shape on ``example_inputs``.

    Both models are run in eval mode (their training flags are restored), before any training.
    """
    from norton.example_inputs import call_model

    outputs = []
    for name, model in (("teacher", teacher), ("student", student)):
        was_training = model.training
        model.eval()
        try:
            outputs.append(call_model(model, example_inputs))
        except RuntimeError as error:
            raise UserError(f"the {name} does not take the training images: {str(error).splitlines()[0]}") from error
        finally:
            model.train(was_training)
    got, expected = (tuple(getattr(o, "shape", ())) for o in outputs)
    if got != expected:
        raise UserError(f"the teacher gives scores of shape {got} but the student {expected}: "
                        "distil from a teacher trained on the same classes")


__all__ = ["Distillation", "check_teacher", "distillation_loss", "prepare_teacher"]
