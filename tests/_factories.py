"""Small random objects several test modules build: CP factors of a layer, a CPDBlock from them, a BatchNorm."""
from __future__ import annotations

import torch
from torch import nn

from norton.decomposition.cpd_block import CPDBlock


def random_factors(n, c_in=16, rank=2, kernel=3, *, seed=0):
    """Per-filter factors ``(n, c_in, rank), (n, kernel, rank), (n, kernel, rank)``."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c_in, rank, generator=g),
        torch.randn(n, kernel, rank, generator=g),
        torch.randn(n, kernel, rank, generator=g),
    )


def block_from(factors):
    return CPDBlock.from_factors(tuple(f.contiguous() for f in factors))


def random_batchnorm(channels: int, seed: int = 1) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm with random statistics and affine parameters (folding must keep them)."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()
