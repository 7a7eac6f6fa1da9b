"""MAC and parameter counting: hand-checked layers, the paper's numbers, thop/ptflops as oracles."""
import contextlib
import io

import pytest
import torch
from torch import nn

from norton.complexity import count_complexity
from norton.errors import UserError
from norton.models import create_model


def small_cnn() -> nn.Module:
    """Every layer type the paper's networks use, plus a grouped conv and biases."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.Linear(32, 5, bias=False),
    )


# ----------------------------------------------------------- known answers
def test_conv_and_linear_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    result = count_complexity(model, (3, 10, 10))
    assert result.macs == 8 * 10 * 10 * (3 * 3 * 3) + 800 * 5  # out elements x C_in x k x k, then in x out
    assert result.params == (8 * 27 + 8) + (800 * 5 + 5)


def test_grouped_and_strided_conv_by_hand():
    model = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
    assert count_complexity(model, (8, 16, 16)).macs == 8 * 8 * 8 * (2 * 9)


def test_conv_plus_linear_leaves_out_normalisation_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    assert count_complexity(model, (3, 2, 2)).params == 12
    assert count_complexity(model, (3, 2, 2), convention="thop").params == 20


# -------------------------------------------------------- the paper's numbers
@pytest.mark.parametrize(
    ("name", "rank", "spec", "side", "macs", "params"),
    [
        ("vgg_16_bn", 1, "[0.6]*6+[0.8]*7", 32, 4_582_498, 149_648),
        ("densenet_40", 8, "[0.]+[0.08]*6+[0.09]*6+[0.08]*26", 32, 213_587_810, 745_468),
        ("resnet_50", 1, "[0.]+[0.1]*2+[0.4]*5+[0.75]*12", 224, 923_650_408, 5_885_736),
    ],
)
def test_reference_convention_reproduces_the_readme(name, rank, spec, side, macs, params):
    model = create_model(name, rank=rank, compress_rate=spec)
    result = count_complexity(model, (3, side, side), convention="reference")
    assert (result.macs, result.params) == (macs, params)


@pytest.mark.parametrize(
    ("name", "side", "mega_macs", "mega_params"),
    [("resnet_56", 32, 125.49, 0.85), ("densenet_40", 32, 282.92, 1.04), ("resnet_50", 224, 4089.18, 25.50)],
)
def test_conv_linear_convention_gives_the_paper_baselines(name, side, mega_macs, mega_params):
    result = count_complexity(create_model(name), (3, side, side))
    assert round(result.macs / 1e6, 2) == mega_macs
    assert round(result.params / 1e6, 2) == mega_params


# ---------------------------------------------------------------- oracles
def thop_count(model, shape):
    from thop import profile

    with contextlib.redirect_stdout(io.StringIO()):
        macs, params = profile(model, inputs=(torch.randn(1, *shape),), verbose=False)
    return round(macs), round(params)


def ptflops_count(model, shape):
    from ptflops import get_model_complexity_info

    # The reference's ptflops (2023) had no functional patching; 0.7's switch reproduces it.
    return get_model_complexity_info(
        model, shape, as_strings=False, print_per_layer_stat=False,
        backend_specific_config={"count_functional": False},
    )


ORACLE_MODELS = {
    "small_cnn": (small_cnn, (3, 16, 16)),
    "resnet_56_compressed_rank2": (lambda: create_model("resnet_56", rank=2, compress_rate="[0.1]+[0.25]*2+[0.5]*27"), (3, 16, 16)),
    "vgg_16_bn_rank1": (lambda: create_model("vgg_16_bn", rank=1, compress_rate="[0.5]*13"), (3, 32, 32)),
}


@pytest.fixture(scope="module", params=sorted(ORACLE_MODELS))
def oracle_case(request):
    build, shape = ORACLE_MODELS[request.param]
    model = build()
    return model, shape, thop_count(model, shape), ptflops_count(model, shape)


def test_thop_convention_equals_thop(oracle_case):
    model, shape, thop, _ = oracle_case
    result = count_complexity(model, shape, convention="thop")
    assert (result.macs, result.params) == thop


def test_ptflops_modules_convention_equals_ptflops(oracle_case):
    model, shape, _, ptflops = oracle_case
    result = count_complexity(model, shape, convention="ptflops-modules")
    assert (result.macs, result.params) == ptflops


def test_reference_is_the_minimum_of_both_tools(oracle_case):
    model, shape, thop, ptflops = oracle_case
    result = count_complexity(model, shape, convention="reference")
    assert (result.macs, result.params) == (min(thop[0], ptflops[0]), min(thop[1], ptflops[1]))
    alias = count_complexity(model, shape, convention="ptflops")
    assert (alias.macs, alias.params, alias.convention) == (result.macs, result.params, "reference")


# ------------------------------------------------------------- mechanics
@pytest.mark.parametrize("convention", ["conv+linear", "reference", "thop", "ptflops-modules"])
def test_per_layer_rows_sum_to_the_totals(convention):
    model = create_model("resnet_56", rank=1, compress_rate="[0.]+[0.2]*29")
    shape = (3, 8, 8)  # small: the structure, not the resolution, is under test
    result = count_complexity(model, shape, convention=convention, per_layer=True)
    assert sum(row.macs for row in result.layers) == result.macs
    assert sum(row.params for row in result.layers) == result.params
    assert len({row.name for row in result.layers}) == len(result.layers)
    assert count_complexity(model, shape, convention=convention).layers == []


def test_cpd_block_bias_is_counted_as_a_weight():
    model = create_model("vgg_16_bn", rank=1, compress_rate="[0.5]*13")
    rows = {row.name: row for row in count_complexity(model, (3, 32, 32), per_layer=True).layers}
    assert rows["features.conv0"].type == "CPDBlock" and rows["features.conv0"].params == 32
    assert rows["features.conv0.feature.pointwise"].macs == 32 * 32 * 32 * 3


def test_batch_dimension_is_optional_and_numbers_are_per_sample():
    model = small_cnn()
    single = count_complexity(model, (3, 16, 16), convention="reference")
    assert count_complexity(model, (1, 3, 16, 16), convention="reference") == single
    double = count_complexity(model, (2, 3, 16, 16), convention="reference")
    assert (double.macs, double.params) == (single.macs, single.params)


def test_training_mode_is_restored_and_hooks_removed():
    model = small_cnn().train()
    model[1].eval()
    count_complexity(model, (3, 16, 16))
    assert model.training and not model[1].training and model[2].training
    assert all(not module._forward_hooks for module in model.modules())


def test_hooks_are_removed_when_the_forward_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(7, 2)).train()
    with pytest.raises(RuntimeError):
        count_complexity(model, (3, 8, 8))
    assert model.training
    assert all(not module._forward_hooks for module in model.modules())


def test_unknown_convention_is_an_error():
    with pytest.raises(UserError, match="convention"):
        count_complexity(small_cnn(), (3, 16, 16), convention="flops")


@pytest.mark.parametrize("size", [(0, 3, 16, 16), (3, 0, 16), ("a", 1), (3,), (True, 16, 16)])
def test_bad_input_size_is_an_error(size):
    with pytest.raises(UserError, match="input_size"):
        count_complexity(small_cnn(), size)
