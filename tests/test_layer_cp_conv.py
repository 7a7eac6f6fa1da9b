import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norton.complexity import count_complexity
from norton.decomposition.factorized import chain_macs
from norton.decomposition.layer_cp_conv import LayerCPConv


def random_factors(c=5, n=7, rank=4, kernel=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((c, rank), (kernel[0], rank), (kernel[1], rank), (n, rank))
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes)


@pytest.mark.parametrize("geometry", [
    {}, {"stride": 2, "padding": 1}, {"stride": (1, 2), "padding": (2, 1), "dilation": (2, 1)},
    {"padding": 1, "padding_mode": "reflect"}, {"padding": (1, 1), "padding_mode": "replicate"},
])
def test_forward_is_the_convolution_by_the_reconstructed_kernel(geometry):
    first, vertical, horizontal, last = factors = random_factors()
    bias = torch.randn(7, dtype=torch.float64)
    block = LayerCPConv.from_factors(factors, bias=bias, **geometry)
    expected_weight = torch.einsum("nr,cr,ir,jr->ncij", last, first, vertical, horizontal)
    torch.testing.assert_close(block.dense_weight(), expected_weight)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), block.to_conv()(x), rtol=1e-10, atol=1e-10)
    if geometry.get("padding_mode", "zeros") == "zeros":
        reference = F.conv2d(x, expected_weight, bias, block.stride, block.padding, block.dilation)
        torch.testing.assert_close(block(x), reference, rtol=1e-10, atol=1e-10)


def test_empty_shapes_repr_and_depthwise_children():
    block = LayerCPConv.from_factors(random_factors(), bias=torch.zeros(7, dtype=torch.float64), stride=2)
    fresh = LayerCPConv.empty(nn.Conv2d(5, 7, (3, 2), stride=2, dtype=torch.float64), 4)
    fresh.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(1, 5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), block(x))
    assert block.vertical.groups == block.horizontal.groups == 4 and block.rank == 4
    assert "rank=4" in repr(block)


def test_children_are_counted_by_both_conventions():
    block = LayerCPConv.from_factors(random_factors(), stride=2, padding=1).float()
    closed = chain_macs(block, (10, 12))
    # first on 10x12; vertical (stride 2 in height) -> 5x12; horizontal -> 5x7; last on 5x7
    assert closed == 10 * 12 * 5 * 4 + 5 * 12 * 4 * 3 + 5 * 7 * 4 * 2 + 5 * 7 * 4 * 7
    for convention in ("conv+linear", "reference"):
        counted = count_complexity(block, (5, 10, 12), convention=convention)
        assert (counted.macs, counted.params) == (closed, 5 * 4 + 4 * 3 + 4 * 2 + 7 * 4)


def test_bad_factors_are_refused():
    first, vertical, horizontal, last = random_factors()
    with pytest.raises(ValueError, match="factor last must have shape"):
        LayerCPConv.from_factors((first, vertical, horizontal, last[:, :2]))
