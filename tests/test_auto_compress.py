"""auto_compress: budgets met on any classifier, the input left alone, bad input refused, plans replayed."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import norton
from norton.complexity import count_complexity
from norton.errors import UserError


def _calibration(shape, batches=2, batch=16):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *shape, generator=generator) for _ in range(batches)]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("name", "side", "target"),
    [
        ("resnet_20", 16, 0.5),
        ("resnet_20", 16, 0.2),
        pytest.param("vgg_16_bn", 32, 0.3, marks=pytest.mark.slow),
        pytest.param("resnet_56", 16, 0.1, marks=pytest.mark.slow),
    ],
)
def test_zoo_budgets_met_within_two_percent(name, side, target):
    torch.manual_seed(0)
    model = norton.create_model(name, num_classes=10).eval()
    before = copy.deepcopy(model)
    x = torch.randn(1, 3, side, side)
    compressed = auto_compress_quiet(model, x, target, _calibration((3, side, side)))
    original = count_complexity(model, example_inputs=x).macs
    assert count_complexity(compressed, example_inputs=x).macs == pytest.approx(target * original, rel=0.02)
    report = compressed.norton_auto_report
    assert report.macs_before == original  # predicted by the MAC model, not recounted
    assert report.macs_after == count_complexity(compressed, example_inputs=x).macs
    assert _same(model, before)  # the input model is left as it was
    assert compressed(torch.randn(2, 3, side, side)).shape == (2, 10)


@pytest.mark.slow
def test_densenet_and_torchvision_budgets():
    torch.manual_seed(0)
    for model, x in (
        (norton.create_model("densenet_40", num_classes=10).eval(), torch.randn(1, 3, 32, 32)),
        (torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)),
    ):
        compressed = auto_compress_quiet(model, x, 0.4, _calibration(tuple(x.shape[1:]), batches=1))
        original = count_complexity(model, example_inputs=x).macs
        assert count_complexity(compressed, example_inputs=x).macs == pytest.approx(0.4 * original, rel=0.02)


def _refused_in_one_line(message, **kwargs):
    """auto_compress of a ResNet-20 with ``kwargs`` raises a one-line UserError matching ``message``
    and leaves the model as it was."""
    model = norton.create_model("resnet_20", num_classes=10).eval()
    before = copy.deepcopy(model)
    with pytest.raises(UserError, match=message) as error:
        norton.auto_compress(model, torch.randn(1, 3, 16, 16), progress=False, **kwargs)
    assert "\n" not in str(error.value)
    assert _same(model, before) and not hasattr(model, "norton_plan")


def auto_compress_quiet(model, x, target, calibration, **kwargs):
    return norton.auto_compress(model, x, target_macs=target, calibration=calibration, progress=False, **kwargs)


def test_the_result_does_not_depend_on_the_global_random_state():
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x, images = torch.randn(1, 3, 16, 16), _calibration((3, 16, 16))
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        results.append(auto_compress_quiet(model, x, 0.4, images))
    assert results[0].norton_plan == results[1].norton_plan and _same(*results)


def test_labels_are_optional_and_ignored():
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    images = _calibration((3, 16, 16))
    with_labels = [(batch, torch.randint(0, 10, (batch.shape[0],))) for batch in images]
    a = auto_compress_quiet(model, x, 0.4, images)
    b = auto_compress_quiet(model, x, 0.4, with_labels)
    probe = torch.randn(3, 3, 16, 16)
    assert torch.allclose(a(probe), b(probe), atol=1e-5)


@pytest.mark.parametrize(
    ("calibration", "target", "message"),
    [
        ([], 0.5, "no batches"),
        ([torch.randn(4, 3, 8, 8)], 0.5, "shape"),
        (None, 0.0, "target_macs"),
        (None, 1.0, "target_macs"),
        (None, 1.5, "target_macs"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_model(calibration, target, message):
    calibration = _calibration((3, 16, 16)) if calibration is None else calibration
    _refused_in_one_line(message, target_macs=target, calibration=calibration)


def test_the_plan_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    compressed = auto_compress_quiet(model, x, 0.3, _calibration((3, 16, 16))).eval()
    operations = [record["op"] for record in compressed.norton_plan]
    assert "prune" in operations
    norton.save(compressed, tmp_path / "auto.pt")
    loaded = norton.load(tmp_path / "auto.pt").eval()
    probe = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(probe), compressed(probe))


@pytest.mark.parametrize(("channels", "round_to", "expected"), [
    (64, 8, [48 / 64, 32 / 64, 16 / 64, 8 / 64]),
    (100, 8, [72 / 100, 48 / 100, 24 / 100, 16 / 100]),
    (16, 8, [8 / 16]),
    (8, 8, [0.75, 0.5, 0.25, 0.125]),  # no narrower multiple: the plain fractions
    (64, None, [0.75, 0.5, 0.25, 0.125]),
])
def test_group_fractions_keep_multiples_of_round_to(channels, round_to, expected):
    from norton.auto.compress import FRACTIONS, _group_fractions
    from norton.auto.sensitivity import prune_unit

    fractions = _group_fractions(channels, FRACTIONS, round_to)
    assert fractions == pytest.approx(expected)
    levels = prune_unit("x", torch.arange(channels), [], fractions).levels  # the widths the curves measure
    assert levels[0] == channels and (round_to is None or channels <= round_to
                                      or all(w % round_to == 0 for w in levels[1:]))


ALL_METHODS = ("cp-filter", "tucker2", "cp-layer", "svd")


def test_the_only_method_offered_is_chosen_per_layer():
    from norton.decomposition.tucker2_conv import Tucker2Conv

    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    compressed = auto_compress_quiet(model, x, 0.3, _calibration((3, 16, 16)), methods=("tucker2",))
    report = compressed.norton_auto_report
    assert report.methods and set(report.methods.values()) == {"tucker2"}
    assert report.methods.keys() == report.ranks.keys()
    blocks = {name for name, m in compressed.named_modules() if isinstance(m, Tucker2Conv)}
    assert blocks == set(report.methods)
    records = [r for r in compressed.norton_plan if r["op"] == "decompose"]
    assert [r["method"] for r in records] == ["tucker2"]
    assert records[0]["ranks"] == {name: list(rank) for name, rank in report.ranks.items()}


def test_default_offers_every_method_but_layer_cp():
    from norton.auto.compress import METHODS
    from norton.decomposition.layer_cp_conv import LayerCPConv

    assert set(METHODS) == set(ALL_METHODS) - {"cp-layer"}  # layer CP loses its fit in fine-tuning (pareto.md)
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    compressed = auto_compress_quiet(model, x, 0.3, _calibration((3, 16, 16)))
    chosen = set(compressed.norton_auto_report.methods.values())
    assert chosen and chosen <= set(METHODS)
    assert not any(isinstance(m, LayerCPConv) for m in compressed.modules())


@pytest.mark.parametrize(("name", "side", "target"), [("resnet_20", 16, 0.5), ("resnet_20", 16, 0.2)])
def test_budgets_met_with_mixed_methods(name, side, target):
    torch.manual_seed(0)
    model = norton.create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, side, side)
    compressed = auto_compress_quiet(model, x, target, _calibration((3, side, side)), methods=ALL_METHODS)
    original = count_complexity(model, example_inputs=x).macs
    assert count_complexity(compressed, example_inputs=x).macs == pytest.approx(target * original, rel=0.02)
    assert len(set(compressed.norton_auto_report.methods.values())) >= 2  # random weights still mix them


@pytest.mark.slow
def test_torchvision_budget_with_mixed_methods():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    compressed = auto_compress_quiet(model, x, 0.4, _calibration((3, 32, 32), batches=1), methods=ALL_METHODS)
    original = count_complexity(model, example_inputs=x).macs
    assert count_complexity(compressed, example_inputs=x).macs == pytest.approx(0.4 * original, rel=0.02)
    assert compressed.norton_auto_report.methods


@pytest.mark.parametrize(("methods", "budget", "message"), [
    (("cp-filter", "tuker2"), {"target_macs": 0.5}, "unknown decomposition method 'tuker2'.*tucker2"),
    ("tucker2", {"target_macs": 0.5}, "sequence of names"),
    (("tucker2",), {"target_latency": 0.5}, "cp-filter blocks only"),
])
def test_bad_methods_are_one_line_and_leave_the_model(methods, budget, message):
    _refused_in_one_line(message, calibration=_calibration((3, 16, 16)), methods=methods, **budget)


def test_a_mixed_plan_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    compressed = auto_compress_quiet(model, x, 0.3, _calibration((3, 16, 16)), methods=ALL_METHODS).eval()
    methods = {r.get("method", "cp-filter") for r in compressed.norton_plan if r["op"] == "decompose"}
    assert len(methods) >= 2 and methods == set(compressed.norton_auto_report.methods.values())
    norton.save(compressed, tmp_path / "mixed.pt")
    loaded = norton.load(tmp_path / "mixed.pt").eval()
    probe = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(probe), compressed(probe))
    from norton.layers import layer_summaries

    shown = {row.name: row.method for row in layer_summaries(loaded) if row.method != "dense"}
    assert shown == compressed.norton_auto_report.methods  # what `norton info --layers` prints
