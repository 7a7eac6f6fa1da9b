"""BatchNorm folding (norton.deploy.batchnorm): which pairs fold, and folding keeps the function."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _factories import random_batchnorm
from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.batchnorm import find_batchnorm_pairs, fold_batchnorm, fold_structure
from norton.errors import UserError


class _TapModel(nn.Module):
    """conv_a feeds its BN and a residual tap (not foldable); conv_b feeds only its BN (foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv_a(x)
        return self.bn_b(self.conv_b(self.bn_a(a))) + a


def test_batchnorm_pairs_skip_outputs_used_elsewhere():
    model = _TapModel().eval()
    assert find_batchnorm_pairs(model, torch.randn(2, 3, 8, 8)) == [("conv_b", "bn_b")]


def test_batchnorm_pairs_need_eval_mode():
    model = _TapModel().train()
    assert find_batchnorm_pairs(model, torch.randn(2, 3, 8, 8)) == []



@pytest.mark.parametrize("bias", [False, True])
def test_fold_into_conv_and_block_keeps_the_function(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    for producer in (nn.Conv2d(4, 6, 3, padding=1, bias=bias), CPDBlock(4, 6, 2, 3, padding=1, bias=bias)):
        producer.eval()
        bn = random_batchnorm(6)
        with torch.no_grad():
            expected = bn(producer(x))
            fold_batchnorm(producer, bn)
            actual = producer(x)
        assert producer.bias is not None
        assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_fold_structure_makes_the_bias_a_fold_makes():
    folded, fresh = CPDBlock(4, 6, 2, 3, bias=False), CPDBlock(4, 6, 2, 3, bias=False)
    fold_batchnorm(folded, random_batchnorm(6))
    fold_structure(fresh)
    assert fresh.bias is not None and fresh.bias.shape == (6,)
    fresh.load_state_dict(folded.state_dict(), strict=True)  # a folded state dict loads into the replayed structure


def test_fold_refuses_batchnorm_without_running_statistics_and_unknown_producers():
    with pytest.raises(UserError, match="running statistics"):
        fold_batchnorm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(UserError, match="Linear"):
        fold_batchnorm(nn.Linear(3, 4), random_batchnorm(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert find_batchnorm_pairs(model, torch.randn(1, 3, 4, 4)) == []


def test_a_layer_called_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    assert find_batchnorm_pairs(Twice().eval(), torch.randn(1, 3, 4, 4)) == []
