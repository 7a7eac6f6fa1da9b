"""Tests for prune records (norton.pruning.plan): the registered "prune" plan operation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import norton.plan
from norton.errors import UserError
from norton.pruning.engine import prune
from norton.pruning.plan import MAX_RECORD_INDICES, check_prune_record, describe_prune_record, replay_prune


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def x8() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_prune_is_registered_with_its_own_functions():
    operation = norton.plan.get_operation("prune")
    assert operation.replay is replay_prune and operation.check is check_prune_record
    assert operation.describe is describe_prune_record
    pruned = operation.example(small_model(), x8())
    assert pruned.norton_plan[-1]["amount"] == {"ratio": 0.5} and pruned[0].out_channels == 4


def test_replay_plan_goes_through_the_registry_and_rebuilds_the_structure():
    model = small_model()
    fresh = copy.deepcopy(model)
    prune(model, x8(), ratio=0.5, criterion="l1")
    norton.plan.replay_plan(fresh, norton.plan.plan_of(model))
    fresh.load_state_dict(model.state_dict())  # strict: same shapes
    assert torch.equal(fresh(x8()), model(x8()))


def test_describe_is_one_line_with_counts_criterion_and_amount():
    record = {"op": "prune", "removed": {"0": [1, 2], "1": [1, 2], "3": [0]}, "removed_inputs": {"3": [1, 2]},
              "criterion": "pabs", "amount": {"ratio": 0.5}}
    assert describe_prune_record(record) == "prune 5 output channels in 3 layers (criterion pabs, ratio 0.5)"
    record["amount"] = {"compress_rate": [0.0, 0.1, 0.2, 0.3, 0.4]}
    record["iterative_steps"] = 3
    assert describe_prune_record(record).endswith("(criterion pabs, compress_rate [0, 0.1, 0.2, 0.3, ...], 3 steps)")
    assert norton.plan.describe_plan([record]) == [describe_prune_record(record)]


@pytest.mark.parametrize(
    "record,message",
    [
        ({"op": "decompose"}, "not a prune record"),
        ({"op": "prune", "removed": [1, 2]}, "must map layer names"),
        ({"op": "prune", "removed": {"0": "12"}}, "must list channel indices"),
        ({"op": "prune", "removed": {"0": [1, -2]}}, "non-negative integer"),
        ({"op": "prune", "removed": {"0": [True]}}, "non-negative integer"),
        ({"op": "prune", "removed": {"0": [1.5]}}, "non-negative integer"),
        ({"op": "prune", "removed_inputs": {"0": [0] * (MAX_RECORD_INDICES + 1)}}, "more than 1,000,000"),
        ({"op": "prune", "removed": {}, "iterative_steps": 0}, "iterative_steps"),
        ({"op": "prune", "removed": {}, "criterion": 3}, "criterion"),
    ],
)
def test_bad_records_are_refused_before_the_model_changes(record, message):
    model = small_model()
    with pytest.raises(UserError, match=message) as error:
        replay_prune(model, record)
    assert "\n" not in str(error.value)
    assert model[0].out_channels == 8 and not hasattr(model, "norton_plan")
    if record["op"] == "prune":  # the registry checks files with the same function
        with pytest.raises(UserError, match=message):
            norton.plan.check_plan([record])


def test_replay_keeps_the_original_for_macs_fractions_and_copies_the_record():
    model = small_model()
    record = {"op": "prune", "removed": {"0": [0, 1], "1": [0, 1]}, "removed_inputs": {"3": [0, 1]}}
    replay_prune(model, record)
    record["removed"]["0"].append(5)  # the model's history does not change with the caller's dict
    assert model.norton_plan[-1]["removed"]["0"] == [0, 1]
    assert norton.plan.original_model(model)[0].out_channels == 8  # the shapes before the first change
