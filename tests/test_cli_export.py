"""``norton export`` and ``norton benchmark``: exit codes, outputs, one-line errors, what reaches the library."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from norton.cli.main import main

# A small zoo model: rank-1 CPDBlocks and pruned widths, on 8x8 images to keep the tests fast.
ZOO = ["--arch", "resnet_56", "-r", "1", "-cpr", "[0.]+[0.12]*2+[0.4]*27", "--input-size", "8"]


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"norton {command}: error: ")
    return lines[0]


def test_export_onnx_prints_path_and_check(tmp_path, capsys):
    output = tmp_path / "r56.onnx"
    assert main(["export", *ZOO, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert str(output) in out and "matches eager PyTorch at batch 1, 3" in out
    proto = onnx.load(str(output))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_torchscript_json(tmp_path, capsys):
    output = tmp_path / "r56.pt"
    assert main(["export", *ZOO, "--format", "torchscript", "--output", str(output), "--batch-size", "2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(output) and report["format"] == "torchscript"
    assert report["max_relative_difference"] <= 1e-4 and report["input_shape"] == [2, 3, 8, 8]
    assert torch.jit.load(str(output))(torch.randn(3, 3, 8, 8)).shape == (3, 10)


def test_export_bad_format_is_one_line(tmp_path, capsys):
    assert main(["export", *ZOO, "--format", "tflite", "--output", str(tmp_path / "x")]) == 2
    assert "tflite" in _one_error_line(capsys.readouterr().err, "export")
    assert list(tmp_path.iterdir()) == []


def test_export_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in _one_error_line(capsys.readouterr().err, "export")


def test_export_needs_a_model(capsys):
    assert main(["export"]) == 2
    assert "--ckpt" in _one_error_line(capsys.readouterr().err, "export")


def test_export_mismatch_exits_1_without_a_file(tmp_path, capsys, monkeypatch):
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.calls = nn.Conv2d(3, 2, 1), 0

        def forward(self, x):
            self.calls += 1
            return self.conv(x) * self.calls

    monkeypatch.setattr("norton.cli.export.load_model", lambda args: Counting())
    output = tmp_path / "bad.onnx"
    assert main(["export", "--arch", "resnet_56", "--input-size", "4", "--output", str(output)]) == 1
    assert "differs from eager" in _one_error_line(capsys.readouterr().err, "export")
    assert not output.exists()


def test_export_optimize_reaches_the_library(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_optimize(model, example, **kwargs):
        seen["shape"] = tuple(example.shape)
        return model

    monkeypatch.setattr("norton.deploy.inference.optimize_for_inference", fake_optimize)
    assert main(["export", *ZOO, "--optimize", "--batch-size", "4", "--output", str(tmp_path / "o.onnx")]) == 0
    assert seen["shape"] == (4, 3, 8, 8)


def test_benchmark_json_side_by_side(capsys):
    assert main(["benchmark", *ZOO, "--batch-size", "1", "2", "--warmup", "0", "--repeats", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs"]["ratio"] > 2  # rank 1 and pruning: several times fewer MACs
    assert [row["batch_size"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        for side in ("baseline", "compressed"):
            assert row[side]["latency"]["runs"] == 2
            assert row[side]["latency"]["min_ms"] <= row[side]["latency"]["median_ms"]
            assert row[side]["throughput_images_per_s"] > 0
        expected = row["baseline"]["latency"]["median_ms"] / row["compressed"]["latency"]["median_ms"]
        assert row["speedup"] == pytest.approx(expected)
    assert report["environment"]["threads"] == torch.get_num_threads()


def test_benchmark_table_and_options_reach_the_library(capsys, monkeypatch):
    import norton.deploy.timing

    seen = {}
    real = norton.deploy.timing.compare_models

    def spy(models, shape, **kwargs):
        seen.update(kwargs, names=sorted(models), shape=tuple(shape))
        return real(models, shape, **{**kwargs, "optimize": False})

    monkeypatch.setattr(norton.deploy.timing, "compare_models", spy)
    assert main(["benchmark", *ZOO, "--batch-size", "3", "--warmup", "0", "--repeats", "1", "--optimize",
                 "--runtime", "onnxruntime"]) == 0
    assert seen["optimize"] is True and seen["runtime"] == "onnxruntime" and seen["batch_sizes"] == [3]
    assert seen["names"] == ["baseline", "compressed"] and seen["shape"] == (3, 8, 8)
    out = capsys.readouterr().out
    assert "MACs ratio" in out and "speedup" in out and "runtime onnxruntime" in out


def test_benchmark_compressed_only(capsys):
    assert main(["benchmark", *ZOO, "--no-baseline", "--warmup", "0", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "baseline" not in report["results"][0] and report["macs"]["ratio"] is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--runtime", "tensorrt"], "tensorrt"),
        (["--batch-size", "0"], "batch"),
        (["--repeats", "0"], "repeats"),
        (["--baseline", "/no/such/baseline.pt"], "baseline.pt"),
    ],
)
def test_benchmark_errors_are_one_line(capsys, extra, needle):
    assert main(["benchmark", *ZOO, "--warmup", "0", "--repeats", "1", *extra]) == 2
    assert needle in _one_error_line(capsys.readouterr().err, "benchmark")


def test_benchmark_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["benchmark", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in _one_error_line(capsys.readouterr().err, "benchmark")
