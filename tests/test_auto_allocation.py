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
