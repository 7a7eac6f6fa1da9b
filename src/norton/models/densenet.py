"""DenseNet-40 (growth rate 12, no bottleneck, no transition compression) for 32x32 inputs.

Module names follow the NORTON reference: ``conv1`` (stem, 24 channels),
``dense{1,2,3}.{i}`` layers with ``bn1, relu, conv1``, ``trans{1,2}`` with
``bn1, relu, conv1`` (1x1) and a functional 2x2 average pool, then ``bn``,
``relu``, ``avgpool`` (8x8) and ``fc``.

``compress_rate`` has 39 entries, one per conv in forward order:

* ``[0]``: the stem; the reference never truncates it, so it must be 0;
* ``[1..12]``, ``[14..25]``, ``[27..38]``: the new channels of each dense layer,
  ``int(12 * (1 - c))`` (the layer's input is everything concatenated before it);
* ``[13]``, ``[26]``: transition outputs, ``int(in_width * (1 - c))``.

With ``rank > 0`` the stem and every dense layer's 3x3 conv are CPDBlocks
without bias; the 1x1 transition convs stay dense.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norton.errors import UserError
from norton.models._layers import CompressRate, check_positive, check_rank, conv3x3, expand_compress_rate, pruned_width
from norton.models._registry import register_model

GROWTH_RATE = 12
LAYERS_PER_BLOCK = 12  # (depth 40 - 4) / 3
STEM_WIDTH = 2 * GROWTH_RATE


class DenseLayer(nn.Module):
    """``BN -> ReLU -> conv3x3`` whose output is concatenated to its input."""

    def __init__(self, in_channels: int, new_channels: int, *, rank: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, new_channels, rank=rank)

    def forward(self, x: Tensor) -> Tensor:
        # ReLU is in place, but on BN's output, so x itself is untouched for the concatenation.
        return torch.cat((x, self.conv1(self.relu(self.bn1(x)))), 1)  # (B, C_in + new, H, W)


class Transition(nn.Module):
    """``BN -> ReLU -> conv1x1 -> 2x2 average pool`` (the pool is functional, as in the reference)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)  # (B, C_out, H/2, W/2)


class DenseNet(nn.Module):
    """Three dense blocks joined by transitions.

    Args:
        new_channels: per block, the number of channels each layer adds.
        transition_widths: output width of each of the ``len(new_channels) - 1`` transitions.
    """


    # Blocks are added by name in a loop; declared here for type checkers.
    dense1: nn.Sequential
    dense2: nn.Sequential
    dense3: nn.Sequential
    trans1: nn.Module
    trans2: nn.Module

    def __init__(
        self,
        new_channels: Sequence[Sequence[int]],
        transition_widths: Sequence[int],
        *,
        rank: int = 0,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, STEM_WIDTH, rank=rank)
        channels = STEM_WIDTH
        for index, block in enumerate(new_channels):
            layers = nn.Sequential()
            for width in block:
                layers.append(DenseLayer(channels, width, rank=rank))
                channels += width
            self.add_module(f"dense{index + 1}", layers)
            if index < len(transition_widths):
                self.add_module(f"trans{index + 1}", Transition(channels, transition_widths[index]))
                channels = transition_widths[index]
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, 24, 32, 32)
        x = self.trans1(self.dense1(x))  # (B, C1, 16, 16)
        x = self.trans2(self.dense2(x))  # (B, C2, 8, 8)
        x = self.relu(self.bn(self.dense3(x)))  # (B, C3, 8, 8)
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)


def _slots() -> tuple[str, ...]:
    slots = ["conv1 (stem): not truncated by the reference, must be 0"]
    for block in range(3):
        slots += [f"dense{block + 1}.{i}.conv1 output channels (of {GROWTH_RATE})" for i in range(LAYERS_PER_BLOCK)]
        if block < 2:
            slots.append(f"trans{block + 1}.conv1 output channels")
    return tuple(slots)


@register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=_slots())
def densenet_40(
    *, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 10, in_channels: int = 3
) -> DenseNet:
    """DenseNet-40 (k=12) for CIFAR (39 compress rates, the first one 0)."""
    rank = check_rank(rank)
    check_positive(num_classes, "num_classes")
    check_positive(in_channels, "in_channels")
    rates = iter(expand_compress_rate(compress_rate, _slots(), "densenet_40"))
    if next(rates) != 0.0:
        raise UserError("densenet_40's first compress rate (the stem conv) must be 0: the architecture keeps it whole")
    channels = STEM_WIDTH
    new_channels, transition_widths = [], []
    for block in range(3):
        widths = [
            pruned_width(GROWTH_RATE, next(rates), f"dense{block + 1}.{i}.conv1") for i in range(LAYERS_PER_BLOCK)
        ]
        new_channels.append(widths)
        channels += sum(widths)
        if block < 2:
            channels = pruned_width(channels, next(rates), f"trans{block + 1}.conv1")
            transition_widths.append(channels)
    return DenseNet(new_channels, transition_widths, rank=rank, num_classes=num_classes, in_channels=in_channels)
