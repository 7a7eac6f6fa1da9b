"""Tests for tracing and coupled groups (norton.pruning.groups) and the prunes that cannot remove anything."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from norton.errors import UserError
from norton.pruning.engine import prune
from norton.pruning.groups import check_pruned_runs, check_single_path


class Branchy(nn.Module):
    """A forward that branches on the data: positive inputs take conv_a, the others conv_b."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        positive_input = x.sum() > 0
        x = torch.relu(self.stem(x))
        x = self.conv_a(x) if positive_input else self.conv_b(x)
        return self.head(torch.relu(x))


def positive() -> Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5


def assert_refused_unchanged(model: nn.Module, x: Tensor, message: str, **kwargs) -> None:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=message) as error:
        prune(model, x, criterion="l1", **kwargs)
    assert "\n" not in str(error.value) and not hasattr(model, "norton_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_forward_that_branches_on_the_data_is_refused():
    torch.manual_seed(0)
    model = Branchy()  # the example takes conv_a; its negation (one of the probes) takes conv_b
    assert_refused_unchanged(model, positive(), "forward depends on the data", ratio=0.5)


def test_single_path_models_pass_the_check_and_a_broken_pruned_model_fails_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    probes = check_single_path(model, positive())
    assert len(probes) == 2  # the negated example and a random draw
    check_pruned_runs(model, positive(), probes)
    model[0] = nn.Conv2d(3, 6, 3)  # what a prune along one path only would leave: a channel mismatch
    with pytest.raises(UserError, match="no longer runs on the example"):
        check_pruned_runs(model, positive(), probes)


class NeedsPositiveInput(nn.Module):
    """Fails on negative inputs whether pruned or not: not a sign of a data-dependent path."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))

    def forward(self, x: Tensor) -> Tensor:
        if bool((x < 0).any()):
            raise ValueError("inputs must be non-negative")
        return self.body(x)


def test_probes_the_unpruned_model_refuses_are_not_held_against_the_pruned_one():
    model = NeedsPositiveInput()
    prune(model, positive(), ratio=0.5, criterion="l1")
    assert model.body[0].out_channels == 4


@pytest.mark.parametrize(
    "model,x",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4)), positive()),
        (nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3)), torch.randn(1, 3, 16)),
        (nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 4, 3)), torch.randn(1, 3, 6, 6, 6)),
    ],
)
def test_model_without_prunable_layers_is_refused(model, x):
    assert_refused_unchanged(model, x, r"the model has no prunable layers \(Conv2d with groups=1 or CPDBlock; "
                             "Conv1d/Conv3d are not supported", ratio=0.5)


def test_prune_where_every_layer_is_protected_says_why():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    assert_refused_unchanged(model, positive(), r"every prunable layer's channels are protected \(ignored: 0; "
                             "model output\\)", ratio=0.5, ignored_layers=["0"])


def test_amount_that_rounds_to_no_removal_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    # 10% of 16 is 14 kept, which rounds to 16 at round_to=8
    assert_refused_unchanged(model, positive(), "removes no channel", ratio=0.1, round_to=8)


def test_ratio_zero_still_removes_nothing_without_complaint():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    prune(model, positive(), ratio=0.0, criterion="l1")
    assert model.norton_plan[-1]["removed"] == {}
