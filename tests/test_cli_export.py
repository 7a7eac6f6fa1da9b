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


def _saved_model(tmp_path, *, nan: bool = False):
    """A tiny zoo model (rank-1 CPDBlocks, BatchNorms with non-trivial statistics) saved as a norton file."""
    import norton
    from norton.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet_20", rank=1).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        if nan:
            next(model.parameters()).view(-1)[0] = float("nan")
    return model, norton.save(model, tmp_path / "model.pt")


# What each inference form is called inside a TorchScript file (its module's original class name).
_FORM_CLASSES = {"cpd": "CPDBlock", "merged": "MergedCPDConv", "grouped": "GroupedCPDConv", "dense": "Conv2d"}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_optimize_runs_the_real_optimizer(tmp_path, capsys):
    model, path = _saved_model(tmp_path)
    output = tmp_path / "optimized.pt"
    assert main(["export", "--ckpt", str(path), "--input-size", "8", "--optimize", "--batch-size", "2",
                 "--format", "torchscript", "--output", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    record = report["optimize"]
    assert report["optimized"] is True and record["op"] == "optimize"
    assert record["measured_on"] == {"device": "cpu", "batch_size": 2, "measure": True}
    blocks = {name for name, m in model.named_modules() if type(m).__name__ == "CPDBlock"}
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(record["forms"]) == blocks and {bn for _, bn in record["fold_bn"]} == norms
    # the file holds the optimized structure: every BatchNorm folded away, every block in its chosen form
    scripted = torch.jit.load(str(output))
    classes = {name: m.original_name for name, m in scripted.named_modules()}
    assert "BatchNorm2d" not in classes.values()
    assert all(classes[bn] == "Identity" for bn in norms)
    assert all(classes[name] == _FORM_CLASSES[form] for name, form in record["forms"].items())
    # and computes what the checkpoint's eager model computes, at a batch size it never saw
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert ((scripted(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_export_optimize_onnx_matches_eager(tmp_path, capsys):
    import onnxruntime

    model, path = _saved_model(tmp_path)
    output = tmp_path / "optimized.onnx"
    assert main(["export", "--ckpt", str(path), "--input-size", "8", "--optimize", "--output", str(output)]) == 0
    assert "matches eager PyTorch at batch 1, 3" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 8, 8)
    (actual,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert ((torch.as_tensor(actual) - expected).abs().max() / expected.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("optimize", [[], ["--optimize"]])
def test_export_nan_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys, fmt, optimize):
    _, path = _saved_model(tmp_path, nan=True)
    output = tmp_path / "out" / "model.bin"
    code = main(["export", "--ckpt", str(path), "--input-size", "8", "--format", fmt, *optimize,
                 "--output", str(output)])
    assert code != 0
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "not finite" in line and "NaN" in line and "0.00e+00" not in line
    assert not output.parent.exists()


@pytest.mark.parametrize("same", ["identical", "relative", "default"])
def test_export_refuses_to_overwrite_its_checkpoint(tmp_path, capsys, monkeypatch, same):
    _, path = _saved_model(tmp_path)
    if same == "default":  # --output left out: the default (checkpoint name + .onnx) is the checkpoint itself
        path = path.rename(path.with_suffix(".onnx"))
    before = path.read_bytes()
    monkeypatch.chdir(tmp_path)
    output = {"identical": [str(path)], "relative": ["./" + path.name], "default": []}[same]
    args = ["export", "--ckpt", str(path), "--input-size", "8", "--format", "torchscript" if output else "onnx"]
    assert main([*args, *(["--output", *output] if output else [])]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "would overwrite the input checkpoint" in line and "--output" in line
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


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


def test_benchmark_optimize_and_onnxruntime_run_for_real(capsys):
    assert main(["benchmark", *ZOO, "--batch-size", "3", "--warmup", "0", "--repeats", "1", "--optimize",
                 "--runtime", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "models optimized per batch size" in out and "runtime onnxruntime" in out
    assert "MACs ratio" in out and "speedup" in out and "input (3, 8, 8)" in out


def test_compare_models_optimizes_each_model(monkeypatch):
    import norton.deploy.optimize
    from norton.deploy.benchmark import compare_models
    from norton.models import create_model

    seen = []
    real = norton.deploy.optimize.optimize_for_inference

    def spy(model, inputs, **kwargs):
        optimized = real(model, inputs, **{**kwargs, "measure": False})
        seen.append((tuple(inputs.shape), optimized))
        return optimized

    monkeypatch.setattr(norton.deploy.optimize, "optimize_for_inference", spy)
    models = {"a": create_model("resnet_20", rank=1), "b": create_model("resnet_20")}
    results = compare_models(models, (3, 8, 8), batch_sizes=[1, 2], optimize=True, warmup=0, repeats=1, memory=False)
    assert sorted(results) == [1, 2] and all(sorted(timings) == ["a", "b"] for timings in results.values())
    assert [shape for shape, _ in seen] == [(1, 3, 8, 8)] * 2 + [(2, 3, 8, 8)] * 2
    assert all(not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) for _, model in seen)


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
