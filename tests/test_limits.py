"""One place for amounts and limits: each check accepts its range and refuses the rest in one line."""
from __future__ import annotations

import math

import pytest

from norton import limits
from norton.errors import UserError


@pytest.mark.parametrize("value", [0, 0.5, 0.999])
def test_ratio_accepts_fractions_in_zero_one(value):
    assert limits.check_ratio(value) == value


@pytest.mark.parametrize("value", [1, -0.1, math.nan, math.inf, True, "0.5", None])
def test_ratio_refuses_the_rest(value):
    with pytest.raises(UserError, match=r"ratio .* \[0, 1\)"):
        limits.check_ratio(value)


def test_ratios_mapping_names_the_layer():
    assert limits.check_ratios({"layer1.*": 0.25}) == {"layer1.*": 0.25}
    with pytest.raises(UserError, match="ratio for 'conv1'"):
        limits.check_ratios({"conv1": 1.5})


@pytest.mark.parametrize("value", [1e-6, 0.5, 1])
def test_target_macs_is_a_fraction_of_the_original_in_zero_one_closed(value):
    assert limits.check_target_macs(value) == value


@pytest.mark.parametrize("value", [0, 1.01, math.nan, -1])
def test_target_macs_refuses_the_rest_and_says_of_what(value):
    with pytest.raises(UserError, match=r"original model's MACs .* \(0, 1\]"):
        limits.check_target_macs(value)


def test_rank_is_bounded_globally_and_by_its_layer():
    assert limits.check_rank(8) == 8
    assert limits.check_rank(9, in_channels=3, kernel_size=(3, 3)) == 9
    with pytest.raises(UserError, match=r"above 9 = C_in x k \(3 x 3\)"):
        limits.check_rank(10, in_channels=3, kernel_size=(3, 3))
    with pytest.raises(UserError, match="65,536"):
        limits.check_rank(10**7)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UserError):
            limits.check_rank(bad)


def test_input_size_bounds_one_image_before_it_is_allocated():
    assert limits.check_input_size((3, 32, 32)) == (3, 32, 32)
    assert limits.check_input_size((1, 3, 224, 224)) == (1, 3, 224, 224)
    with pytest.raises(UserError, match="too large"):
        limits.check_input_size((3, 100_000, 100_000))
    for bad in ((3, 0, 32), (3,), (3, 32.0, 32), 5):
        with pytest.raises(UserError):
            limits.check_input_size(bad)
    with pytest.raises(UserError, match="--input-size"):
        limits.check_image_side(0)


def test_finite_and_learning_rate():
    assert limits.check_learning_rate(0.1) == 0.1
    for bad in (math.nan, math.inf, 0, -1e-3, "0.1"):
        with pytest.raises(UserError, match="learning rate"):
            limits.check_learning_rate(bad)


def test_architecture_kwargs_are_bounded():
    limits.check_architecture_kwargs({"num_classes": 10, "rank": 0, "in_channels": 3, "compress_rate": [0.0] * 3})
    with pytest.raises(UserError, match="num_classes"):
        limits.check_architecture_kwargs({"num_classes": 10**9})
    with pytest.raises(UserError, match="compress_rate has 20,000 entries"):
        limits.check_architecture_kwargs({"compress_rate": [0.0] * 20_000})
