"""Pieces the benchmark scripts share: list arguments, the CPU's name, and resumable JSONL results."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from norton.deploy.timing import cpu_model
from norton.errors import UserError


def parse_list(text: str, kind: type, what: str) -> list[Any]:
    """``"0.5,0.3"`` -> ``[0.5, 0.3]`` for the option ``--what``; a bad or empty list is a one-line error."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise UserError(f"--{what} is empty: give at least one value")
    return values


def cpu_name() -> str:
    return cpu_model() or platform.processor() or platform.machine()


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` (none when it does not exist); a torn last line from a killed run is skipped,
    a broken line elsewhere is a ``UserError``."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # written while the process was killed: that run is redone
                continue
            raise UserError(f"{path}:{number} is not a JSON object: fix or delete that line") from None
    return records
