"""The pieces of ``benchmarks/bench_latency.py`` that need no timing: the model table and the summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_latency as bench  # noqa: E402


def _row(model: str, batch: int, speedup: float, macs_ratio: float = 2.0) -> dict:
    return {"model": model, "batch": batch, "macs_ratio": macs_ratio,
            "optimized": {"speedup": speedup, "speedup_over_macs_ratio": speedup / macs_ratio}}


def test_summary_reports_the_slowest_batch_and_the_batch_32_fraction_of_the_macs_ratio():
    rows = [_row("a", 1, 1.5), _row("a", 32, 1.8), _row("a", 64, 0.9), _row("b", 1, 1.2)]
    lines = bench.summarize(rows)
    assert len(lines) == 2
    assert lines[0].startswith("a: optimized speedup >= 0.90x over batches 1, 32, 64 (smallest at batch 64")
    assert "SLOWER" in lines[0] and "batch 32: 0.90 of the MACs ratio" in lines[0]
    assert "SLOWER" not in lines[1] and "batch 32" not in lines[1]  # b never ran at batch 32


def test_summary_skips_models_without_that_runtime():
    assert bench.summarize([_row("a", 1, 1.5)], runtime="onnxruntime") == []


def test_resnet50_models_take_the_resnet50_batch_sizes_and_repeats():
    large = {name for name, config in bench.CONFIGS.items() if config.get("large")}
    assert large == {"resnet_50", "torchvision.resnet50", "torchvision.resnet50/round16"}
    # the two ResNet-50s at 50% MACs differ only in round_to, like resnet_56 and resnet_56/round16
    plain, rounded = bench.CONFIGS["torchvision.resnet50"], bench.CONFIGS["torchvision.resnet50/round16"]
    assert {k: v for k, v in rounded.items() if k != "round_to"} == plain and rounded["round_to"] == 16


def test_decomposed_rows_keep_the_target_fraction_of_the_dense_models_macs(monkeypatch):
    # prune's target_macs is a fraction of the model before decompose: the row must not rescale it
    monkeypatch.setitem(bench.CONFIGS, "resnet_20/half", {"side": 32, "rank": 4, "target_fraction": 0.5})
    baseline, compressed, how = bench.build("resnet_20/half", argparse.Namespace(als_iterations=1))
    dense = bench.count_complexity(baseline, (3, 32, 32)).macs
    kept = bench.count_complexity(compressed, (3, 32, 32)).macs / dense
    assert abs(kept / 0.5 - 1) <= 0.02 and "target_macs=0.500" in how
