"""ONNX and TorchScript export: equal to eager PyTorch, dynamic batch, atomic writes, errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.export import ExportCheckError, export_onnx, export_torchscript
from norton.deploy.optimize import optimize_for_inference
from norton.errors import UserError


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        CPDBlock(8, 8, 2, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _relative(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


class _CountingModel(nn.Module):
    """Its output depends on how often it was called: a trace freezes the count, so exports disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


def test_onnx_export_matches_eager_with_dynamic_batch(tmp_path):
    model = _model()
    path = tmp_path / "model.onnx"
    result = export_onnx(model, path, torch.randn(2, 3, 16, 16))
    assert result.path == path and path.is_file()
    assert result.checked_batch_sizes == (1, 3) and result.max_relative_difference <= 1e-4
    proto = onnx.load(str(path))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)  # a batch size the export never saw
    (actual,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert _relative(actual, model(x)) <= 1e-4
    assert model.training is False


def test_onnx_export_of_optimized_model(tmp_path):
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    optimized = optimize_for_inference(model, x, forms=("grouped",), memory_format="channels_last")
    result = export_onnx(optimized, tmp_path / "opt.onnx", x)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert _relative(actual, model(x)) <= 1e-4
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_onnx_static_batch(tmp_path):
    result = export_onnx(_model(), tmp_path / "static.onnx", torch.randn(2, 3, 16, 16), dynamic_batch=False)
    proto = onnx.load(str(result.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert result.checked_batch_sizes == (2,)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_export_matches_eager(tmp_path):
    model = _model()
    result = export_torchscript(model, tmp_path / "model.pt", torch.randn(2, 3, 16, 16))
    assert result.format == "torchscript" and result.max_relative_difference <= 1e-4
    loaded = torch.jit.load(str(result.path))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _relative(loaded(x), model(x)) <= 1e-4


@pytest.mark.parametrize("exporter", ["onnx", "torchscript"])
def test_mismatch_is_an_error_and_writes_nothing(tmp_path, exporter):
    path = tmp_path / "bad.out"
    export = export_onnx if exporter == "onnx" else export_torchscript
    with pytest.raises(ExportCheckError, match="differs from eager"):
        export(_CountingModel(), path, torch.randn(1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


class _NaNOnSecondCall(nn.Module):
    """Finite in eager, except on its second call, which the exporter's trace records: the file returns NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * (float("nan") if self.calls == 2 else 1.0)


@pytest.mark.parametrize("exporter", ["onnx", "torchscript"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_model_is_refused_and_writes_nothing(tmp_path, exporter, value):
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = value
    export = export_onnx if exporter == "onnx" else export_torchscript
    with pytest.raises(UserError, match=r"not finite.*'0\.weight'.*no file was written"):
        export(model, tmp_path / "out" / "nan.bin", torch.randn(1, 3, 16, 16))
    assert list(tmp_path.iterdir()) == []  # not even the output folder


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("exporter", ["onnx", "torchscript"])
def test_nan_in_the_exported_file_only_is_a_mismatch(tmp_path, exporter):
    export = export_onnx if exporter == "onnx" else export_torchscript
    with pytest.raises(ExportCheckError, match="NaN or inf at batch 1 where eager PyTorch is finite"):
        export(_NaNOnSecondCall(), tmp_path / "nan.out", torch.randn(1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_after_a_passing_check(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportCheckError):
        export_onnx(_CountingModel(), path, torch.randn(1, 3, 4, 4))
    assert path.read_bytes() == b"old"
    export_onnx(_model(), path, torch.randn(1, 3, 16, 16))
    assert onnx.load(str(path)).graph.node


def test_bad_arguments(tmp_path):
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(UserError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", x, opset=13)
    with pytest.raises(UserError, match="exporter"):
        export_onnx(model, tmp_path / "a.onnx", x, exporter="magic")
    with pytest.raises(UserError, match="folder"):
        export_onnx(model, tmp_path, x)
    with pytest.raises(UserError, match="example_inputs"):
        export_torchscript(model, tmp_path / "a.pt", np.zeros((1, 3, 16, 16)))
    with pytest.raises(UserError, match="method"):
        export_torchscript(model, tmp_path / "a.pt", x, method="compile")


@pytest.mark.slow
def test_dynamo_exporter_writes_opset_18(tmp_path):
    result = export_onnx(_model(), tmp_path / "dynamo.onnx", torch.randn(2, 3, 16, 16), exporter="dynamo")
    assert result.opset == 18 and result.max_relative_difference <= 1e-4
    proto = onnx.load(str(result.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


# ------------------------------------------------------------------ onnxruntime sessions (issue #12)
def test_onnxruntime_session_options_and_in_memory_files():
    from norton.deploy.export import onnx_bytes, onnxruntime_runner, onnxruntime_session

    model = _model()
    x = torch.randn(2, 3, 8, 8)
    data = onnx_bytes(model, x)
    assert isinstance(data, bytes) and onnx.load_from_string(data).graph.node
    levels = {"basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with torch.no_grad():
        expected = model(x)
    for level, value in levels.items():
        session = onnxruntime_session(data, optimization_level=level)
        options = session.get_session_options()
        assert options.graph_optimization_level == value
        # idle threads do not spin: sessions timed side by side would steal each other's cores
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert _relative(onnxruntime_runner(session, x)()[0], expected) < 1e-4
    spinning = onnxruntime_session(data, spinning=True).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(UserError, match="optimization_level must be one of"):
        onnxruntime_session(data, optimization_level="max")


def test_optimize_for_onnxruntime_times_forms_in_onnxruntime(monkeypatch):
    from norton.deploy import export

    sessions = []
    real = export.onnxruntime_session

    def counting(path, **kwargs):
        sessions.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(export, "onnxruntime_session", counting)
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    fast = optimize_for_inference(model, x, runtime="onnxruntime", repeats=2)
    # one CPDBlock in four forms, then the whole model as chosen against the whole model all dense
    assert len(sessions) == 6 and all(isinstance(s, bytes) for s in sessions)
    assert len(sessions[4]) > len(sessions[0]) and len(sessions[5]) > len(sessions[0])
    record = fast.norton_plan[-1]
    assert record["measured_on"]["runtime"] == "onnxruntime" and record["memory_format"] == "contiguous"
    with torch.no_grad():
        assert _relative(fast(x), model(x)) < 1e-4
    for bad in ({"dtype": torch.bfloat16}, {"compile": True}):
        with pytest.raises(UserError, match="runtime='onnxruntime' chooses forms for onnxruntime's CPU"):
            optimize_for_inference(model, x, runtime="onnxruntime", **bad)
    with pytest.raises(UserError, match="runtime must be one of torch, onnxruntime"):
        optimize_for_inference(model, x, runtime="tensorrt")
