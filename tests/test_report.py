import json
import math

import pytest
import torch

from norton.report import format_table, write_report

STAGES = [
    {"name": "baseline", "top1": 91.5, "top5": 99.8, "macs": 41_000_000, "params": 270_000, "latency_ms": 2.0},
    {"name": "decomposed", "top1": 90.9, "top5": 99.7, "macs": 20_500_000, "params": 150_000, "latency_ms": 1.8},
    {"name": "pruned", "top1": 90.1, "top5": 99.6, "macs": 13_600_000, "params": 90_000, "latency_ms": 1.2},
]


def test_table_reports_reductions_against_the_first_stage():
    table = format_table(STAGES)
    lines = table.splitlines()
    assert lines[0].startswith("model")
    assert "41.00M" in lines[2] and "50.0" in lines[3] and "66.8" in lines[4]


def test_write_report_creates_json_text_and_png(tmp_path):
    channels = {"baseline": {"conv1": 16, "conv2": 32}, "pruned": {"conv1": 10, "conv2": 20}}
    paths = write_report(tmp_path, STAGES, channels=channels, extra={"command": "norton demo"})
    summary = json.loads(paths["json"].read_text())
    assert [s["name"] for s in summary["stages"]] == ["baseline", "decomposed", "pruned"]
    assert summary["channels"]["pruned"]["conv2"] == 20 and summary["command"] == "norton demo"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pruned" in paths["table"].read_text()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_summary_json_is_strict_json_with_null_for_nan(tmp_path):
    stages = [{"name": "baseline", "top1": 10.0, "macs": 100, "params": 10, "test_loss": math.nan},
              {"name": "pruned", "top1": math.nan, "macs": 50, "params": 5, "test_loss": torch.tensor(math.inf)}]
    paths = write_report(tmp_path, stages)
    text = paths["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert summary["stages"][0]["test_loss"] is None and summary["stages"][1]["top1"] is None
    assert summary["stages"][1]["test_loss"] is None and summary["stages"][1]["macs"] == 50
