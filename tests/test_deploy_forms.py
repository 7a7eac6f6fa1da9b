"""Equivalent forms of a CPDBlock (norton.deploy.forms): inference forms, training forms, folded BatchNorms."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _factories import random_batchnorm
from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.batchnorm import fold_batchnorm
from norton.deploy.forms import (
    INFERENCE_FORMS,
    TRAINING_FORMS,
    GroupedCPDConv,
    MergedCPDConv,
    TrainingFormCPDBlock,
    build_form,
    form_of,
    form_of_block,
    forms_restored,
    set_training_form,
)
from norton.errors import UserError

# (in, out, rank, kernel, stride, padding, dilation, bias, padding_mode)
BLOCK_CONFIGS = [
    (6, 5, 3, 3, 1, 1, 1, True, "zeros"),
    (4, 7, 2, (3, 5), (2, 1), (1, 2), (1, 2), False, "zeros"),
    (5, 4, 1, (1, 3), 2, (0, 1), 1, True, "zeros"),
    (3, 6, 4, 3, 1, 2, 2, False, "reflect"),
    (8, 8, 2, (5, 3), (1, 2), 0, 1, True, "circular"),
]


def _random_block(config, seed: int = 0) -> CPDBlock:
    c_in, n, r, k, s, p, d, bias, mode = config
    torch.manual_seed(seed)
    block = CPDBlock(c_in, n, r, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_()
    return block



def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _input(block: CPDBlock, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(batch, block.in_channels, 11, 9)


# ------------------------------------------------------------------ forms
@pytest.mark.parametrize("config", BLOCK_CONFIGS)
@pytest.mark.parametrize("form", INFERENCE_FORMS)
def test_inference_form_equals_block(config, form):
    block = _random_block(config).eval()
    x = _input(block)
    module = build_form(block, form)
    assert form_of(module) == form
    with torch.no_grad():
        assert _relative(module(x), block(x)) < 1e-4


@pytest.mark.parametrize("config", BLOCK_CONFIGS)
@pytest.mark.parametrize("form", INFERENCE_FORMS)
def test_inference_form_after_batchnorm_folding_equals_block_then_bn(config, form):
    block = _random_block(config).eval()
    bn = random_batchnorm(block.out_channels)
    x = _input(block)
    with torch.no_grad():
        expected = bn(block(x))
        folded = copy.deepcopy(block)
        fold_batchnorm(folded, bn)
        assert folded.bias is not None
        assert _relative(build_form(folded, form)(x), expected) < 1e-4


def test_forms_are_built_from_plain_convolutions():
    block = _random_block(BLOCK_CONFIGS[0])
    for form in ("merged", "grouped", "dense"):
        leaves = [m for m in build_form(block, form).modules() if not list(m.children())]
        assert leaves and all(type(m) is nn.Conv2d for m in leaves), form
    grouped = build_form(block, "grouped")
    assert isinstance(grouped, GroupedCPDConv) and grouped.grouped.groups == block.out_channels


def test_batchnorm_fold_into_merged_form_and_conv():
    block = _random_block(BLOCK_CONFIGS[1]).eval()
    bn = random_batchnorm(block.out_channels)
    x = _input(block)
    merged = MergedCPDConv(block)
    conv = build_form(block, "dense")
    with torch.no_grad():
        expected = bn(block(x))
        fold_batchnorm(merged, bn)
        fold_batchnorm(conv, bn)
        assert _relative(merged(x), expected) < 1e-4
        assert _relative(conv(x), expected) < 1e-4


# ------------------------------------------------------------------ training forms
@pytest.mark.parametrize("config", BLOCK_CONFIGS[:4])
def test_training_forms_give_same_outputs_and_factor_gradients(config):
    reference = _random_block(config).train()
    x = _input(reference).requires_grad_(True)
    out = reference(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}
    expected_x = x.grad.clone()
    for form in TRAINING_FORMS:
        block = copy.deepcopy(reference)
        block.zero_grad(set_to_none=True)
        x.grad = None
        set_training_form(block, form)
        y = block(x)
        assert _relative(y, out) < 1e-4, form
        y.backward(grad_out)
        for name, p in block.named_parameters():
            assert _relative(p.grad, expected[name]) < 1e-4, (form, name)
        assert _relative(x.grad, expected_x) < 1e-4, form


def test_training_form_keeps_parameters_and_state_dict_keys():
    block = _random_block(BLOCK_CONFIGS[0])
    params = {name: p for name, p in block.named_parameters()}
    keys = list(block.state_dict())
    set_training_form(block, "dense")
    assert type(block) is TrainingFormCPDBlock and isinstance(block, CPDBlock)
    assert list(block.state_dict()) == keys
    assert all(p is params[name] for name, p in block.named_parameters())
    set_training_form(block, "cpd")
    assert type(block) is CPDBlock
    with pytest.raises(UserError):
        set_training_form(block, "fast")


def test_forms_restored_puts_every_block_back_in_its_entry_form_even_after_an_error():
    blocks = [_random_block(config, seed) for seed, config in enumerate(BLOCK_CONFIGS[:3])]
    model = nn.Sequential(*blocks)
    set_training_form(blocks[1], "merged")
    set_training_form(blocks[2], "dense")
    with pytest.raises(RuntimeError, match="stop"), forms_restored(model):
        for block in blocks:
            set_training_form(block, "grouped")
        assert [form_of_block(b) for b in blocks] == ["grouped"] * 3
        raise RuntimeError("stop")
    assert [form_of_block(b) for b in blocks] == ["cpd", "merged", "dense"]
    assert type(blocks[0]) is CPDBlock
