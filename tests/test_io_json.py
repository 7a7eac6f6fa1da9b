"""Strict JSON (norton.io.json_text and the JSON writers): what norton writes is JSON any reader accepts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from norton.io import append_jsonl, json_text, write_json, write_jsonl


def strict_loads(text: str):
    """``json.loads`` that refuses NaN and Infinity, as JavaScript's JSON.parse and jq do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"a": math.nan, "b": [1.0, -math.inf, {"c": math.inf}], "d": (2, "x"), "e": None}
    assert strict_loads(json_text(value)) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None}


def test_numpy_and_tensor_scalars_and_paths():
    import numpy as np

    value = {"x": np.float64("nan"), "y": np.float64(2.5), "t": torch.tensor(3.0), "p": Path("a/b")}
    assert strict_loads(json_text(value, indent=2)) == {"x": None, "y": 2.5, "t": 3.0, "p": "a/b"}


def test_unknown_objects_go_through_default_or_fail():
    assert strict_loads(json_text({"d": torch.device("cpu")}, default=str)) == {"d": "cpu"}
    try:
        json_text({"d": object()})
    except TypeError as error:
        assert "not JSON serialisable" in str(error)
    else:
        raise AssertionError("an unknown object must not pass silently")


def test_files_are_strict_json(tmp_path):
    write_jsonl([{"loss": math.nan}], tmp_path / "m.jsonl")
    append_jsonl({"loss": 1.0}, tmp_path / "m.jsonl")
    assert [strict_loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        {"loss": None}, {"loss": 1.0}]
    write_json({"test": {"loss": math.inf}}, tmp_path / "r.json")
    assert strict_loads((tmp_path / "r.json").read_text()) == {"test": {"loss": None}}
