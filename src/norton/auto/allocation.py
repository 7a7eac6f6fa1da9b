"""Choose every group's width and every layer's decomposition so the model meets a MACs or latency budget.

The problem is a multiple-choice knapsack: each unit (a coupled group of channels, or
a decomposable layer) has a few levels, each with a measured output change (its
:class:`~norton.auto.sensitivity.Curve`) and an effect on the MACs. Because a
group's width changes the MACs of every layer it feeds, MACs are not additive per
unit, so the search is greedy on the exact MAC model (:class:`~norton.auto.costs.ChoiceMacs`):
from the uncompressed model, repeatedly take the move (any unit to any cheaper level)
that adds the least output change per MAC removed, until the budget is met; then
give channels back a few at a time (or move a decomposed layer one level back towards
dense), cheapest change first, while the budget still holds, so the result lands within
the tolerance (AIMET's greedy compression-ratio
selection works the same way on per-layer curves). The cost can be the MACs or the
predicted latency (:class:`~norton.auto.latency.ChoiceLatency`): the search is the same.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from norton.auto.costs import ChoiceCost
from norton.auto.sensitivity import Curve
from norton.errors import UserError


@dataclass
class Allocation:
    """The chosen kept width per group ``(G,)`` and option index per decomposable layer ``(D,)``."""

    keep: Tensor
    choice: Tensor
    macs: float
    cost: float


def _interpolate(curve: Curve, width: Tensor) -> Tensor:
    """A prune curve's cost at any kept width (linear between measured widths, flat past the ends)."""
    levels = torch.tensor(curve.levels[::-1], dtype=torch.float64)  # rising widths
    costs = torch.tensor(curve.costs[::-1], dtype=torch.float64)
    width = width.to(torch.float64).clamp(levels[0], levels[-1])
    upper = torch.searchsorted(levels, width).clamp(1, len(levels) - 1) if len(levels) > 1 else None
    if upper is None:
        return costs[0].expand_as(width)
    lo, hi = levels[upper - 1], levels[upper]
    t = ((width - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return costs[upper - 1] + t * (costs[upper] - costs[upper - 1])


def allocate(
    macs: ChoiceCost, prune_curves: Sequence[Curve], decompose_curves: Sequence[Curve], goal: float,
    *, tolerance: float = 0.02, round_to: int | None = None, budget: str = "MACs",
) -> Allocation:
    """The greedy allocation meeting ``goal`` (within ``tolerance``, relative); ``Allocation.macs`` is its cost.

    Args:
        macs: the cost model (MACs or milliseconds); group ``g`` of its widths is ``prune_curves[g]``
            (a protected group has a curve with one level), layer ``d`` is ``decompose_curves[d]``.
        goal: the cost to reach (absolute).
        round_to: channels are given back in multiples of this (the curves' levels must be multiples too).
        budget: what the cost is, for the message when the goal cannot be met ("MACs", "latency").
    """
    groups, layers = len(prune_curves), len(decompose_curves)
    keep = torch.tensor([c.levels[0] for c in prune_curves], dtype=torch.float64)  # (G,)
    choice = torch.zeros(layers, dtype=torch.long)  # (D,): 0 = dense
    group_level = [0] * groups
    current = float(macs(keep[None], choice[None])[0])

    def cost_of(keep: Tensor, choice: Tensor) -> float:
        total = sum(float(_interpolate(c, keep[g:g + 1])[0]) for g, c in enumerate(prune_curves))
        return total + sum(c.costs[int(choice[d])] for d, c in enumerate(decompose_curves))

    while current > goal * (1 + tolerance / 2):
        keeps, choices, added = [], [], []
        for g, curve in enumerate(prune_curves):
            for j in range(group_level[g] + 1, len(curve.levels)):
                trial = keep.clone()
                trial[g] = curve.levels[j]
                keeps.append(trial)
                choices.append(choice)
                added.append((curve.costs[j] - curve.costs[group_level[g]], ("prune", g, j)))
        for d, curve in enumerate(decompose_curves):
            for j in range(int(choice[d]) + 1, len(curve.levels)):
                trial_choice = choice.clone()
                trial_choice[d] = j
                keeps.append(keep)
                choices.append(trial_choice)
                added.append((curve.costs[j] - curve.costs[int(choice[d])], ("decompose", d, j)))
        if not keeps:
            break
        saved = current - macs(torch.stack(keeps), torch.stack(choices))  # (M,)
        rate = torch.tensor([a for a, _ in added], dtype=torch.float64) / saved.clamp_min(1e-9)
        rate = rate.masked_fill(saved <= 0, math.inf)
        # The best rate; among (near-)ties the bigger saving, so free moves go first and in big steps.
        best_rate = float(rate.min())
        if not math.isfinite(best_rate):
            break
        near = rate <= best_rate + 1e-12 + 1e-6 * abs(best_rate)
        best = int(torch.where(near, saved, torch.full_like(saved, -math.inf)).argmax())
        kind, unit, level = added[best][1]
        if kind == "prune":
            keep[unit] = prune_curves[unit].levels[level]
            group_level[unit] = level
        else:
            choice[unit] = level
        current = float(saved.new_tensor(current) - saved[best])

    if current > goal * (1 + tolerance):
        raise UserError(
            f"the {budget} budget cannot be met: compressing every layer as far as norton tries still leaves "
            f"{current:,.4g} {'MACs' if budget == 'MACs' else 'ms'} for a goal of {goal:,.4g}; "
            f"ask for a larger target_{'macs' if budget == 'MACs' else budget}"
        )
    keep, choice = _give_back(macs, prune_curves, decompose_curves, keep, choice, goal, tolerance, round_to or 1)
    return Allocation(keep.long(), choice, float(macs(keep[None], choice[None])[0]), cost_of(keep, choice))


def _give_back(
    macs: ChoiceCost, curves: Sequence[Curve], layer_curves: Sequence[Curve], keep: Tensor, choice: Tensor,
    goal: float, tolerance: float, round_to: int,
) -> tuple[Tensor, Tensor]:
    """Add channels back (``round_to`` at a time) or move a decomposed layer one level back towards dense,
    best output change saved per unit of cost first, while the cost stays under ``goal``. (A decomposition
    is one large step: the last one taken can overshoot the goal with no pruned group to widen.)"""
    full = torch.tensor([c.levels[0] for c in curves], dtype=torch.float64)  # (G,)
    current = float(macs(keep[None], choice[None])[0])
    groups, layers = len(curves), len(layer_curves)
    eye = torch.eye(groups, dtype=torch.float64)
    back = torch.eye(layers, dtype=torch.long)
    for _ in range(int((full - keep).sum()) + int(choice.sum())):
        if current >= goal * (1 - tolerance / 4):
            break
        step = round_to * torch.clamp(torch.ceil(full / 32 / round_to), min=1)  # (G,): about 3% of a group per move
        trials = (keep + eye * step[:, None]).minimum(full)  # (G, G): row g widens group g
        choices = (choice - back).clamp_min(0)  # (D, D): row d moves layer d one level back
        added = macs(torch.cat([trials, keep.expand(layers, -1)]),
                     torch.cat([choice.expand(groups, -1), choices])) - current  # (G + D,)
        before = torch.tensor([float(_interpolate(c, keep[g:g + 1])[0]) for g, c in enumerate(curves)])
        after = torch.tensor([float(_interpolate(c, trials[g, g:g + 1])[0]) for g, c in enumerate(curves)])
        saved = torch.cat([(before - after).double(), torch.tensor(
            [c.costs[int(choice[d])] - c.costs[int(choices[d, d])] for d, c in enumerate(layer_curves)],
            dtype=torch.float64)])
        gain = saved / added.clamp_min(1e-9)  # output change saved per MAC
        moved = torch.cat([trials.diagonal() > keep, choices.diagonal() < choice])
        valid = moved & (current + added <= goal * (1 + tolerance / 2))
        if not bool(valid.any()):
            break
        best = int(gain.masked_fill(~valid, -math.inf).argmax())
        if best < groups:
            keep = trials[best]
        else:
            choice = choices[best - groups]
        current += float(added[best])
    return keep, choice
