import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norton.complexity import count_complexity
from norton.decomposition.factorized import chain_macs
from norton.decomposition.tucker2_conv import Tucker2Conv


def random_factors(c=5, n=7, ranks=(3, 4), kernel=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(c, ranks[0], generator=g, dtype=torch.float64)
    core = torch.randn(ranks[1], ranks[0], *kernel, generator=g, dtype=torch.float64)
    last = torch.randn(n, ranks[1], generator=g, dtype=torch.float64)
    return first, core, last


@pytest.mark.parametrize("geometry", [
    {}, {"stride": 2, "padding": 1}, {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)},
    {"padding": 1, "padding_mode": "reflect"}, {"padding": (1, 1), "padding_mode": "circular"},
])
def test_forward_is_the_convolution_by_the_reconstructed_kernel(geometry):
    first, core, last = random_factors()
    bias = torch.randn(7, dtype=torch.float64)
    block = Tucker2Conv.from_factors((first, core, last), bias=bias, **geometry)
    expected_weight = torch.einsum("nq,qpij,cp->ncij", last, core, first)
    torch.testing.assert_close(block.dense_weight(), expected_weight)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    conv = block.to_conv()
    assert type(conv) is nn.Conv2d and conv.padding_mode == geometry.get("padding_mode", "zeros")
    torch.testing.assert_close(block(x), conv(x), rtol=1e-10, atol=1e-10)
    if geometry.get("padding_mode", "zeros") == "zeros":
        reference = F.conv2d(x, expected_weight, bias, block.stride, block.padding, block.dilation)
        torch.testing.assert_close(block(x), reference, rtol=1e-10, atol=1e-10)


def test_full_rank_factors_from_the_identity_are_exact():
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2).double()
    first, last = torch.eye(4, dtype=torch.float64), torch.eye(6, dtype=torch.float64)
    block = Tucker2Conv.from_factors((first, conv.weight.detach(), last), bias=conv.bias.detach(), stride=2, padding=1)
    assert block.rank == (4, 6) and block.in_channels == 4 and block.out_channels == 6
    x = torch.randn(1, 4, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-12, atol=1e-12)


def test_empty_has_the_shapes_to_load_a_state_dict():
    block = Tucker2Conv.from_factors(random_factors(), bias=torch.zeros(7, dtype=torch.float64), stride=2)
    conv = nn.Conv2d(5, 7, (3, 2), stride=2, dtype=torch.float64)
    fresh = Tucker2Conv.empty(conv, (3, 4))
    fresh.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(1, 5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), block(x))
    assert sorted(block.state_dict()) == ["core.weight", "first.weight", "last.bias", "last.weight"]
    assert "rank=(3, 4)" in repr(block) and "stride=(2, 2)" in repr(block)


def test_children_are_plain_convs_counted_by_both_conventions():
    block = Tucker2Conv.from_factors(random_factors(), stride=2, padding=1).float()
    assert all(type(child) is nn.Conv2d for child in block.children())
    closed = chain_macs(block, (10, 12))
    # 1x1 on 10x12, core (4 x 3 x 3 x 2) and last 1x1 on the 5x7 output
    assert closed == 10 * 12 * 5 * 3 + 5 * 7 * 4 * 3 * 3 * 2 + 5 * 7 * 4 * 7
    params = 5 * 3 + 4 * 3 * 3 * 2 + 7 * 4
    for convention in ("conv+linear", "reference"):
        counted = count_complexity(block, (5, 10, 12), convention=convention)
        assert (counted.macs, counted.params) == (closed, params)


def test_bad_factors_and_shapes_are_refused():
    first, core, last = random_factors()
    with pytest.raises(ValueError, match="core must have shape"):
        Tucker2Conv.from_factors((first, core.transpose(0, 1), last))
    with pytest.raises(ValueError, match="in_rank must be a positive integer"):
        Tucker2Conv(4, 4, (0, 2))
