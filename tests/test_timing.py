"""Timing utilities (norton.deploy.timing, a leaf module): interleaved medians, time budgets, peak memory."""
from __future__ import annotations

import time

import pytest
import torch

from norton.deploy.timing import LatencyStats, compare_callables, peak_memory_bytes
from norton.errors import UserError


def test_compare_callables_ranks_a_slower_function_last():
    stats = compare_callables(
        {"fast": lambda: None, "slow": lambda: time.sleep(0.004)}, warmup=1, repeats=5
    )
    assert stats["slow"].median_ms > stats["fast"].median_ms
    assert stats["slow"].min_ms >= 3.5 and stats["slow"].runs == 5
    assert stats["slow"].q1_ms <= stats["slow"].median_ms <= stats["slow"].q3_ms


def test_latency_stats_summary():
    stats = LatencyStats.from_seconds([0.004, 0.001, 0.003, 0.002, 0.005])
    assert stats.median_ms == pytest.approx(3.0) and stats.min_ms == pytest.approx(1.0)
    assert stats.max_ms == pytest.approx(5.0) and stats.iqr_ms == pytest.approx(2.0)


def test_compare_callables_respects_time_budget_and_rejects_bad_counts():
    stats = compare_callables({"slow": lambda: time.sleep(0.01)}, warmup=0, repeats=100, max_time_s=0.03)
    assert 3 <= stats["slow"].runs < 100
    with pytest.raises(UserError):
        compare_callables({"f": lambda: None}, repeats=0)


def test_peak_memory_sees_a_large_allocation():
    size = 64 * 2**20

    def allocate():
        buffer = torch.ones(size // 4)  # 64 MiB of float32, touched
        return buffer.sum()

    measured = peak_memory_bytes(allocate)
    assert measured is not None and measured >= size * 0.9


def test_timing_is_a_leaf_module():
    """timing imports nothing from norton but the error type, so every stage can use it without a cycle."""
    import ast
    import inspect

    import norton.deploy.timing as timing

    tree = ast.parse(inspect.getsource(timing))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.split(".")[0] == "norton"} == {"norton.errors"}
