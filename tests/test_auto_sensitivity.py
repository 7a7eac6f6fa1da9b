"""The Fisher prediction of the output change matches the change measured by running the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norton.auto.sensitivity import capture, decompose_unit, predicted_change, prune_unit, sensitivity_curves


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        net[-1].weight.mul_(8)  # confident predictions, so the KL is not vanishingly small
    return net.eval()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    log_p, log_q = F.log_softmax(p_logits.double(), 1), F.log_softmax(q_logits.double(), 1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def test_small_kernel_change_predicted_to_second_order():
    net = _net()
    x = torch.randn(64, 3, 8, 8)
    conv = net[3]
    kernel = conv.weight.detach() + 0.02 * torch.randn_like(conv.weight)
    batch = capture(net, x, [conv], samples=256, generator=torch.Generator().manual_seed(0))
    delta = {conv: conv._conv_forward(batch.x[conv], kernel, conv.bias) - batch.y[conv]}
    predicted = predicted_change(delta, batch) / 64
    with torch.no_grad():
        reference = net(x)
        original = conv.weight.data.clone()
        conv.weight.data.copy_(kernel)
        changed = net(x)
        conv.weight.data.copy_(original)
    measured = _kl(reference, changed)
    assert measured > 0
    assert predicted == pytest.approx(measured, rel=0.25)


def test_zeroing_consumer_inputs_equals_removing_the_channel():
    net = _net()
    x = torch.randn(16, 3, 8, 8)
    consumer = net[3]
    batch = capture(net, x, [consumer], samples=1, generator=torch.Generator().manual_seed(0))
    unit = prune_unit("0", torch.arange(8), [(consumer, torch.arange(8), torch.arange(8))], [0.5])
    delta = unit.delta(batch, 1)[consumer]  # the first 4 channels go
    with torch.no_grad():
        kept = nn.functional.conv2d(batch.x[consumer][:, 4:], consumer.weight[:, 4:], consumer.bias, padding=1)
    assert torch.allclose(batch.y[consumer] + delta, kept, atol=1e-5)


def test_curves_start_at_zero_rise_and_need_no_labels():
    net = _net()
    inputs = [torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)]  # no targets anywhere
    conv = net[3]
    low_rank = [None] + [
        torch.linalg.svd(conv.weight.detach().flatten(1), full_matrices=False)[0][:, :r]
        @ torch.linalg.svd(conv.weight.detach().flatten(1), full_matrices=False)[0][:, :r].T
        @ conv.weight.detach().flatten(1)
        for r in (6, 3, 1)
    ]
    kernels = [None] + [k.view_as(conv.weight) for k in low_rank[1:]]
    units = [
        prune_unit("0", torch.randperm(8), [(net[3], torch.arange(8), torch.arange(8))], [0.75, 0.5, 0.25]),
        decompose_unit("3", conv, kernels),
    ]
    prune_curve, decompose_curve = sensitivity_curves(net, inputs, units, samples=8)
    for curve in (prune_curve, decompose_curve):
        assert curve.costs[0] == 0
        assert all(b >= a for a, b in zip(curve.costs, curve.costs[1:], strict=False))
        assert curve.costs[-1] > 0
    assert prune_curve.levels == [8, 6, 4, 2]
