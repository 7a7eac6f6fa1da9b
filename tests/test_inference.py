"""Inference and training forms of CPDBlocks: equivalence, BN folding, record/replay, timing utilities."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.inference import (
    INFERENCE_FORMS,
    TRAINING_FORMS,
    GroupedCPDConv,
    MergedCPDConv,
    TrainingFormCPDBlock,
    build_form,
    find_batchnorm_pairs,
    fold_batchnorm,
    form_of,
    optimize_for_inference,
    optimize_for_training,
    replay_optimize,
    set_training_form,
)
from norton.deploy.timing import LatencyStats, compare_callables, peak_memory_bytes
from norton.errors import UserError

# (in, out, rank, kernel, stride, padding, dilation, bias, padding_mode)
BLOCK_CONFIGS = [
    (6, 5, 3, 3, 1, 1, 1, True, "zeros"),
    (4, 7, 2, (3, 5), (2, 1), (1, 2), (1, 2), False, "zeros"),
    (5, 4, 1, (1, 3), 2, (0, 1), 1, True, "zeros"),
    (3, 6, 4, 3, 1, 2, 2, False, "reflect"),
    (8, 8, 2, (5, 3), (1, 2), 0, 1, True, "circular"),
]


def _random_block(config, seed: int = 0) -> CPDBlock:
    c_in, n, r, k, s, p, d, bias, mode = config
    torch.manual_seed(seed)
    block = CPDBlock(c_in, n, r, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_()
    return block


def _random_bn(channels: int, seed: int = 1) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _input(block: CPDBlock, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(batch, block.in_channels, 11, 9)


# ------------------------------------------------------------------ forms
@pytest.mark.parametrize("config", BLOCK_CONFIGS)
@pytest.mark.parametrize("form", INFERENCE_FORMS)
def test_inference_form_equals_block(config, form):
    block = _random_block(config).eval()
    x = _input(block)
    module = build_form(block, form)
    assert form_of(module) == form
    with torch.no_grad():
        assert _relative(module(x), block(x)) < 1e-4


@pytest.mark.parametrize("config", BLOCK_CONFIGS)
@pytest.mark.parametrize("form", INFERENCE_FORMS)
def test_inference_form_after_batchnorm_folding_equals_block_then_bn(config, form):
    block = _random_block(config).eval()
    bn = _random_bn(block.out_channels)
    x = _input(block)
    with torch.no_grad():
        expected = bn(block(x))
        folded = copy.deepcopy(block)
        fold_batchnorm(folded, bn)
        assert folded.bias is not None
        assert _relative(build_form(folded, form)(x), expected) < 1e-4


def test_forms_are_built_from_plain_convolutions():
    block = _random_block(BLOCK_CONFIGS[0])
    for form in ("merged", "grouped", "dense"):
        leaves = [m for m in build_form(block, form).modules() if not list(m.children())]
        assert leaves and all(type(m) is nn.Conv2d for m in leaves), form
    grouped = build_form(block, "grouped")
    assert isinstance(grouped, GroupedCPDConv) and grouped.grouped.groups == block.out_channels


def test_batchnorm_fold_into_merged_form_and_conv():
    block = _random_block(BLOCK_CONFIGS[1]).eval()
    bn = _random_bn(block.out_channels)
    x = _input(block)
    merged = MergedCPDConv(block)
    conv = build_form(block, "dense")
    with torch.no_grad():
        expected = bn(block(x))
        fold_batchnorm(merged, bn)
        fold_batchnorm(conv, bn)
        assert _relative(merged(x), expected) < 1e-4
        assert _relative(conv(x), expected) < 1e-4


# ------------------------------------------------------------------ training forms
@pytest.mark.parametrize("config", BLOCK_CONFIGS[:4])
def test_training_forms_give_same_outputs_and_factor_gradients(config):
    reference = _random_block(config).train()
    x = _input(reference).requires_grad_(True)
    out = reference(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}
    expected_x = x.grad.clone()
    for form in TRAINING_FORMS:
        block = copy.deepcopy(reference)
        block.zero_grad(set_to_none=True)
        x.grad = None
        set_training_form(block, form)
        y = block(x)
        assert _relative(y, out) < 1e-4, form
        y.backward(grad_out)
        for name, p in block.named_parameters():
            assert _relative(p.grad, expected[name]) < 1e-4, (form, name)
        assert _relative(x.grad, expected_x) < 1e-4, form


def test_training_form_keeps_parameters_and_state_dict_keys():
    block = _random_block(BLOCK_CONFIGS[0])
    params = {name: p for name, p in block.named_parameters()}
    keys = list(block.state_dict())
    set_training_form(block, "dense")
    assert type(block) is TrainingFormCPDBlock and isinstance(block, CPDBlock)
    assert list(block.state_dict()) == keys
    assert all(p is params[name] for name, p in block.named_parameters())
    set_training_form(block, "cpd")
    assert type(block) is CPDBlock
    with pytest.raises(UserError):
        set_training_form(block, "fast")


def _small_model(rank: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        CPDBlock(8, 12, rank, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        CPDBlock(12, 12, rank, (3, 1), padding=(1, 0)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model.eval()


def test_optimize_for_training_switches_forms_in_place_without_changing_results():
    model = _small_model()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    params = list(model.parameters())
    keys = list(model.state_dict())
    chosen = optimize_for_training(model, x, repeats=2, warmup=1)
    assert set(chosen) == {"3", "6"} and set(chosen.values()) <= set(TRAINING_FORMS)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert _relative(model(x), expected) < 1e-4
    forced = optimize_for_training(model, x, forms=("grouped",))
    assert set(forced.values()) == {"grouped"} and model[3].training_form == "grouped"


# ------------------------------------------------------------------ BN pairing
class _TapModel(nn.Module):
    """conv_a feeds its BN and a residual tap (not foldable); conv_b feeds only its BN (foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv_a(x)
        return self.bn_b(self.conv_b(self.bn_a(a))) + a


def test_batchnorm_pairs_skip_outputs_used_elsewhere():
    model = _TapModel().eval()
    assert find_batchnorm_pairs(model, torch.randn(2, 3, 8, 8)) == [("conv_b", "bn_b")]


def test_batchnorm_pairs_need_eval_mode():
    model = _TapModel().train()
    assert find_batchnorm_pairs(model, torch.randn(2, 3, 8, 8)) == []


# ------------------------------------------------------------------ optimize_for_inference
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last", "auto"])
def test_optimize_for_inference_equals_original(memory_format):
    model = _small_model()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    optimized = optimize_for_inference(model, x, memory_format=memory_format, repeats=2)
    with torch.no_grad():
        assert _relative(optimized(x), expected) < 1e-4
        assert _relative(optimized(x[:1]), expected[:1]) < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    record = optimized.norton_plan[-1]
    assert record["op"] == "optimize" and set(record["forms"]) == {"3", "6"}
    assert sorted(map(tuple, record["fold_bn"])) == [("0", "1"), ("3", "4")]
    assert memory_format == "auto" or record["memory_format"] == memory_format
    # the caller's model is untouched
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], CPDBlock)
    assert not hasattr(model, "norton_plan")


@pytest.mark.parametrize("form", INFERENCE_FORMS)
def test_optimize_with_one_form_uses_it_everywhere(form):
    model = _small_model()
    x = torch.randn(2, 3, 16, 16)
    optimized = optimize_for_inference(model, x, forms=(form,), memory_format="contiguous")
    assert set(optimized.norton_plan[-1]["forms"].values()) == {form}
    assert form_of(optimized[3]) == form and form_of(optimized[6]) == form


def test_optimize_without_measuring_follows_the_mac_rule():
    # rank 8 of a 3x3 layer costs nearly the dense MACs: the rule picks the dense conv
    model = _small_model(rank=8)
    x = torch.randn(2, 3, 16, 16)
    optimized = optimize_for_inference(model, x, measure=False, memory_format="contiguous")
    assert set(optimized.norton_plan[-1]["forms"].values()) == {"dense"}
    assert optimized.norton_plan[-1]["measured_on"]["measure"] is False


def test_optimize_without_batchnorm_folding_keeps_batchnorms():
    model = _small_model()
    x = torch.randn(2, 3, 16, 16)
    optimized = optimize_for_inference(model, x, fold_bn=False, forms=("grouped",), memory_format="contiguous")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in optimized.modules()) == 2
    assert optimized.norton_plan[-1]["fold_bn"] == []


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_record_and_replay_rebuild_structure_and_outputs(memory_format):
    model = _small_model()
    x = torch.randn(2, 3, 16, 16)
    optimized = optimize_for_inference(model, x, memory_format=memory_format, repeats=2)
    record = optimized.norton_plan[-1]
    torch.manual_seed(123)
    fresh = _small_model()  # same architecture; its weights are about to be replaced
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    replay_optimize(fresh, record)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in optimized.modules()]
    fresh.load_state_dict(optimized.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), optimized(x))
    assert fresh.norton_plan[-1] == record
    assert fresh[0].weight.is_contiguous(memory_format=torch.channels_last) == (memory_format == "channels_last")


def test_replay_rejects_bad_records():
    model = _small_model()
    with pytest.raises(UserError):
        replay_optimize(model, {"op": "prune"})
    with pytest.raises(UserError, match="does not have"):
        replay_optimize(_small_model(), {"op": "optimize", "forms": {}, "fold_bn": [["0", "nope"]]})
    with pytest.raises(UserError, match="unknown form"):
        replay_optimize(_small_model(), {"op": "optimize", "forms": {"3": "fast"}, "fold_bn": []})
    with pytest.raises(UserError, match="CPDBlock"):
        replay_optimize(_small_model(), {"op": "optimize", "forms": {"0": "dense"}, "fold_bn": []})


def test_optimize_rejects_bad_arguments():
    model = _small_model()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(UserError, match="unknown inference form"):
        optimize_for_inference(model, x, forms=("fast",))
    with pytest.raises(UserError, match="memory_format"):
        optimize_for_inference(model, x, memory_format="nhwc")
    with pytest.raises(UserError, match="example_inputs"):
        optimize_for_inference(model, [1, 2, 3])


def test_optimize_zoo_model_after_pruning_and_decomposition():
    from norton.models import create_model

    model = create_model("resnet_56", compress_rate="[0.]+[0.12]*2+[0.4]*27", rank=2).eval()
    x = torch.randn(1, 3, 8, 8)  # small images keep the test fast; the structure is the same
    with torch.no_grad():
        expected = model(x)
    optimized = optimize_for_inference(model, x, measure=False, memory_format="contiguous")
    with torch.no_grad():
        assert _relative(optimized(x), expected) < 1e-4
    record = optimized.norton_plan[-1]
    assert len(record["forms"]) == sum(isinstance(m, CPDBlock) for m in model.modules())
    assert len(record["fold_bn"]) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # what norton.load does: rebuild the architecture, replay the record, load the weights strictly
    fresh = create_model("resnet_56", compress_rate="[0.]+[0.12]*2+[0.4]*27", rank=2)
    replay_optimize(fresh, record)
    fresh.load_state_dict(optimized.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), optimized(x))


def test_optimize_torchvision_model_with_decomposed_layers():
    from norton.decomposition.decompose import replay_decompose
    from norton.models import create_model

    model = create_model("torchvision.resnet18", num_classes=10)
    replay_decompose(model, {"op": "decompose", "ranks": {"layer1.0.conv1": 2, "layer2.0.conv1": 3}})
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    optimized = optimize_for_inference(model, x, measure=False, memory_format="contiguous")
    with torch.no_grad():
        assert _relative(optimized(x), expected) < 1e-4
    assert set(optimized.norton_plan[-1]["forms"]) == {"layer1.0.conv1", "layer2.0.conv1"}
    assert ["layer1.0.conv1", "layer1.0.bn1"] in optimized.norton_plan[-1]["fold_bn"]
    # downsample convs feed their BN only: folded too
    assert ["layer2.0.downsample.0", "layer2.0.downsample.1"] in optimized.norton_plan[-1]["fold_bn"]


# ------------------------------------------------------------------ latency utilities
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
