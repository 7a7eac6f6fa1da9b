"""JSON files a training run writes (``metrics.jsonl``, ``result.json``): always valid JSON.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no other JSON reader
accepts. Here a non-finite number becomes ``null`` and ``allow_nan=False`` guards the rest.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from norton.io import atomic_write_text


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes non-finite numbers as ``null`` and never emits ``NaN``."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(dumps(record) + "\n")


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text("".join(dumps(r) + "\n" for r in records), path)


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(dumps(value, indent=2) + "\n", path)
