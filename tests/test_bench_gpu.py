"""``benchmarks/bench_gpu.py``: the CPU smoke test prints every row and column with positive throughput."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402

ROWS = ["dense", "paper", "auto-macs-0.5", "auto-macs-0.25", "auto-lat-0.5", "tp-0.5", "tp-0.25"]


@pytest.mark.slow
def test_quick_cpu_run_fills_the_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--device", "cpu", "--quick", "--json", str(out),
                           "--latency-cache", str(tmp_path / "latency")]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r for r in result["models"]] == ROWS
    cells = {(r["model"], r["batch"], r["dtype"], r["mode"]): r["images_per_s"] for r in result["rows"]}
    assert set(cells) == {(m, b, "fp32", "eager") for m in ROWS for b in (1, 8)}
    assert all(v > 0 for v in cells.values())
    for model in ROWS:
        assert f"| {model} |" in printed
    assert "b1 fp32 eager" in printed and "b8 fp32 eager" in printed
    kept = {m: info["macs_kept"] for m, info in result["models"].items()}
    assert kept["dense"] == 1.0 and kept["auto-macs-0.5"] == pytest.approx(0.5, rel=0.02)
    assert kept["auto-macs-0.25"] == pytest.approx(0.25, rel=0.02)
    assert kept["tp-0.5"] == pytest.approx(0.5, rel=0.03) and kept["tp-0.25"] == pytest.approx(0.25, rel=0.03)
    latency = result["models"]["auto-lat-0.5"]
    assert latency["latency_after_ms"] > 0 and latency["latency_table"]["points"] > 0


def test_defaults_follow_quick_and_cuda_is_refused_without_a_gpu(capsys):
    quick = bench_gpu.parse_args(["--device", "cpu", "--quick"])
    assert (quick.batch_sizes, quick.dtypes, quick.modes, quick.side) == ([1, 8], ["fp32"], ["eager"], 32)
    full = bench_gpu.parse_args(["--device", "cpu"])
    assert (full.batch_sizes, full.dtypes, full.modes, full.side) == ([1, 32, 256], ["fp32", "bf16"],
                                                                     ["eager", "compiled"], 224)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_gpu.parse_args([])
        assert "no CUDA device" in capsys.readouterr().err


def test_torch_pruning_lands_on_the_budget_in_multiples_of_eight():
    import norton

    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    pruned, details = bench_gpu.torch_pruning(model, x, 0.5)
    assert details["macs_kept"] == pytest.approx(0.5, rel=0.03)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
