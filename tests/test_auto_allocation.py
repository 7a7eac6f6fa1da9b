"""The greedy allocation meets the budget and spends it where the output changes least."""
from __future__ import annotations

import pytest
import torch

from norton.auto.allocation import allocate
from norton.auto.costs import ChoiceMacs
from norton.auto.sensitivity import Curve
from norton.errors import UserError


class _Widths:
    """Two independent layers of 100 MACs per channel, each its own group of 8 channels."""

    def __init__(self) -> None:
        self.weight = torch.tensor([100.0, 100.0], dtype=torch.float64)
        self.out0 = torch.tensor([8.0, 8.0], dtype=torch.float64)
        self.in0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
        self.d_out = -torch.eye(2, dtype=torch.float64)
        self.d_in = torch.zeros(2, 2, dtype=torch.float64)
        self.channels = torch.tensor([8.0, 8.0], dtype=torch.float64)


def _curve(name: str, scale: float) -> Curve:
    return Curve("prune", name, [8, 6, 4, 2, 1], [0.0, scale, 2 * scale, 4 * scale, 8 * scale])


def test_budget_met_and_spent_on_the_insensitive_layer():
    macs = ChoiceMacs(_Widths(), {}, ["a", "b"])  # type: ignore[arg-type]
    result = allocate(macs, [_curve("a", 1.0), _curve("b", 100.0)], [], goal=1000.0)
    assert result.macs == pytest.approx(1000.0, rel=0.02)
    assert result.keep.tolist()[0] < result.keep.tolist()[1]  # the cheap layer lost more channels


def test_protected_groups_keep_their_width_and_impossible_budgets_are_refused():
    macs = ChoiceMacs(_Widths(), {}, ["a", "b"])  # type: ignore[arg-type]
    protected = Curve("prune", "b", [8], [0.0])
    result = allocate(macs, [_curve("a", 1.0), protected], [], goal=1200.0)
    assert result.keep.tolist() == [4, 8]
    with pytest.raises(UserError, match="cannot be met"):
        allocate(macs, [_curve("a", 1.0), protected], [], goal=500.0)


class _WideWidths(_Widths):
    """Two independent layers of 100 MACs per channel, each its own group of 64 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.out0 = torch.tensor([64.0, 64.0], dtype=torch.float64)
        self.channels = torch.tensor([64.0, 64.0], dtype=torch.float64)


def test_round_to_gives_channels_back_in_multiples():
    macs = ChoiceMacs(_WideWidths(), {}, ["a", "b"])  # type: ignore[arg-type]
    curves = [Curve("prune", n, [64, 48, 32, 16, 8], [0.0, s, 2 * s, 4 * s, 8 * s]) for n, s in (("a", 1.0), ("b", 3.0))]
    for goal in (7000.0, 9100.0, 5300.0):
        result = allocate(macs, curves, [], goal=goal, round_to=8)
        assert all(k % 8 == 0 for k in result.keep.tolist()), result.keep
        assert result.macs <= goal * 1.01
        plain = allocate(macs, curves, [], goal=goal)
        assert plain.macs >= result.macs - 1e-9  # single channels fill the budget at least as closely


def test_a_latency_budget_that_cannot_be_met_says_latency():
    macs = ChoiceMacs(_Widths(), {}, ["a", "b"])  # type: ignore[arg-type]
    protected = Curve("prune", "b", [8], [0.0])
    with pytest.raises(UserError, match="latency budget cannot be met.*target_latency"):
        allocate(macs, [_curve("a", 1.0), protected], [], goal=500.0, budget="latency")


def test_an_overshooting_decomposition_is_stepped_back():
    from norton.auto.costs import LayerOption

    # Both groups protected; layer "a" (800 MACs dense) decomposes to 700 or 100 MACs. For a goal of 1500 of
    # 1600 the greedy takes the big step (no more change per MAC) to 900, with no width to give back: one
    # level back lands on 1500 exactly.
    options = {"a": [LayerOption("dense", None, (100.0, 0, 0, 0)), LayerOption("x", 1, (87.5, 0, 0, 0)),
                     LayerOption("x", 2, (12.5, 0, 0, 0))]}
    macs = ChoiceMacs(_Widths(), options, ["a", "b"])  # type: ignore[arg-type]
    protected = [Curve("prune", "a", [8], [0.0]), Curve("prune", "b", [8], [0.0])]
    layer = [Curve("decompose", "a", [0, 1, 2], [0.0, 1.0, 1.0])]  # the big step costs no more: taken first
    result = allocate(macs, protected, layer, goal=1500.0)
    assert result.choice.tolist() == [1] and result.macs == pytest.approx(1500.0)
    result = allocate(macs, protected, layer, goal=900.0)
    assert result.choice.tolist() == [2]
