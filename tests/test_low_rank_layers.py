import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norton.complexity import count_complexity
from norton.decomposition.factorized import chain_macs
from norton.decomposition.low_rank_layers import LowRankConv1x1, LowRankLinear, SpatialSVDConv


def exact_spatial_factors(weight):
    """The full-rank spatial SVD of ``weight (N, C, k_h, k_w)``, computed here with torch.linalg."""
    n, c, kh, kw = weight.shape
    matrix = weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)  # (C k_h, N k_w)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = s.numel()
    vertical = (u * s).T.reshape(r, c, kh, 1)
    horizontal = vh.reshape(r, n, 1, kw).transpose(0, 1)  # (N, R, 1, k_w)
    return vertical, horizontal


@pytest.mark.parametrize("geometry", [{}, {"stride": 2, "padding": 1}, {"stride": (2, 1), "dilation": (1, 2)},
                                      {"padding": 1, "padding_mode": "reflect"}])
def test_full_rank_spatial_svd_equals_the_conv(geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), **geometry).double()
    block = SpatialSVDConv.from_factors(exact_spatial_factors(conv.weight.detach()), bias=conv.bias.detach(),
                                        **geometry)
    assert block.rank == min(4 * 3, 6 * 2)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.dense_weight(), conv.weight.detach())
    torch.testing.assert_close(block.to_conv()(x), conv(x))


def test_spatial_svd_empty_repr_and_counts():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    block = SpatialSVDConv.from_factors(exact_spatial_factors(conv.weight.detach()), bias=conv.bias.detach(),
                                        stride=2, padding=1)
    fresh = SpatialSVDConv.empty(conv, 12)
    fresh.load_state_dict(block.state_dict(), strict=True)
    assert "rank=12" in repr(block)
    closed = chain_macs(block, (8, 8))
    assert closed == 4 * 8 * 4 * 3 * 12 + 4 * 4 * 12 * 3 * 6  # k_h x 1 on 4x8 outputs, 1 x k_w on 4x4
    for convention in ("conv+linear", "reference"):
        counted = count_complexity(block, (4, 8, 8), convention=convention)
        assert (counted.macs, counted.params) == (closed, 12 * 4 * 3 + 6 * 12 * 3 + 6)


@pytest.mark.parametrize("geometry", [{}, {"stride": 2}, {"padding": 1}, {"padding": 1, "padding_mode": "circular"}])
def test_full_rank_pointwise_equals_the_conv(geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, 1, **geometry).double()
    matrix = conv.weight.detach().flatten(1)  # (3, 5)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    block = LowRankConv1x1.from_factors((u * s, vh), bias=conv.bias.detach(), **geometry)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.to_conv()(x), conv(x))
    fresh = LowRankConv1x1.empty(conv, 3)
    fresh.load_state_dict(block.state_dict(), strict=True)
    assert chain_macs(block, (6, 7)) == count_complexity(block, (5, 6, 7)).macs


def test_low_rank_pointwise_is_the_product_of_its_factors():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)
    block = LowRankConv1x1.from_factors((left, right))
    x = torch.randn(1, 6, 4, 4, generator=g)
    torch.testing.assert_close(block(x), F.conv2d(x, (left @ right)[:, :, None, None]), rtol=1e-5, atol=1e-5)
    assert block.rank == 2 and block.bias is None
    with pytest.raises(ValueError, match="1x1 convolutions"):
        LowRankConv1x1.empty(nn.Conv2d(2, 2, 3), 1)


def test_low_rank_linear_equals_the_linear_at_full_rank():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    layer = LowRankLinear.from_factors((u * s, vh), bias=linear.bias.detach())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer.to_linear()(x), linear(x))
    assert layer.rank == 4 and "rank=4" in repr(layer)
    fresh = LowRankLinear.empty(linear, 4)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    for convention in ("conv+linear", "reference"):
        counted = count_complexity(layer.float(), (1, 6), convention=convention)
        assert (counted.macs, counted.params) == (4 * 6 + 4 * 4, 4 * 6 + 4 * 4 + 4)
