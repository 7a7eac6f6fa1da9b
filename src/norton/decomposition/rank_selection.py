"""Rank selection shared by all decompositions: a fixed rank, EVBMF, spectral energy, MACs.

* :func:`evbmf_rank`: the rank empirical variational Bayesian matrix factorisation keeps
  (Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
  variational Bayesian matrix factorization", JMLR 2013): a singular value survives when
  it is above ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))``, and the noise variance
  ``sigma^2``, when not given, minimises the free energy (a 1-D problem). Kim et al.
  (ICLR 2016) take the Tucker-2 ranks of a conv kernel from it on the mode-0 and mode-1
  unfoldings.
* :func:`energy_rank`: the smallest rank keeping a fraction of ``sum(s^2)``.
* :func:`parse_rank_spec`: the user's ``rank=`` / ``--rank`` (``8``, ``(4, 8)``, ``"vbmf"``,
  ``"energy:0.9"``, ``"macs:0.5"``, ``"3"``, ``"4,8"``) as a :class:`RankSpec`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from norton.errors import UserError
from norton.limits import MAX_RANK, check_finite, check_int

RANK_KINDS = ("fixed", "vbmf", "energy", "macs")
# tau-bar of the EVB threshold, tau(alpha) ~= 2.5129 sqrt(alpha): the approximation of the
# zero of log(t+1)/t + log(t/alpha+1)/(t/alpha) = 1 used by Nakajima's reference code and
# the Tucker-2 implementations following Kim et al. (exact at alpha = 1, ~1% off at 0.25)
_TAU_SCALE = 2.5129
_GRID = 256  # log-spaced sigma^2 candidates before the golden-section refinement
_GOLDEN_STEPS = 60


@dataclass(frozen=True)
class RankSpec:
    """How to choose a layer's rank.

    ``kind``: ``"fixed"`` (``value``: an int, or ``(in_rank, out_rank)`` for Tucker-2),
    ``"vbmf"`` (``value`` None), ``"energy"`` (``value``: fraction of spectral energy
    kept, in (0, 1]) or ``"macs"`` (``value``: fraction of the layer's MACs kept, in (0, 1)).
    """

    kind: Literal["fixed", "vbmf", "energy", "macs"]
    value: int | tuple[int, int] | float | None = None


def parse_rank_spec(spec: Any) -> RankSpec:
    """``8``, ``(4, 8)``, ``"8"``, ``"4,8"``, ``"vbmf"``, ``"energy:0.9"``, ``"macs:0.5"`` -> :class:`RankSpec`."""
    if isinstance(spec, RankSpec):
        return parse_rank_spec(spec.value if spec.kind == "fixed" else _spec_text(spec))
    if isinstance(spec, int) and not isinstance(spec, bool):
        return RankSpec("fixed", check_int(spec, "rank", maximum=MAX_RANK))
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise UserError(f"a rank pair is (in_rank, out_rank) for Tucker-2, got {len(spec)} numbers: {spec!r}")
        first, second = (check_int(v, "rank", maximum=MAX_RANK) for v in spec)
        return RankSpec("fixed", (first, second))
    if not isinstance(spec, str):
        raise UserError(f"rank must be an int, a pair of ints or a string such as 'vbmf' or 'energy:0.9', got {spec!r}")
    text = spec.strip().lower()
    word, _, number = text.partition(":")
    if word == "vbmf" and not number:
        return RankSpec("vbmf")
    if word in ("energy", "macs"):
        fraction = _parse_fraction(number, word, spec)
        if word == "energy" and not 0 < fraction <= 1:
            raise UserError(f"energy:F keeps the fraction F of spectral energy and needs F in (0, 1], got {spec!r}")
        if word == "macs" and not 0 < fraction < 1:
            raise UserError(f"macs:F keeps the fraction F of a layer's MACs and needs F in (0, 1), got {spec!r}")
        return RankSpec(word, fraction)  # type: ignore[arg-type]  # word is one of the two literals here
    parts = text.split(",")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        values = [check_int(int(p), "rank", maximum=MAX_RANK) for p in parts]
        return RankSpec("fixed", values[0] if len(values) == 1 else (values[0], values[1]))
    raise UserError(
        f"unknown rank {spec!r}; use an integer ('8'), a pair for Tucker-2 ('4,8'), 'vbmf', 'energy:F' or 'macs:F'"
    )


def energy_rank(singular_values: Tensor, fraction: float) -> int:
    """Smallest ``r`` with ``sum(s[:r]^2) >= fraction * sum(s^2)`` (``s`` sorted descending).

    ``fraction`` in (0, 1]; at 1 the rank is the number of non-zero singular values
    (at least 1).
    """
    fraction = check_finite(fraction, "energy fraction")
    if not 0 < fraction <= 1:
        raise UserError(f"energy fraction must lie in (0, 1], got {fraction!r}")
    if not isinstance(singular_values, Tensor) or singular_values.dim() != 1 or singular_values.numel() == 0:
        raise UserError("singular_values must be a non-empty 1-D tensor")
    energy = singular_values.detach().double().square().cumsum(0)  # float64: exact enough at fraction 1
    total = energy[-1]
    if total <= 0:
        return 1
    return int((energy < fraction * total).sum()) + 1  # the first prefix reaching the target


@torch.no_grad()
def evbmf_rank(matrix: Tensor, sigma2: float | None = None) -> int:
    """The rank EVBMF keeps for ``matrix (L, M)`` (its transpose if ``L > M``).

    Args:
        matrix: a 2-D tensor on any device (computed in float64 on its device).
        sigma2: the noise variance per entry, if known; ``None`` estimates it by
            minimising the EVB free energy over ``sigma^2`` between the bounds of the
            reference code (Nakajima et al. 2013).

    Returns:
        The number of singular values above the EVB threshold (0 when all are noise).
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.numel() == 0:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise UserError(f"evbmf_rank needs a non-empty 2-D matrix, got {shape}")
    if not bool(torch.isfinite(matrix).all()):
        raise UserError("evbmf_rank: the matrix contains NaN or inf")
    y = matrix.detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape  # L <= M
    s = torch.linalg.svdvals(y)  # (L,) descending, all of them: H = L, no residual
    alpha = rows / cols
    tau = _TAU_SCALE * math.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    if sigma2 is None:
        if float(s[0]) == 0:
            return 0
        sigma2 = _estimate_sigma2(s, rows, cols, x_bar)
    else:
        sigma2 = check_finite(sigma2, "sigma2", positive=True)
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int((s > threshold).sum())


def _estimate_sigma2(s: Tensor, rows: int, cols: int, x_bar: float) -> float:
    """Minimise the EVB free energy over ``sigma^2``: a log grid, then golden section."""
    alpha = rows / cols
    s2 = s.square()
    # bounds of the reference code: above, all energy is noise; below, the smallest
    # singular values (past the largest rank EVB can keep) are noise
    upper = float(s2.sum()) / (rows * cols)
    keep_max = min(math.ceil(rows / (1 + alpha)) - 1, rows) - 1  # index as in the reference
    lower = max(float(s2[keep_max + 1]) / (cols * x_bar), float(s2[keep_max + 1:].mean()) / cols)
    if not lower < upper:
        return upper

    def free_energy(sigma: Tensor) -> Tensor:  # (G,) -> (G,)
        x = s2[None, :] / (cols * sigma[:, None])  # (G, L)
        signal = x > x_bar
        x_s = torch.where(signal, x, 2 * x_bar)  # placeholder keeps tau real where masked out
        shifted = x_s - (1 + alpha)
        tau_x = 0.5 * (shifted + (shifted.square() - 4 * alpha).clamp_min(0).sqrt())
        per_value = torch.where(
            signal,
            x_s - tau_x + torch.log((tau_x + 1) / x_s) + alpha * torch.log(tau_x / alpha + 1),
            x - torch.log(x),
        )
        return per_value.sum(1)

    grid = torch.logspace(math.log10(lower), math.log10(upper), _GRID, dtype=torch.float64, device=s.device)
    best = int(free_energy(grid).argmin())
    low, high = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, _GRID - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(_GOLDEN_STEPS):  # the minimum is bracketed by the grid neighbours
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        values = free_energy(torch.tensor([a, b], dtype=torch.float64, device=s.device))
        if float(values[0]) < float(values[1]):
            high = b
        else:
            low = a
    return (low + high) / 2


def _parse_fraction(number: str, word: str, spec: str) -> float:
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"{word}:F needs a number F, e.g. '{word}:0.5'; got {spec!r}") from None
    return check_finite(value, f"{word} fraction")


def _spec_text(spec: RankSpec) -> str:
    return spec.kind if spec.value is None else f"{spec.kind}:{spec.value}"
