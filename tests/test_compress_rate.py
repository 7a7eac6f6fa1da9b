"""Parsing the paper's compress-rate strings: known answers, exact error positions, no eval."""
import math

import pytest

from norton.compress_rate import format_compress_rate, parse_compress_rate
from norton.errors import UserError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("[0.]+[0.1]*2+[0.4]*5+[0.75]*12", [0.0] + [0.1] * 2 + [0.4] * 5 + [0.75] * 12),
        ("[0.6]*6+[0.8]*7", [0.6] * 6 + [0.8] * 7),
        ("[0.]*100", [0.0] * 100),
        ("[0.]+[0.08]*6+[0.09]*6+[0.08]*26", [0.0] + [0.08] * 6 + [0.09] * 6 + [0.08] * 26),
        ("[0.25]", [0.25]),
        (" [ 0.1 , .2 ] * 2 + [ 3e-1 ] ", [0.1, 0.2, 0.1, 0.2, 0.3]),
        ("[0, 0.5,]", [0.0, 0.5]),
    ],
)
def test_parses_known_specs(spec, expected):
    assert parse_compress_rate(spec) == expected


@pytest.mark.parametrize(
    ("spec", "position", "what"),
    [
        ("[0.1]*x", 6, "repeat count"),
        ("[1.0]", 1, "outside [0, 1)"),
        ("0.1", 0, "expected '['"),
        ("[0.1", 4, "expected ']'"),
        ("[0.1]*2+", 8, "expected '['"),
        ("[0.1]]", 5, "expected '+'"),
        ("[0.1]*0", 6, "at least 1"),
        ("[-0.1]", 1, "expected a number"),
        ("[0.1]-[0.2]", 5, "expected '+'"),
        ("[0.1;0.2]", 4, "expected ']'"),
    ],
)
def test_errors_say_what_and_where(spec, position, what):
    with pytest.raises(UserError) as info:
        parse_compress_rate(spec)
    message = str(info.value)
    assert what in message
    assert f"position {position}" in message
    assert "\n" not in message


def test_never_evaluates_code():
    with pytest.raises(ValueError, match="position 0"):
        parse_compress_rate("__import__('os').getcwd()")
    with pytest.raises(ValueError):
        parse_compress_rate("[0.1]*(2+1)")


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec_is_an_error(spec):
    with pytest.raises(UserError, match="empty"):
        parse_compress_rate(spec)


def test_list_passes_through_as_floats():
    rates = parse_compress_rate([0, 0.5, 0.25])
    assert rates == [0.0, 0.5, 0.25]
    assert all(type(rate) is float for rate in rates)
    assert parse_compress_rate((0.1,)) == [0.1]


@pytest.mark.parametrize("bad", [[1.0], [-0.1], [math.nan], [True], ["0.1"], [0.1, 1.5]])
def test_list_entries_are_validated(bad):
    with pytest.raises(UserError, match="entry"):
        parse_compress_rate(bad)


def test_other_types_are_rejected():
    with pytest.raises(UserError, match="string"):
        parse_compress_rate(0.5)


@pytest.mark.parametrize("rates", [[0.0] + [0.1] * 2 + [0.4] * 5, [0.5], [0.1, 0.2, 0.1], [1e-3] * 3])
def test_format_round_trips(rates):
    spec = format_compress_rate(rates)
    assert parse_compress_rate(spec) == rates
    assert spec.count("+") == len({i for i in range(len(rates)) if i == 0 or rates[i] != rates[i - 1]}) - 1


@pytest.mark.parametrize(
    ("spec", "position"),
    [
        ("[0.1]*99999999999", 6),  # once a 800 GB list
        ("[0.1]*" + "9" * 5000, 6),  # beyond Python's int-parsing limit
        ("[0.1]*5000+[0.2]*5001", 17),  # the sum, not each term, is bounded
        ("[0.1, 0.2]*5001", 11),
    ],
)
def test_a_spec_longer_than_the_limit_is_refused_before_it_is_expanded(spec, position):
    with pytest.raises(UserError, match=f"more than 10,000 rates at position {position}"):
        parse_compress_rate(spec)


def test_the_limit_itself_is_allowed():
    assert parse_compress_rate("[0.1]*9999+[0.2]") == [0.1] * 9999 + [0.2]
    assert parse_compress_rate("[0.5]*0000010") == [0.5] * 10  # leading zeros are not digits of size
    with pytest.raises(UserError, match="at most 10,000"):
        parse_compress_rate([0.1] * 10_001)
