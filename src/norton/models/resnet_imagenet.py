"""ResNet-50 for 224x224 inputs (ImageNet), as in the NORTON reference (torchvision v1.5 layout).

Module names match the reference and torchvision: ``conv1, bn1, relu, maxpool``,
``layer{1..4}.{b}`` bottlenecks with ``conv1, bn1, relu1, conv2, bn2, relu2,
conv3, bn3, relu3`` and, in the first block of every stage, ``downsample.0``
(1x1 conv) / ``downsample.1`` (BN); then ``avgpool`` and ``fc``.

``compress_rate`` has 20 entries:

* ``[0]``: stem output width ``int(64 * (1 - c))``;
* ``[1]``, ``[2]``, ``[3]``: output width (``conv3`` and ``downsample``) of every
  block of stages 1-3 (256, 512, 1024); stage 4 (2048) is never truncated;
* ``[4 + k]``: inner width (``conv1`` and ``conv2`` outputs) of the ``k``-th of the
  16 blocks, ``int(stage_width // 4 * (1 - c))``.

With ``rank > 0`` only the 3x3 ``conv2`` of each bottleneck becomes a CPDBlock
(without bias); the 7x7 stem and the 1x1 convs stay dense.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from norton.models._layers import CompressRate, check_positive, check_rank, conv3x3, expand_compress_rate, pruned_width
from norton.models._registry import register_model

STAGE_WIDTHS = (256, 512, 1024, 2048)
BLOCKS_PER_STAGE = (3, 4, 6, 3)
STEM_WIDTH = 64


class Bottleneck(nn.Module):
    """``1x1 -> 3x3 (strided) -> 1x1`` with BN and ReLU, plus the (projected) identity."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, *, stride: int, downsample: bool, rank: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(mid_channels, mid_channels, rank=rank, stride=stride)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:  # a strided 1x1 projection of the identity (the first block of every stage)
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class ResNet50(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max pool), four bottleneck stages, global average pool, ``fc``.

    Args:
        stem_width: output width of the stem conv.
        block_widths: per stage, per block ``(mid_width, out_width)``.
    """


    # Stages are added by name in a loop; declared here for type checkers.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        stem_width: int,
        block_widths: Sequence[Sequence[tuple[int, int]]],
        *,
        rank: int = 0,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = stem_width
        for stage, blocks in enumerate(block_widths):
            layer = nn.Sequential()
            for index, (mid, out) in enumerate(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layer.append(Bottleneck(channels, mid, out, stride=stride, downsample=index == 0, rank=rank))
                channels = out
            self.add_module(f"layer{stage + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, C0, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, 7, 7)
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)


def _slots() -> tuple[str, ...]:
    slots = ["conv1 (stem) output channels"]
    slots += [f"stage-{s + 1} block outputs (layer{s + 1}.*.conv3 and downsample)" for s in range(3)]
    slots += [
        f"layer{stage + 1}.{block}.conv1/conv2 output channels"
        for stage, blocks in enumerate(BLOCKS_PER_STAGE)
        for block in range(blocks)
    ]
    return tuple(slots)


@register_model(input_size=224, dataset="imagenet", num_classes=1000, compress_rate_slots=_slots())
def resnet_50(
    *, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 1000, in_channels: int = 3
) -> ResNet50:
    """ResNet-50 for ImageNet (20 compress rates)."""
    rank = check_rank(rank)
    check_positive(num_classes, "num_classes")
    check_positive(in_channels, "in_channels")
    rates = expand_compress_rate(compress_rate, _slots(), "resnet_50")
    output_rates = (rates[1], rates[2], rates[3], 0.0)  # the last stage's outputs are never truncated
    inner_rates = iter(rates[4:])
    block_widths = [
        [
            (
                pruned_width(width // 4, next(inner_rates), f"layer{stage + 1}.{block}.conv1"),
                pruned_width(width, output_rates[stage], f"layer{stage + 1}.{block}.conv3"),
            )
            for block in range(blocks)
        ]
        for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE, strict=False))
    ]
    stem = pruned_width(STEM_WIDTH, rates[0], "conv1")
    return ResNet50(stem, block_widths, rank=rank, num_classes=num_classes, in_channels=in_channels)
