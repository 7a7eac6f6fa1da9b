"""Distillation on calibration images: the compressed model moves towards its original, no labels."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import norton
from norton.calibration_distillation import distill_on_calibration, output_mismatch
from norton.errors import UserError


def _net(out: int = 5, head: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)]
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, out)]
    return nn.Sequential(*layers)


def _pair(head: bool = True) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = _net(head=head).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        teacher[1].running_mean.uniform_(-0.5, 0.5)
        teacher[1].running_var.uniform_(0.5, 2.0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return teacher, student


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("head", [True, False])  # KL on (B, K) scores; relative MSE on any other tensor
def test_lowers_the_mismatch_on_held_out_images(head):
    teacher, student = _pair(head)
    calibration, held_out = _images(4, 1), torch.cat(_images(2, 2))
    with torch.no_grad():
        before = float(output_mismatch(student.eval()(held_out), teacher(held_out), 4.0))
    report = distill_on_calibration(teacher, student, calibration, steps=60, lr=1e-2, batch_size=32)
    with torch.no_grad():
        after = float(output_mismatch(student.eval()(held_out), teacher(held_out), 4.0))
    assert report["steps"] == 60 and report["images"] == 64
    assert report["mismatch_after"] < 0.5 * report["mismatch_before"]
    assert after < 0.7 * before


def test_teacher_untouched_statistics_kept_and_modes_restored():
    teacher, student = _pair()
    teacher_state, running = _state(teacher), student[1].running_mean.clone()
    student.train()  # as the caller left it
    distill_on_calibration(teacher, student, _images(2, 1), steps=5)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert torch.equal(student[1].running_mean, running)  # BatchNorm ran in eval mode
    assert student.training and student[3].training and not teacher.training
    assert all(p.grad is None for p in student.parameters())


def test_zero_steps_changes_nothing_and_is_seeded():
    teacher, student = _pair()
    state = _state(student)
    report = distill_on_calibration(teacher, student, _images(2, 1), steps=0)
    assert report["mismatch_before"] == report["mismatch_after"] > 0
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())
    twins = [copy.deepcopy(student) for _ in range(2)]
    for twin in twins:
        distill_on_calibration(teacher, twin, _images(2, 1), steps=3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(twins[0].parameters(), twins[1].parameters(), strict=True))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": -1}, "steps must be"),
    ({"steps": 2.5}, "whole number"),
    ({"steps": 3, "lr": 0.0}, "lr"),
    ({"steps": 3, "inputs": []}, "non-empty list"),
    ({"steps": 3, "inputs": [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 6, 6)]}, "one input shape"),
])
def test_bad_input_is_one_line(kwargs, message):
    teacher, student = _pair()
    arguments = {"inputs": _images(1, 1), **kwargs}
    with pytest.raises(UserError, match=message) as error:
        distill_on_calibration(teacher, student, arguments.pop("inputs"), **arguments)
    assert "\n" not in str(error.value)


def test_outputs_that_do_not_match_are_refused():
    teacher, _ = _pair()
    with pytest.raises(UserError, match="differs in shape"):
        distill_on_calibration(teacher, _net(out=3).eval(), _images(1, 1), steps=1)

    class Pair(nn.Module):
        def forward(self, x):
            return {"scores": x.mean((2, 3))}
    with pytest.raises(UserError, match="one tensor"):
        distill_on_calibration(Pair(), Pair(), _images(1, 1), steps=1)


def test_auto_compress_distils_after_recovery_and_records_it():
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]
    plain = norton.auto_compress(model, x, target_macs=0.3, calibration=calibration, progress=False)
    distilled = norton.auto_compress(model, x, target_macs=0.3, calibration=calibration, progress=False,
                                     distill_steps=20, distill_lr=1e-2)
    assert distilled.norton_plan == plain.norton_plan  # the same structure, other weights
    report = distilled.norton_auto_report.distillation
    assert report["steps"] == 20 and report["mismatch_after"] < report["mismatch_before"]
    assert plain.norton_auto_report.distillation == {}
    with torch.no_grad():
        probe = torch.cat(calibration)
        assert not torch.equal(plain(probe), distilled(probe))


@pytest.mark.parametrize(("steps", "lr", "message"), [(-1, 1e-3, "distill_steps"), (10, -1.0, "distill_lr")])
def test_auto_compress_refuses_bad_distillation_options(steps, lr, message):
    model = norton.create_model("resnet_20", num_classes=10).eval()
    state = _state(model)
    with pytest.raises(UserError, match=message):
        norton.auto_compress(model, torch.randn(1, 3, 16, 16), target_macs=0.5, progress=False,
                             calibration=[torch.randn(4, 3, 16, 16)], distill_steps=steps, distill_lr=lr)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
