"""Tests for norton.training.distillation: the loss on hand-computed numbers, its limits, and distilling in fit."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from norton.errors import UserError
from norton.limits import check_distillation
from norton.training.datasets import build_datasets
from norton.training.distillation import Distillation, check_teacher, distillation_loss
from norton.training.loaders import build_loaders
from norton.training.loop import fit, train_one_epoch
from norton.training.recipes import TrainingRecipe, build_optimizer

STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER = [[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
TARGETS = [2, 0]


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def test_the_loss_equals_the_hand_computed_value_on_a_two_by_three_example():
    alpha, t = 0.25, 2.0
    # KL(p_teacher || p_student) per row at T = 2, averaged over the 2 rows (batchmean).
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(te, t), softmax(st, t), strict=True))
             for st, te in zip(STUDENT, TEACHER, strict=True)) / 2
    # Cross-entropy of the student at T = 1 on the targets, averaged.
    ce = sum(-math.log(softmax(st, 1.0)[y]) for st, y in zip(STUDENT, TARGETS, strict=True)) / 2
    expected = alpha * t**2 * kl + (1 - alpha) * ce
    # The same numbers worked out on paper: row 1's KL 0.5185, row 2's 0.1232; CE log(1 + 1/e + 1/e^2) and log 3.
    assert kl == pytest.approx((0.5185 + 0.1232) / 2, abs=1e-3)
    assert ce == pytest.approx((math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2)
    assert expected == pytest.approx(0.8857, abs=1e-4)

    loss = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS),
                             alpha=alpha, temperature=t)
    assert loss.shape == () and loss.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_ignores_the_labels():
    student, teacher = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.randn(5, 4)
    targets = torch.tensor([0, 1, 2, 3, 0])
    loss = distillation_loss(student, teacher, targets, alpha=0.0, temperature=3.0, label_smoothing=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(student, targets, label_smoothing=0.1))
    with_labels = distillation_loss(student, teacher, targets, alpha=1.0, temperature=3.0)
    without = distillation_loss(student, teacher, None, alpha=1.0, temperature=3.0)
    torch.testing.assert_close(with_labels, without)
    assert distillation_loss(teacher, teacher, None, alpha=1.0, temperature=3.0).item() == pytest.approx(0, abs=1e-6)


def test_the_kd_term_is_scaled_by_t_squared():
    # Scores scaled by T give the same soft targets at temperature T as the originals at 1:
    # the KL is the same, so the loss grows by exactly T^2.
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    at_one = distillation_loss(student, teacher, None, alpha=1.0, temperature=1.0)
    for t in (2.0, 5.0):
        scaled = distillation_loss(student * t, teacher * t, None, alpha=1.0, temperature=t)
        assert scaled.item() == pytest.approx(t**2 * at_one.item(), rel=1e-5)
    # And a higher temperature softens both distributions, so their KL shrinks.
    kl = [distillation_loss(student, teacher, None, alpha=1.0, temperature=t).item() / t**2 for t in (1, 2, 4, 8)]
    assert kl == sorted(kl, reverse=True)


def test_gradients_flow_only_to_the_student():
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 3), nn.Linear(6, 3)
    x = torch.randn(4, 6)
    loss = distillation_loss(student(x), teacher(x), torch.tensor([0, 1, 2, 0]), alpha=0.5, temperature=4.0)
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and teacher.bias.grad is None


@pytest.mark.parametrize(
    "alpha, temperature, message",
    [
        (1.5, 4.0, r"^distillation alpha is the weight of the teacher's term and must lie in \[0, 1\], got 1.5$"),
        (-0.1, 4.0, r"must lie in \[0, 1\], got -0.1$"),
        (math.nan, 4.0, r"must lie in \[0, 1\], got nan$"),
        (0.5, 0.0, r"^distillation temperature must be positive, got 0.0$"),
        (0.5, -2.0, r"^distillation temperature must be positive, got -2.0$"),
        (0.5, math.inf, r"^distillation temperature must be a finite number, got inf$"),
    ],
)
def test_bad_alpha_or_temperature_is_one_line(alpha, temperature, message):
    with pytest.raises(UserError, match=message):
        check_distillation(alpha, temperature)
    with pytest.raises(UserError, match=message):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), alpha=alpha,
                          temperature=temperature)
    with pytest.raises(UserError, match=message):
        TrainingRecipe(epochs=1, lr=0.1, distill_alpha=alpha, distill_temperature=temperature)
    with pytest.raises(UserError, match=message):
        Distillation(nn.Linear(1, 1), alpha=alpha, temperature=temperature)


def test_labels_are_needed_unless_alpha_is_one_and_shapes_must_match():
    with pytest.raises(UserError, match="without labels .* alpha must be 1, got 0.5"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, alpha=0.5, temperature=4.0)
    with pytest.raises(UserError, match=r"teacher's scores \(2, 4\) differ in shape from the student's \(2, 3\)"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), alpha=0.5, temperature=4.0)


def test_check_teacher_compares_output_shapes_and_restores_training_flags():
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 5)
    with pytest.raises(UserError, match=r"^the teacher gives scores of shape \(2, 5\) but the student \(2, 3\): "):
        check_teacher(teacher, student, torch.zeros(2, 4))
    with pytest.raises(UserError, match="the teacher does not take the training images"):
        check_teacher(nn.Linear(7, 3), student, torch.zeros(2, 4))
    check_teacher(nn.Linear(4, 3), student, torch.zeros(2, 4))
    assert student.training


# --------------------------------------------------------------------------- in the training loop


class CountingTeacher(nn.Module):
    """A fixed teacher that counts its forward calls and the images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        self.calls = 0
        self.images = 0
        self.grad_enabled: set[bool] = set()
        self.modes: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        self.grad_enabled.add(torch.is_grad_enabled())
        self.modes.add(self.training)
        return self.net(x)


def student_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


@pytest.fixture(scope="module")
def loaders():
    return build_loaders(build_datasets("synthetic", limit=64, val_size=24), batch_size=16)


def test_fit_runs_the_teacher_once_per_training_batch_in_eval_mode_without_gradients(loaders, tmp_path):
    teacher = CountingTeacher()
    running_mean = teacher.net[1].running_mean.clone()
    result = fit(student_cnn(), loaders, epochs=2, lr=0.05, output_dir=tmp_path, verbose=False,
                 **Distillation(teacher, alpha=0.3, temperature=2.0).fit_kwargs())
    recipe = torch.load(tmp_path / "last.pt", weights_only=True)["recipe"]
    assert (recipe["distill_alpha"], recipe["distill_temperature"]) == (0.3, 2.0)
    batches = len(loaders.train)
    assert teacher.calls == 2 * batches  # never in validation or test: those score the student alone
    assert teacher.images == sum(record["train_samples"] for record in result.history)
    assert teacher.grad_enabled == {False} and teacher.modes == {False}
    assert all(p.grad is None for p in teacher.parameters())
    torch.testing.assert_close(teacher.net[1].running_mean, running_mean)  # eval mode: BatchNorm untouched
    assert [record["train_loss_kind"] for record in result.history] == ["distillation", "distillation"]


def test_train_one_epoch_with_alpha_zero_trains_as_without_a_teacher(loaders):
    # alpha = 0 is cross-entropy: the same weights as a run with no teacher (same seed, same batches).
    models = []
    for distillation in (None, Distillation(CountingTeacher(), alpha=0.0, temperature=4.0)):
        model = student_cnn()
        torch.manual_seed(3)
        train_one_epoch(model, loaders.train, build_optimizer(model, lr=0.05), None, device="cpu",
                        distillation=distillation, progress=False)
        models.append(model)
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[key], value)


def test_the_teacher_must_not_be_the_student(loaders):
    student = student_cnn()
    with pytest.raises(UserError, match="the teacher shares weights with the model being trained"):
        fit(student, loaders, epochs=1, lr=0.05, teacher=student, verbose=False)


def test_the_loss_is_float32_under_autocast():
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 3), nn.Linear(6, 3)
    x, targets = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    expected = distillation_loss(student(x), teacher(x), targets, alpha=0.5, temperature=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = student(x), teacher(x)
        loss = distillation_loss(s, t, targets, alpha=0.5, temperature=4.0)
    assert s.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=0.05)  # bfloat16 scores: ~3 significant digits
