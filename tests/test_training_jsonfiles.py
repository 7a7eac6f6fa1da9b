"""Tests for norton.training.jsonfiles: what norton writes is JSON any reader accepts."""
from __future__ import annotations

import json
import math

from norton.training.jsonfiles import append_jsonl, dumps, json_safe, write_json, write_jsonl


def strict_loads(text: str):
    """``json.loads`` that refuses NaN and Infinity, as JavaScript's JSON.parse and jq do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"a": math.nan, "b": [1.0, -math.inf, {"c": math.inf}], "d": (2, "x"), "e": None}
    assert json_safe(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None}
    assert strict_loads(dumps(value)) == json_safe(value)


def test_numpy_floats_are_made_safe_too():
    import numpy as np

    assert strict_loads(dumps({"x": np.float64("nan"), "y": np.float64(2.5)}, indent=2)) == {"x": None, "y": 2.5}


def test_files_are_strict_json(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"loss": math.nan}])
    append_jsonl(tmp_path / "m.jsonl", {"loss": 1.0})
    assert [strict_loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        {"loss": None}, {"loss": 1.0}]
    write_json(tmp_path / "r.json", {"test": {"loss": math.inf}})
    assert strict_loads((tmp_path / "r.json").read_text()) == {"test": {"loss": None}}
