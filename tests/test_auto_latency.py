"""Latency budgets: the target's forms, the layer table (measured once, then reused), the interpolation, the end to end."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import norton
import norton.auto.latency as latency
from norton.auto.costs import ChoiceMacs, LayerOption
from norton.auto.latency import ChoiceLatency, LatencyTable, LayerConfig, _bilinear, cache_path, width_grid
from norton.compress_arguments import parse_target_latency
from norton.errors import UserError
from norton.pruning.budget import MacModel
from norton.pruning.groups import traced


@pytest.mark.parametrize(("value", "parsed"), [
    (0.5, ("fraction", 0.5)), ("0.25", ("fraction", 0.25)), ("12ms", ("ms", 12.0)), (" 2.5 ms", ("ms", 2.5)),
    ("1e1ms", ("ms", 10.0)),
])
def test_target_latency_forms(value, parsed):
    assert parse_target_latency(value) == parsed


@pytest.mark.parametrize("value", [0, 1, 1.5, 12, "12", "12 s", "0ms", "fast", True, None, float("nan")])
def test_bad_target_latency_is_one_line(value):
    with pytest.raises(UserError, match="target_latency") as error:
        parse_target_latency(value)
    assert "\n" not in str(error.value)


def test_width_grid_is_coarse_multiples_of_eight_and_the_full_width():
    assert width_grid(64) == [8, 16, 32, 48, 64]
    assert width_grid(100) == [16, 32, 56, 80, 100]
    assert width_grid(6) == [6]
    assert all(w % 8 == 0 for w in width_grid(2048)[:-1]) and len(width_grid(2048)) == 5


def test_bilinear_is_exact_on_a_bilinear_function():
    axis_in = torch.tensor([[8.0, 16.0, 32.0], [1.0, 2.0, 3.0]], dtype=torch.float64)  # (L=2, P=3)
    axis_out = torch.tensor([[8.0, 24.0, 64.0], [8.0, 16.0, 17.0]], dtype=torch.float64)

    def f(i, o):
        return 3 * i * o + 2 * i + o + 5

    grid = f(axis_in[:, :, None], axis_out[:, None, :])  # (L, P, P)
    x_in = torch.tensor([[8.0, 1.0], [11.0, 1.0], [32.0, 1.0], [20.0, 1.0]], dtype=torch.float64)  # (M=4, L)
    x_out = torch.tensor([[8.0, 8.0], [30.0, 12.0], [64.0, 16.0], [50.0, 9.0]], dtype=torch.float64)
    got = _bilinear(axis_in, axis_out, grid[None], x_in, x_out)
    assert torch.allclose(got, f(x_in, x_out))
    # Past the grid the value is the edge's (clamped, never extrapolated).
    edge = _bilinear(axis_in, axis_out, grid[None], torch.tensor([[99.0, 9.0]]), torch.tensor([[99.0, 99.0]]))
    assert torch.allclose(edge, torch.stack([f(axis_in[0, -1], axis_out[0, -1]), f(axis_in[1, -1], axis_out[1, -1])]))


def _fake_timer(calls):
    """Time nothing: record the call, give every candidate a made-up time."""
    def fake(candidates, device):
        calls.append(len(candidates))
        return {name: float(i + 1) for i, name in enumerate(candidates)}
    return fake


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _choice_latency(tmp_path, net, x):
    work, _, groups = traced(net, x, (), False)
    widths = MacModel(work, x, groups)
    names = widths.leaf_names
    options = {"conv2": [LayerOption("dense", None, (1.0, 0, 0, 0)), LayerOption("cp-filter", 1, (1.0, 0, 0, 0))]}
    macs = ChoiceMacs(widths, options, names)
    shapes = norton.example_inputs.module_input_shapes(work, names, x, eval_mode=True)
    table = LatencyTable(cache_path("cpu", torch.float32, tmp_path), torch.device("cpu"), torch.float32)
    return ChoiceLatency(macs, dict(work.named_modules()), shapes, table, "contiguous"), groups, table


def test_the_table_is_measured_once_then_reused(tmp_path):
    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(2, 3, 8, 8)
    first, _, table = _choice_latency(tmp_path, net, x)  # real timings, tiny layers
    assert table.timed == len(table.entries) > 0
    saved = json.loads(table.path.read_text())
    assert saved["torch"] == torch.__version__ and saved["dtype"] == "float32"
    assert set(saved["entries"]) == set(table.entries) and all(v > 0 for v in saved["entries"].values())
    calls: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latency, "_time_candidates", _fake_timer(calls))
        second, groups, again = _choice_latency(tmp_path, net, x)
    assert calls == [] and again.timed == 0  # nothing timed the second time
    full = torch.tensor([[g.channels for g in groups]], dtype=torch.float64)
    dense = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(first(full, dense), second(full, dense))


def test_predictions_follow_the_table(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        # Each point 'costs' in * out (so the conv grids are bilinear and the prediction exact).
        patch.setattr(LatencyTable, "_measure", lambda self, c, i, o: float(i * o) / (2.0 if c.kind == "cp" else 1))
        model, groups, table = _choice_latency(tmp_path, _Net().eval(), torch.randn(2, 3, 8, 8))
    full = torch.tensor([[g.channels for g in groups]], dtype=torch.float64)
    names = model.macs.widths.leaf_names
    leaves = model.layers(full, torch.zeros(1, 1, dtype=torch.long))[0]
    expected = {"conv1": 3 * 16, "conv2": 16 * 24, "fc": 24 * 5}
    assert {n: float(v) for n, v in zip(names, leaves, strict=True)} == pytest.approx(expected)
    cp = model.layers(full, torch.ones(1, 1, dtype=torch.long))[0]
    assert float(cp[names.index("conv2")]) == pytest.approx(16 * 24 / 2)  # the CP option's own grid
    model.scale = 2.0
    narrower = full.clone()
    narrower[0, 0] = 8  # conv1's 16 outputs (and conv2's inputs) -> 8
    assert float(model(narrower, torch.zeros(1, 1, dtype=torch.long))[0]) == pytest.approx(
        2.0 * (3 * 8 + 8 * 24 + 24 * 5))


def test_an_unreadable_table_is_measured_again(tmp_path):
    path = cache_path("cpu", torch.float32, tmp_path)
    path.write_text("{not json")
    table = LatencyTable(path, torch.device("cpu"), torch.float32)
    assert table.entries == {}
    config = LayerConfig("conv", (1, 8, 4, 4), (3, 3), padding=(1, 1))
    assert table.latencies([(config, 8, 8)])[0] > 0 and table.timed == 1
    assert config.key(8, 8) in json.loads(path.read_text())["entries"]


def test_cache_path_env_and_argument(tmp_path, monkeypatch):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "env"))
    assert cache_path("cpu", torch.bfloat16).parent == tmp_path / "env"
    assert cache_path("cpu", torch.bfloat16, tmp_path / "arg").parent == tmp_path / "arg"
    assert cache_path("cpu", torch.bfloat16).name.endswith(f"_{torch.__version__}_bfloat16.json")


def _calibration():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 16, 16, generator=generator)]


@pytest.mark.filterwarnings("ignore:target_latency .* not reached")  # made-up layer timings: the target may be missed
def test_auto_compress_to_a_latency_reuses_the_table(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    before = copy.deepcopy(model)
    x = torch.randn(8, 3, 16, 16)
    # The first call fills the table without timing layers (fast); the second must time none.
    monkeypatch.setattr(LatencyTable, "_measure", lambda self, c, i, o: 1e-3 * i * o * (0.5 if c.kind == "cp" else 1))
    kwargs = dict(target_latency=0.6, calibration=_calibration(), progress=False, latency_cache=tmp_path,
                  sensitivity_images=16, calibration_images=16, latency_passes=2, ranks=(), recover=False)
    small = norton.auto_compress(model, x, **kwargs)
    report = small.norton_auto_report
    assert report.target_macs is None and report.latency_table["timed"] == report.latency_table["points"] > 0
    assert 1 <= len(report.latency_passes) <= 2
    assert report.latency_after_ms > 0 and report.latency_before_ms > 0
    assert report.target_latency_ms > 0 and report.macs_after < report.macs_before
    assert all(p["predicted_ms"] == pytest.approx(p["goal_ms"], rel=0.02) or p["predicted_ms"] < p["goal_ms"]
               for p in report.latency_passes)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    calls: list[int] = []
    monkeypatch.undo()  # the real _measure again, timing through the counting timer below
    monkeypatch.setattr(latency, "_time_candidates", _fake_timer(calls))
    again = norton.auto_compress(model, x, **kwargs)
    assert calls == [] and again.norton_auto_report.latency_table["timed"] == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values(),
                                                  strict=True))


def test_passes_stop_when_a_narrower_model_is_no_faster(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    monkeypatch.setattr(LatencyTable, "_measure", lambda self, c, i, o: 1e-3 * i * o)
    timings = iter([{"reference": 10.0}, {"reference": 10.0, "result": 8.0}, {"reference": 10.0, "result": 7.95},
                    {"reference": 10.0, "result": 5.0}])  # the input model, then a floor near 8 ms: +0.6% only
    monkeypatch.setattr(latency, "measure_models", lambda models, x: next(timings))
    with pytest.warns(UserWarning, match="not reached.*stopped buying time"):
        small = norton.auto_compress(model, torch.randn(8, 3, 16, 16), target_latency=0.5, calibration=_calibration(),
                                     progress=False, latency_cache=tmp_path, sensitivity_images=16,
                                     calibration_images=16, latency_passes=3, ranks=(), recover=False)
    report = small.norton_auto_report
    # the second pass was not faster: no third pass, and the first (less pruned) model is returned
    assert [p["measured_ms"] for p in report.latency_passes] == pytest.approx([8.0, 7.95])
    assert report.latency_after_ms == 8.0 and report.latency_predicted_ms == pytest.approx(
        report.latency_passes[0]["predicted_ms"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_macs": 0.5, "target_latency": 0.5}, "exactly one budget"),
    ({}, "exactly one budget"),
    ({"target_latency": 2}, "target_latency"),
    ({"target_latency": "5 parsecs"}, "target_latency"),
    ({"target_latency": "1e9ms"}, "already runs"),
])
def test_bad_latency_budgets_are_one_line(kwargs, message, tmp_path):
    model = norton.create_model("resnet_20", num_classes=10).eval()
    with pytest.raises(UserError, match=message) as error:
        norton.auto_compress(model, torch.randn(2, 3, 16, 16), calibration=_calibration(), progress=False,
                             latency_cache=tmp_path, **kwargs)
    assert "\n" not in str(error.value) and not hasattr(model, "norton_plan")


def test_an_outlier_timing_cannot_make_narrower_layers_look_cheap(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        # conv2's (16 in, 8 out) point was hit by load: 1000 instead of 128.
        patch.setattr(LatencyTable, "_measure",
                      lambda self, c, i, o: 1000.0 if (c.kind, i, o) == ("conv", 16, 8) else float(i * o))
        model, groups, _ = _choice_latency(tmp_path, _Net().eval(), torch.randn(2, 3, 8, 8))
    names = model.macs.widths.leaf_names
    keep = torch.tensor([[g.channels for g in groups]], dtype=torch.float64)
    keep[0, 1] = 8  # conv2 keeps 8 of its 24 outputs
    conv2 = float(model.layers(keep, torch.zeros(1, 1, dtype=torch.long))[0, names.index("conv2")])
    assert conv2 <= 16 * 16  # at most the next wider point (16 in, 16 out), not the outlier
