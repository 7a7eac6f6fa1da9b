"""CPDBlock: equivalence with its dense convolution, factor round trips, checkpoint keys, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from norton.decomposition.cp_tensor import cp_to_tensor
from norton.decomposition.cpd_block import CPDBlock, check_decomposable


def random_block(c_in=5, c_out=4, rank=3, kernel=(3, 3), *, bias=True, seed=0, **kwargs) -> CPDBlock:
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    factors = (torch.randn(c_out, c_in, rank, generator=g), torch.randn(c_out, kh, rank, generator=g),
               torch.randn(c_out, kw, rank, generator=g))
    return CPDBlock.from_factors(factors, bias=torch.randn(c_out, generator=g) if bias else None, **kwargs)


def exact_rank_conv(c_in, c_out, rank, kernel=(3, 3), *, seed=0, **kwargs) -> nn.Conv2d:
    """A conv whose every filter is an exact, well-conditioned rank-``rank`` CP tensor."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.linalg.qr(torch.randn(c_out, size, rank, generator=g))[0] for size in (c_in, *kernel)]
    factors[0] = factors[0] * (1 + torch.rand(c_out, 1, rank, generator=g))
    conv = nn.Conv2d(c_in, c_out, kernel, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(cp_to_tensor(tuple(factors)))
    return conv


GEOMETRIES = [
    dict(kernel=(3, 3), padding=1),
    dict(kernel=(3, 3), stride=2, padding=1),
    dict(kernel=(3, 5), stride=(1, 2), padding=(1, 2)),
    dict(kernel=(5, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    dict(kernel=(3, 3), padding=2, dilation=2),
    dict(kernel=(1, 3), padding=(0, 1)),
    dict(kernel=(3, 3), padding=1, padding_mode="reflect"),
    dict(kernel=(3, 3), padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_block_equals_its_dense_conv(geometry, bias):
    geometry = dict(geometry)
    kernel = geometry.pop("kernel")
    block = random_block(kernel=kernel, bias=bias, **geometry)
    conv = block.to_conv()
    assert conv.kernel_size == kernel and (conv.bias is not None) == bias
    x = torch.randn(2, 5, 11, 10)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-4, atol=1e-4)


def test_dense_weight_is_the_cp_tensor_of_the_factors():
    block = random_block(kernel=(3, 5))
    torch.testing.assert_close(block.dense_weight(), cp_to_tensor(block.factors()))


def test_dense_weight_gradient_matches_the_einsum_definition():
    block = random_block(c_in=6, c_out=4, rank=3, kernel=(3, 5))
    n, r = block.out_channels, block.rank
    weights = [conv.weight for conv in block.feature]  # pointwise, vertical, horizontal
    head, body, tail = (w.reshape(r, n, -1) for w in weights)  # (R, N, C_in), (R, N, k_h), (R, N, k_w)
    expected = torch.einsum("rnc,rnh,rnw->nchw", head, body, tail)
    grad = torch.randn_like(expected)
    for ours, reference in zip(torch.autograd.grad(block.dense_weight(), weights, grad),
                               torch.autograd.grad(expected, weights, grad), strict=False):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_factors_round_trip():
    block = random_block(c_in=6, c_out=4, rank=2, kernel=(3, 5))
    factors = tuple(f.clone() for f in block.factors())
    assert [tuple(f.shape) for f in factors] == [(4, 6, 2), (4, 3, 2), (4, 5, 2)]
    other = random_block(c_in=6, c_out=4, rank=2, kernel=(3, 5), seed=1)
    other.set_factors(factors)
    for mine, theirs in zip(factors, other.factors(), strict=False):
        assert torch.equal(mine, theirs)
    rebuilt = CPDBlock.from_factors(factors)
    for mine, theirs in zip(factors, rebuilt.factors(), strict=False):
        assert torch.equal(mine, theirs)


def test_state_dict_keys_and_shapes_are_the_reference_ones():
    block = random_block(c_in=5, c_out=4, rank=3, kernel=(3, 2))
    shapes = {key: tuple(value.shape) for key, value in block.state_dict().items()}
    assert shapes == {
        "feature.pointwise.weight": (12, 5, 1, 1),
        "feature.vertical.weight": (12, 1, 3, 1),
        "feature.horizontal.weight": (12, 1, 1, 2),
        "bias": (4,),
    }
    assert set(random_block(bias=False).state_dict()) == {
        "feature.pointwise.weight", "feature.vertical.weight", "feature.horizontal.weight",
    }


@pytest.mark.parametrize(
    "kernel, kwargs",
    [((3, 3), dict(padding=1)), ((3, 3), dict(stride=2, padding=1, bias=False)), ((3, 5), dict(padding=(1, 2))),
     ((3, 3), dict(padding=2, dilation=2))],
    ids=str,
)
def test_from_conv_of_an_exact_rank_conv_reproduces_it(kernel, kwargs):
    conv = exact_rank_conv(6, 5, 3, kernel, **kwargs)
    block = CPDBlock.from_conv(conv, 3, n_iter_max=500)
    assert block.rank == 3 and block.reconstruction_error.shape == (5,)
    assert block.reconstruction_error.max() < 1e-4
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-3, atol=1e-3)


def test_from_conv_with_padding_same():
    conv = exact_rank_conv(4, 3, 2, (3, 5), padding="same")
    block = CPDBlock.from_conv(conv, 2, n_iter_max=500)
    assert block.padding == (1, 2)
    x = torch.randn(1, 4, 8, 7)
    torch.testing.assert_close(block(x), conv(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="asymmetric"):
        CPDBlock.from_conv(nn.Conv2d(4, 3, 4, padding="same"), 2)


def test_from_conv_keeps_dtype_and_decomposes_rank_above_kernel_size():
    conv = nn.Conv2d(4, 3, 3).double()
    block = CPDBlock.from_conv(conv, 12)  # 12 > 3*3
    assert block.feature.pointwise.weight.dtype == torch.float64
    assert torch.isfinite(block.dense_weight()).all()
    assert block.reconstruction_error.max() < 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda: CPDBlock.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2),
        lambda: CPDBlock.from_conv(nn.Conv2d(4, 4, 3, groups=4), 2),
        lambda: CPDBlock.from_conv(nn.Conv2d(4, 4, 3), 0),
        lambda: CPDBlock.from_conv(nn.Conv2d(4, 4, 3), 1.5),
        lambda: CPDBlock.from_conv(nn.Conv2d(4, 4, 3), True),
        lambda: CPDBlock.from_conv(nn.LazyConv2d(4, 3), 2),
        lambda: CPDBlock(4, 4, 0),
        lambda: CPDBlock(4, 4, 2, kernel_size=(3, 3, 3)),
        lambda: random_block(rank=3).set_factors(random_block(rank=2).factors()),
        lambda: check_decomposable(nn.Linear(3, 3)),
    ],
)
def test_bad_layers_and_ranks_raise_value_error(make):
    with pytest.raises(ValueError):
        make()
