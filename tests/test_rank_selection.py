"""Rank selection: EVBMF (known answers + a reference implementation), energy, rank specs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar  # installed with tensorly, the test oracle

from norton.decomposition.rank_selection import RankSpec, energy_rank, evbmf_rank, parse_rank_spec
from norton.errors import UserError


# ------------------------------------------------------------------ reference EVBMF
def _reference_evbmf_rank(y: np.ndarray, sigma2: float | None = None) -> int:
    """Straight port of the classic EVBMF (Nakajima et al. 2013; the VBMF.py Kim et al. use):
    per-singular-value threshold sqrt(M sigma^2 (1 + tau)(1 + alpha / tau)), sigma^2 from a
    bounded Brent minimisation of the free energy."""
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    s = np.linalg.svd(y, compute_uv=False)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        e_h = int(min(math.ceil(rows / (1 + alpha)) - 1, rows)) - 1
        upper = np.sum(s**2) / (rows * cols)
        lower = max(s[e_h + 1] ** 2 / (cols * x_bar), np.mean(s[e_h + 1:] ** 2) / cols)

        def objective(sig2: float) -> float:
            x = s**2 / (cols * sig2)
            z1, z2 = x[x > x_bar], x[x <= x_bar]
            tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
            return float(
                np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                + alpha * np.sum(np.log(tau_z1 / alpha + 1))
            )

        sigma2 = minimize_scalar(objective, bounds=[lower, upper], method="bounded").x
    return int(np.sum(s > math.sqrt(cols * sigma2 * x_bar)))


def _planted(rows: int, cols: int, rank: int, sigma: float, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Rank-``rank`` signal with singular values well above the noise edge plus N(0, sigma^2)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))  # largest singular value of the noise
    values = scale * edge * torch.linspace(3, 6, rank, dtype=torch.float64)
    return (u * values) @ v.T + sigma * torch.randn(rows, cols, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ EVBMF known answers
@pytest.mark.parametrize(
    ("rows", "cols", "rank", "sigma"),
    [(60, 40, 5, 0.1), (40, 60, 5, 0.1), (100, 100, 10, 0.5), (200, 50, 3, 1.0), (30, 300, 8, 0.01), (64, 576, 12, 0.05)],
)
def test_evbmf_recovers_planted_rank_with_estimated_noise(rows, cols, rank, sigma):
    y = _planted(rows, cols, rank, sigma, seed=rows + cols)
    assert evbmf_rank(y) == rank
    assert evbmf_rank(y, sigma2=sigma**2) == rank  # known noise variance
    assert evbmf_rank(y.float()) == rank  # any float dtype


def test_evbmf_pure_noise_and_zero_keep_nothing():
    g = torch.Generator().manual_seed(0)
    assert evbmf_rank(torch.randn(50, 80, generator=g), sigma2=1.0) == 0
    assert evbmf_rank(torch.zeros(5, 7)) == 0


def test_evbmf_weak_components_below_the_threshold_are_dropped():
    # three strong components and two at a third of the noise edge: only the strong survive
    g = torch.Generator().manual_seed(1)
    rows, cols, sigma = 80, 120, 0.2
    u = torch.linalg.qr(torch.randn(rows, 5, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, 5, generator=g, dtype=torch.float64)).Q
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))
    values = edge * torch.tensor([5.0, 4.0, 3.0, 0.3, 0.3], dtype=torch.float64)
    y = (u * values) @ v.T + sigma * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    assert evbmf_rank(y) == 3


@pytest.mark.parametrize("seed", range(6))
def test_evbmf_agrees_with_reference_implementation(seed):
    g = torch.Generator().manual_seed(100 + seed)
    rows, cols = [(60, 40), (50, 50), (32, 288), (128, 64), (20, 90), (75, 75)][seed]
    rank = [5, 3, 7, 12, 2, 9][seed]
    # a spread of component strengths, some near the threshold, so the rank is not trivial
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    edge = math.sqrt(rows) + math.sqrt(cols)
    values = edge * torch.logspace(-0.5, 0.8, rank, dtype=torch.float64)
    y = (u * values) @ v.T + torch.randn(rows, cols, generator=g, dtype=torch.float64)
    expected = _reference_evbmf_rank(y.numpy())
    assert evbmf_rank(y) == expected
    assert evbmf_rank(y, sigma2=1.0) == _reference_evbmf_rank(y.numpy(), sigma2=1.0)


def test_evbmf_agrees_with_reference_on_a_conv_kernel_unfolding():
    g = torch.Generator().manual_seed(7)
    w = _planted(32, 16 * 9, 6, 0.05, seed=7, scale=0.5) + 0.01 * torch.randn(32, 144, generator=g, dtype=torch.float64)
    assert evbmf_rank(w) == _reference_evbmf_rank(w.numpy())


# ------------------------------------------------------------------ energy
def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 3  # the zero singular value adds nothing
    assert energy_rank(torch.zeros(3), 0.5) == 1
    previous = 0
    for fraction in torch.linspace(0.05, 1.0, 20).tolist():
        rank = energy_rank(torch.rand(30, generator=torch.Generator().manual_seed(0)).sort(descending=True).values, fraction)
        assert rank >= previous
        previous = rank


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan"), "0.5"])
def test_energy_rank_bad_fraction(fraction):
    with pytest.raises(UserError):
        energy_rank(torch.ones(3), fraction)


# ------------------------------------------------------------------ rank specs
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (8, RankSpec("fixed", 8)),
        ((4, 8), RankSpec("fixed", (4, 8))),
        ([4, 8], RankSpec("fixed", (4, 8))),
        ("3", RankSpec("fixed", 3)),
        (" 4, 8 ", RankSpec("fixed", (4, 8))),
        ("vbmf", RankSpec("vbmf", None)),
        ("VBMF", RankSpec("vbmf", None)),
        ("energy:0.9", RankSpec("energy", 0.9)),
        ("energy:1", RankSpec("energy", 1.0)),
        ("macs:0.5", RankSpec("macs", 0.5)),
        (RankSpec("energy", 0.5), RankSpec("energy", 0.5)),
    ],
)
def test_parse_rank_spec(spec, expected):
    assert parse_rank_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (0, "rank must be in"),
        ("0", "rank must be in"),
        ((0, 3), "rank must be in"),
        ((1, 2, 3), "pair"),
        (True, "rank must be"),
        (2.5, "rank must be"),
        ("energy:0", "\\(0, 1\\]"),
        ("energy:1.5", "\\(0, 1\\]"),
        ("energy:x", "needs a number"),
        ("energy:nan", "finite"),
        ("macs:1", "\\(0, 1\\)"),
        ("macs:0", "\\(0, 1\\)"),
        ("svd", "unknown rank"),
        ("vbmf:2", "unknown rank"),
        ("4,8,9", "unknown rank"),
        ("-3", "unknown rank"),
        ("", "unknown rank"),
    ],
)
def test_parse_rank_spec_bad_input_is_a_one_line_user_error(spec, match):
    with pytest.raises(UserError, match=match) as info:
        parse_rank_spec(spec)
    assert "\n" not in str(info.value)


def test_evbmf_bad_input():
    for bad in (torch.ones(3), torch.ones(0, 3), torch.full((2, 2), float("nan"))):
        with pytest.raises(UserError):
            evbmf_rank(bad)
    with pytest.raises(UserError, match="sigma2"):
        evbmf_rank(torch.ones(3, 3), sigma2=0.0)
