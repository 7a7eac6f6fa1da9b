"""Tests for how many channels each group keeps (norton.pruning.budget): target_macs, the MAC model, round_to."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from norton.complexity import count_complexity, original_complexity
from norton.decomposition.decompose import eligible_convs, replay_decompose
from norton.errors import UserError
from norton.models import create_model
from norton.pruning.budget import MacModel
from norton.pruning.engine import prune
from norton.pruning.groups import traced


def x32() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def decomposed_resnet_20(rank: int) -> nn.Module:
    """resnet_20 with every eligible conv a rank-``rank`` CPDBlock (structure only: no CP-ALS)."""
    model = create_model("resnet_20")
    replay_decompose(model, {"op": "decompose", "ranks": {name: rank for name in eligible_convs(model)}})
    return model


def test_target_macs_is_a_fraction_of_the_original_model_after_decompose():
    model = decomposed_resnet_20(rank=2)
    original = count_complexity(create_model("resnet_20"), example_inputs=x32()).macs
    assert original_complexity(model, example_inputs=x32()).macs == original
    assert count_complexity(model, example_inputs=x32()).macs > 0.3 * original  # so there is work to do
    prune(model, x32(), target_macs=0.3, criterion="l1")
    after = count_complexity(model, example_inputs=x32()).macs
    assert abs(after / original - 0.3) <= 0.02 * 0.3


def test_target_macs_above_what_the_model_already_keeps_is_refused():
    model = decomposed_resnet_20(rank=1)
    before = count_complexity(model, example_inputs=x32()).macs / original_complexity(model, example_inputs=x32()).macs
    with pytest.raises(UserError, match=rf"already at {before:.1%} of the original's MACs") as error:
        prune(model, x32(), target_macs=min(1.0, before + 0.05), criterion="l1")
    assert "\n" not in str(error.value) and [r["op"] for r in model.norton_plan] == ["decompose"]


def test_mac_model_predicts_the_count_of_the_pruned_model():
    model = decomposed_resnet_20(rank=2)
    work, _, groups = traced(model, x32(), (), False)
    macs = MacModel(work, x32(), groups)
    full = torch.tensor([g.channels for g in groups], dtype=torch.float64)
    assert float(macs(full)) == count_complexity(model, example_inputs=x32()).macs
    pruned = copy.deepcopy(model)
    prune(pruned, x32(), ratio=0.5, criterion="l1")
    kept = torch.tensor([pruned.get_submodule(g.layers[0]).out_channels for g in groups], dtype=torch.float64)
    assert float(macs(kept)) == pytest.approx(count_complexity(pruned, example_inputs=x32()).macs, rel=1e-9)


@pytest.mark.parametrize("kwargs", [{"ratio": 0.5}, {"target_macs": 0.5}])
def test_round_to_wider_than_a_layer_is_refused_naming_it(kwargs):
    model = create_model("resnet_20")  # 16, 32 and 64 channels
    with pytest.raises(UserError, match=r"round_to=32 is larger than layer 'conv1', which has 16 channels"):
        prune(model, x32(), round_to=32, criterion="l1", **kwargs)
    with pytest.raises(UserError, match=r"round_to must be in \[1, 4,096\], got 5,000"):
        prune(model, x32(), ratio=0.5, round_to=5000, criterion="l1")
    assert model.conv1.out_channels == 16 and not getattr(model, "norton_plan", None)


def test_round_to_that_fits_every_pruned_layer_still_works():
    model = create_model("resnet_20")
    prune(model, x32(), ratio={"layer3.*": 0.5}, round_to=32, criterion="l1")  # only the 64-wide stage
    assert model.layer3[0].conv1.out_channels == 32 and model.conv1.out_channels == 16
