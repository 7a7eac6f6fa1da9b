import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.decompose import MaxError, decompose, eligible_convs, format_report, replay_decompose
from norton.errors import UserError


def low_rank_conv(c_in: int, c_out: int, rank: int, *, kernel=(3, 3), seed=0, **kwargs) -> nn.Conv2d:
    """A conv whose every filter is an exact rank-``rank`` CP tensor."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(c_out, c_in, rank, generator=g)
    body = torch.randn(c_out, kernel[0], rank, generator=g)
    tail = torch.randn(c_out, kernel[1], rank, generator=g)
    conv = nn.Conv2d(c_in, c_out, kernel, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ncr,nhr,nwr->nchw", head, body, tail) / rank)
    return conv


def small_net() -> nn.Sequential:
    return nn.Sequential(
        low_rank_conv(3, 8, 2, padding=1, seed=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        low_rank_conv(8, 16, 2, padding=1, stride=2, bias=False, seed=2),
        nn.Conv2d(16, 16, 1),  # 1x1: never decomposed
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: never decomposed
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def test_exact_low_rank_filters_give_the_same_outputs():
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    _, report = decompose(model, 2, n_iter_max=1000, tol=1e-12, progress=False, return_report=True)
    assert isinstance(model[0], CPDBlock) and isinstance(model[3], CPDBlock)
    assert isinstance(model[4], nn.Conv2d) and isinstance(model[5], nn.Conv2d)
    assert max(row.max_error for row in report) < 1e-3
    torch.testing.assert_close(model(x), expected, rtol=1e-3, atol=1e-3)


def test_plan_record_and_replay_rebuild_the_same_model():
    model = decompose(small_net(), 2, progress=False)
    assert model.norton_plan == [{"op": "decompose", "ranks": {"0": 2, "3": 2}}]
    fresh = replay_decompose(small_net(), model.norton_plan[0])
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_replay_survives_a_fresh_process(tmp_path):
    model = decompose(small_net(), {"3": 1}, progress=False)
    torch.save({"plan": model.norton_plan, "state_dict": model.state_dict()}, tmp_path / "m.pt")
    x = torch.randn(1, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x), tmp_path / "y.pt")
    script = f"""
import torch, sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from test_decompose import small_net
from norton.decomposition.decompose import replay_decompose
saved = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=True)
model = small_net()
for record in saved['plan']:
    replay_decompose(model, record)
model.load_state_dict(saved['state_dict'], strict=True)
y = model.eval()(torch.load({str(tmp_path / 'x.pt')!r}))
assert torch.equal(y, torch.load({str(tmp_path / 'y.pt')!r})), 'outputs differ'
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def test_mapping_decomposes_only_named_layers():
    model = decompose(small_net(), {"3": 1}, progress=False)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[3], CPDBlock)
    assert model[3].rank == 1


def test_include_and_exclude_patterns():
    assert list(eligible_convs(small_net())) == ["0", "3"]
    assert list(eligible_convs(small_net(), exclude=["0"])) == ["3"]
    assert list(eligible_convs(small_net(), include=["[0-9]"])) == ["0", "3"]
    with pytest.raises(UserError, match="matches no eligible layer"):
        eligible_convs(small_net(), include=["layer9.*"])


def test_max_error_rule_picks_the_smallest_sufficient_rank():
    model = nn.Sequential(low_rank_conv(16, 6, 2, padding=1))
    _, report = decompose(model, MaxError(1e-2), n_iter_max=500, progress=False, return_report=True)
    assert isinstance(model[0], CPDBlock)
    assert model[0].rank <= 2
    assert report[0].mean_error <= 1e-2


def test_max_error_rule_leaves_layer_dense_when_unreachable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 4, 3))
    _, report = decompose(model, MaxError(1e-6, max_rank=1), progress=False, return_report=True)
    assert isinstance(model[0], nn.Conv2d) and report[0].rank is None
    assert not hasattr(model, "norton_plan")


def test_report_macs_match_a_hand_count():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2))
    _, report = decompose(model, 2, example_inputs=torch.randn(1, 4, 8, 8), progress=False, return_report=True)
    row = report[0]
    assert row.macs_before == 4 * 4 * 6 * 4 * 9
    # pointwise at 8x8, vertical to 4x8, horizontal to 4x4; 12 intermediate channels
    assert row.macs_after == 8 * 8 * 12 * 4 + 4 * 8 * 12 * 3 + 4 * 4 * 12 * 3
    assert "MACs before" in format_report(report)


@pytest.mark.parametrize("bad", [0, -3, True, "8", 2.5, {"0": 0}])
def test_bad_rank_is_a_one_line_error(bad):
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        decompose(model, bad, progress=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_mapping_name_is_an_error():
    with pytest.raises(UserError, match="layer9"):
        decompose(small_net(), {"layer9": 2}, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn", "densenet121", "mobilenet_v2"])
def test_torchvision_models(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    eligible = eligible_convs(model)
    x = torch.randn(1, 3, 64, 64)
    decompose(model, 2, n_iter_max=5, progress=False)
    blocks = [m for m in model.modules() if isinstance(m, CPDBlock)]
    assert len(blocks) == len(eligible) > 0
    if name == "mobilenet_v2":  # depthwise 3x3 convs stay as they are
        assert any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (3, 3) for m in model.modules())
    assert model(x).shape == (1, 1000)
