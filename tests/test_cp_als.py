"""Batched CP-ALS on problems with known answers (tensorly-style), plus tensorly as an oracle."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import tensorly
import torch
from tensorly.decomposition import parafac
from torch import nn

from norton.decomposition.cp_als import compress_head, cp_als, cp_als_many
from norton.decomposition.cp_tensor import cp_to_tensor, relative_error
from norton.errors import UserError


def planted(batch: int, shape: tuple[int, int, int], rank: int, *, dtype=torch.float32, seed: int = 0):
    """Exact rank-``rank`` tensors ``(batch, *shape)`` with well-conditioned random factors.

    Columns are orthonormalised (QR of a Gaussian draw) and scaled by random weights
    in [1, 2], so the planted decomposition is unique and ALS can find it.
    """
    g = torch.Generator().manual_seed(seed)
    factors = []
    for size in shape:
        q, _ = torch.linalg.qr(torch.randn(batch, size, rank, generator=g, dtype=torch.float64))
        factors.append(q)
    weights = 1 + torch.rand(batch, 1, rank, generator=g, dtype=torch.float64)
    factors[0] = factors[0] * weights
    return cp_to_tensor(tuple(factors)).to(dtype)


def conv_filters(c_in: int, c_out: int, kernel=3, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, kernel).weight.detach()  # default (Kaiming-uniform) init


# rank <= the smaller kernel side: by Kruskal's condition the planted decomposition is the
# only one, so "recovered" is well defined; (3, 3, 3) and (6, 4, 2) skip the head compression
@pytest.mark.parametrize(
    "shape, rank",
    [((16, 3, 3), 1), ((16, 3, 3), 2), ((16, 3, 3), 3), ((3, 3, 3), 3), ((24, 5, 5), 5), ((6, 4, 2), 2)],
)
def test_planted_rank_is_recovered(shape, rank):
    tensors = planted(8, shape, rank)
    factors, errors = cp_als(tensors, rank, n_iter_max=500)
    assert [tuple(f.shape) for f in factors] == [(8, shape[0], rank), (8, shape[1], rank), (8, shape[2], rank)]
    assert errors.max() < 1e-4
    assert relative_error(tensors, factors).max() < 1e-4


def test_planted_rank_is_recovered_in_float64():
    tensors = planted(8, (16, 3, 3), 3, dtype=torch.float64)
    factors, errors = cp_als(tensors, 3, n_iter_max=500, tol=1e-14)
    assert all(f.dtype == torch.float64 for f in factors) and errors.dtype == torch.float64
    assert errors.max() < 1e-10
    assert relative_error(tensors, factors).max() < 1e-10


def test_returned_errors_are_the_reconstruction_errors():
    filters = conv_filters(32, 24)
    factors, errors = cp_als(filters, 4)
    assert errors.shape == (24,)
    assert 0.05 < errors.mean() < 1  # random filters are far from rank 4: a real test of the formula
    torch.testing.assert_close(errors, relative_error(filters, factors), rtol=0, atol=1e-5)


def test_error_never_increases_and_history_ends_at_the_result():
    filters = conv_filters(16, 12)
    _, errors, history = cp_als(filters, 6, n_iter_max=60, tol=0, return_history=True)
    assert history.shape[1] == 12 and 1 < history.shape[0] <= 60
    assert (history[1:] <= history[:-1]).all()
    assert (history[-1] < history[0]).all()  # it does make progress
    torch.testing.assert_close(history[-1], errors)


def test_stops_once_every_tensor_has_converged():
    filters = conv_filters(16, 12)
    _, _, loose = cp_als(filters, 4, n_iter_max=500, tol=1e-2, return_history=True)
    _, _, tight = cp_als(filters, 4, n_iter_max=500, tol=0, return_history=True)
    assert loose.shape[0] < 20 < tight.shape[0]


def test_random_init_same_seed_same_result_other_seed_other_result():
    filters = conv_filters(16, 6)
    first, first_errors = cp_als(filters, 5, init="random", seed=3, n_iter_max=20)
    again, again_errors = cp_als(filters, 5, init="random", seed=3, n_iter_max=20)
    other, _ = cp_als(filters, 5, init="random", seed=4, n_iter_max=20)
    for a, b in zip(first, again, strict=False):
        assert torch.equal(a, b)
    assert torch.equal(first_errors, again_errors)
    assert not torch.equal(first[1], other[1])


def test_svd_init_is_deterministic_whatever_the_global_rng():
    filters = conv_filters(16, 6)
    torch.manual_seed(1)
    first, _ = cp_als(filters, 12, n_iter_max=20)  # rank 12 > 3: needs filler columns
    torch.manual_seed(2)
    again, _ = cp_als(filters, 12, n_iter_max=20)
    for a, b in zip(first, again, strict=False):
        assert torch.equal(a, b)


def test_all_zero_tensors_give_zero_factors_and_zero_error():
    tensors = conv_filters(8, 5)
    tensors[1] = 0
    tensors[3] = 0
    factors, errors = cp_als(tensors, 4)
    assert errors[1] == 0 and errors[3] == 0
    for f in factors:
        assert torch.isfinite(f).all()
        assert (f[[1, 3]] == 0).all()
    assert (errors[[0, 2, 4]] > 0).all()  # the others are decomposed as usual

    factors, errors = cp_als(torch.zeros(2, 4, 3, 3), 3)
    assert (errors == 0).all() and all((f == 0).all() for f in factors)


def test_a_broken_step_is_never_taken(monkeypatch):
    # if every solve failed (NaN), the start (head factor 0) must come back, not NaN
    monkeypatch.setattr(importlib.import_module("norton.decomposition.cp_als"), "_solve", lambda rhs, gram: rhs * float("nan"))
    filters = conv_filters(16, 4)
    factors, errors = cp_als(filters, 3)
    assert all(torch.isfinite(f).all() for f in factors)
    torch.testing.assert_close(errors, torch.ones(4))
    torch.testing.assert_close(relative_error(filters, factors), torch.ones(4))


@pytest.mark.parametrize("shape, rank", [((2, 3, 3), 20), ((1, 1, 1), 3), ((12, 3, 3), 10)])
def test_rank_larger_than_mode_sizes(shape, rank):
    # 20 > every mode and > 3*3; 10 > J*K = 9 = the compressed head size
    tensors = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    factors, errors = cp_als(tensors, rank)
    assert all(torch.isfinite(f).all() for f in factors) and torch.isfinite(errors).all()
    assert factors[0].shape == (4, shape[0], rank)
    assert errors.max() < 1e-3  # this rank can fit the tensor exactly
    torch.testing.assert_close(errors, relative_error(tensors, factors), rtol=0, atol=1e-5)


def test_batch_of_one_matches_its_row_in_a_batch():
    tensors = planted(5, (16, 3, 3), 3)
    (a, b, c), errors = cp_als(tensors, 3)
    (a1, b1, c1), errors1 = cp_als(tensors[2:3], 3)
    assert a1.shape == (1, 16, 3) and errors1.shape == (1,)
    assert errors1[0] < 1e-4
    torch.testing.assert_close(cp_to_tensor((a1, b1, c1))[0], cp_to_tensor((a, b, c))[2], rtol=0, atol=1e-4)


def test_factors_are_balanced():
    factors, _ = cp_als(conv_filters(16, 6), 4)
    norms = torch.stack([f.norm(dim=1) for f in factors])  # (3, B, R)
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(norms[0], norms[2], rtol=1e-4, atol=1e-7)


def test_other_dtypes_and_strided_input():
    filters = conv_filters(16, 4)
    half, _ = cp_als(filters.half(), 3)
    assert all(f.dtype == torch.float16 for f in half)
    integer, errors = cp_als((filters * 100).round().int(), 3)
    assert all(f.dtype == torch.float32 for f in integer) and torch.isfinite(errors).all()
    # a non-contiguous view decomposes like its contiguous copy
    view = filters.transpose(2, 3)
    torch.testing.assert_close(cp_als(view, 3)[1], cp_als(view.contiguous(), 3)[1])


def test_parameters_can_be_passed_without_detach():
    conv = nn.Conv2d(8, 4, 3)
    factors, errors = cp_als(conv.weight, 3)
    assert not errors.requires_grad and not any(f.requires_grad for f in factors)


def test_head_compression_is_exact_and_orthonormal():
    filters = conv_filters(32, 4)  # I = 32 > J*K = 9
    basis, core = compress_head(filters)
    assert basis.shape == (4, 32, 9) and core.shape == (4, 9, 3, 3)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(9).expand(4, 9, 9), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.einsum("bim,bmjk->bijk", basis, core), filters, rtol=0, atol=1e-6)
    small = conv_filters(5, 4)  # I = 5 <= 9: nothing to compress
    assert compress_head(small)[0] is None and compress_head(small)[1] is small


def test_cp_als_many_matches_cp_als_per_batch():
    layers = [conv_filters(3, 6, seed=1), conv_filters(24, 5, seed=2), conv_filters(8, 4, kernel=5, seed=3)]
    results = cp_als_many(layers, [3, 3, 4])
    assert len(results) == 3
    for weights, rank, (factors, errors) in zip(layers, [3, 3, 4], results, strict=False):
        n, i, j, k = weights.shape
        assert [tuple(f.shape) for f in factors] == [(n, i, rank), (n, j, rank), (n, k, rank)]
        _, alone = cp_als(weights, rank)
        torch.testing.assert_close(errors, alone, rtol=0, atol=1e-3)
        torch.testing.assert_close(errors, relative_error(weights, factors), rtol=0, atol=1e-5)
    assert cp_als_many([], 3) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda x: cp_als(x, 0),
        lambda x: cp_als(x, -2),
        lambda x: cp_als(x, 2.5),
        lambda x: cp_als(x, True),
        lambda x: cp_als(x[0], 2),  # 3-D
        lambda x: cp_als(x[None], 2),  # 5-D
        lambda x: cp_als(x, 2, init="hosvd"),
        lambda x: cp_als(x, 2, n_iter_max=0),
        lambda x: cp_als(x, 2, tol=-1.0),
        lambda x: cp_als(x.new_full(x.shape, float("nan")), 2),
        lambda x: cp_als(x.numpy(), 2),
        lambda x: cp_als_many([x, x], [2, 2, 2]),
        lambda x: cp_als_many([x], [0]),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError) as info:
        call(torch.randn(2, 4, 3, 3))
    assert isinstance(info.value, UserError)


def test_no_worse_than_tensorly_parafac():
    # the reference implementation's loop: one parafac call per filter, random init, 300
    # iterations. tensorly's default numpy backend in float64 runs the same algorithm as
    # its pytorch backend and is the stronger oracle; it also does not stall on a busy
    # CPU the way hundreds of tiny multi-threaded torch matmuls do.
    filters = conv_filters(32, 4, seed=5)
    _, errors = cp_als(filters, 6)
    reference = []
    for n, weight in enumerate(filters.double().numpy()):
        cp = parafac(weight, rank=6, n_iter_max=300, init="random", random_state=n)
        reference.append(np.linalg.norm(weight - tensorly.cp_to_tensor(cp)) / np.linalg.norm(weight))
    reference = torch.tensor(reference, dtype=torch.float32)
    assert (errors <= reference + 5e-3).all()
    assert errors.mean() <= reference.mean() + 1e-4
