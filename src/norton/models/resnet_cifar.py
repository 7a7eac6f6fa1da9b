"""ResNet-56/110 for 32x32 inputs (CIFAR), as in the NORTON reference (HRank-style widths).

Module names follow the reference: ``conv1``/``bn1`` (stem), ``layer{1,2,3}.{b}``
blocks with ``conv1, bn1, conv2, bn2`` and a parameter-free ``shortcut``, then
``fc`` for ResNet-56 but ``linear`` for ResNet-110 (the reference names them so).

``compress_rate`` has ``3 + 3n`` entries (``n`` blocks per stage):

* ``[0]``: stem output width ``int(16 * (1 - c))``;
* ``[1]``, ``[2]``: output width of every block of stage 1 (16) and stage 2 (32);
  stage 3's outputs (64) are never truncated;
* ``[3 + k]``: inner width (``conv1`` output) of the ``k``-th block, counted over
  all stages, ``int(stage_width * (1 - c))``.

Where a block's input and output widths differ (a stage change, or a stem
truncated differently from stage 1) the shortcut zero-pads (or crops) channels,
half before and half after, as the reference's option-A shortcut does. With
``rank > 0`` every 3x3 conv, the stem included, is a CPDBlock without bias.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norton.models._layers import CompressRate, check_positive, check_rank, conv3x3, expand_compress_rate, pruned_width
from norton.models._registry import register_model

STAGE_WIDTHS = (16, 32, 64)


def _pad_map(front: int, in_channels: int, out_channels: int) -> list[int]:
    """The channel map of ``F.pad`` by ``front`` channels (negative: crop): output j reads input j - front."""
    return [j - front if 0 <= j - front < in_channels else -1 for j in range(out_channels)]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride``, then map ``in_channels`` onto ``out_channels``.

    Output channel ``j`` carries input channel ``channel_sources[j]``, or zeros
    where that is -1. A new shortcut is the reference's centred zero-pad (or crop,
    when ``out < in``). Pruning either side edits the map (see
    :class:`norton.pruning.plan.ChannelMapPruner`), so every kept channel stays
    added to the residual-branch channel it was added to before; the map is a
    non-persistent buffer, rebuilt by replaying the prune record.
    """

    channel_sources: Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        sources = _pad_map((out_channels - in_channels) // 2, in_channels, out_channels)  # centred
        self.register_buffer("channel_sources", torch.tensor(sources, dtype=torch.long), persistent=False)
        self.set_channel_sources(sources, in_channels)

    def set_channel_sources(self, sources: Tensor | Sequence[int], in_channels: int) -> None:
        """Install a new map ``(C_out,)`` (input index or -1) from ``in_channels`` inputs."""
        listed = sources.tolist() if isinstance(sources, Tensor) else [int(source) for source in sources]
        device = self.channel_sources.device
        self.channel_sources = torch.tensor(listed, dtype=torch.long, device=device)
        self.in_channels, self.out_channels = int(in_channels), len(listed)
        # One zero-pad/crop (F.pad, exported as a Pad) when the map is one: output j
        # takes input j - front wherever that exists. Otherwise a gather.
        used = [j for j, source in enumerate(listed) if source >= 0]
        front = used[0] - listed[used[0]] if used else 0
        is_pad = bool(used) and _pad_map(front, in_channels, len(listed)) == listed
        self._pad = (front, len(listed) - in_channels - front) if is_pad else None

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        if self._pad is not None:
            return F.pad(x, (0, 0, 0, 0, *self._pad))  # (B, C_out, H/s, W/s)
        index = torch.where(self.channel_sources < 0, self.in_channels, self.channel_sources)  # -1 -> a zero channel
        return F.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, index)  # (B, C_out, H/s, W/s)

    def extra_repr(self) -> str:
        mapped = "" if self._pad is not None else ", channels re-mapped by pruning"
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}{mapped}"


class BasicBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut, then ReLU."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, *, stride: int, rank: int, first_in_stage: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, mid_channels, rank=rank, stride=stride)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(mid_channels, out_channels, rank=rank)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        # The first block of a stage always gets the (parameter-free) padding shortcut, even
        # at equal widths: it decouples the stem's width from stage 1's, which the paper's
        # compress rates truncate differently, so pruning can reach those configurations.
        if stride != 1 or in_channels != out_channels or first_in_stage:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages of BasicBlocks, global average pool, linear head.

    Args:
        stem_width: output width of the stem conv.
        block_widths: per stage, per block ``(mid_width, out_width)``.
        head_name: attribute name of the final ``nn.Linear`` (``"fc"`` or ``"linear"``).
    """


    # Stages are added by name in a loop; declared here for type checkers.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(
        self,
        stem_width: int,
        block_widths: Sequence[Sequence[tuple[int, int]]],
        *,
        rank: int = 0,
        num_classes: int = 10,
        in_channels: int = 3,
        head_name: str = "fc",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, stem_width, rank=rank)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        channels = stem_width
        for stage, blocks in enumerate(block_widths):
            layer = nn.Sequential()
            for index, (mid, out) in enumerate(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layer.append(BasicBlock(channels, mid, out, stride=stride, rank=rank, first_in_stage=index == 0))
                channels = out
            self.add_module(f"layer{stage + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.head_name = head_name
        self.add_module(head_name, nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, C0, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        x = self.avgpool(x).flatten(1)  # (B, 64)
        return getattr(self, self.head_name)(x)


def _slots(blocks_per_stage: int) -> tuple[str, ...]:
    slots = [
        "conv1 (stem) output channels",
        "stage-1 block outputs (layer1.*.conv2)",
        "stage-2 block outputs (layer2.*.conv2)",
    ]
    slots += [
        f"layer{stage + 1}.{block}.conv1 output channels"
        for stage in range(len(STAGE_WIDTHS))
        for block in range(blocks_per_stage)
    ]
    return tuple(slots)


def _create_resnet(
    name: str, depth: int, head_name: str, compress_rate: CompressRate, rank: int, num_classes: int, in_channels: int
) -> CifarResNet:
    rank = check_rank(rank)
    check_positive(num_classes, "num_classes")
    check_positive(in_channels, "in_channels")
    n = (depth - 2) // 6
    rates = expand_compress_rate(compress_rate, _slots(n), name)
    stem = pruned_width(STAGE_WIDTHS[0], rates[0], "conv1")
    output_rates = (rates[1], rates[2], 0.0)  # the last stage's outputs are never truncated
    block_widths = [
        [
            (
                pruned_width(width, rates[3 + stage * n + block], f"layer{stage + 1}.{block}.conv1"),
                pruned_width(width, output_rates[stage], f"layer{stage + 1}.{block}.conv2"),
            )
            for block in range(n)
        ]
        for stage, width in enumerate(STAGE_WIDTHS)
    ]
    return CifarResNet(
        stem, block_widths, rank=rank, num_classes=num_classes, in_channels=in_channels, head_name=head_name
    )


@register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=_slots(3))
def resnet_20(
    *, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 10, in_channels: int = 3
) -> CifarResNet:
    """ResNet-20 for CIFAR (12 compress rates): not in the paper; the small model of ``norton demo``."""
    return _create_resnet("resnet_20", 20, "fc", compress_rate, rank, num_classes, in_channels)


@register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=_slots(9))
def resnet_56(
    *, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 10, in_channels: int = 3
) -> CifarResNet:
    """ResNet-56 for CIFAR (30 compress rates)."""
    return _create_resnet("resnet_56", 56, "fc", compress_rate, rank, num_classes, in_channels)


@register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=_slots(18))
def resnet_110(
    *, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 10, in_channels: int = 3
) -> CifarResNet:
    """ResNet-110 for CIFAR (57 compress rates; the reference names its head ``linear``)."""
    return _create_resnet("resnet_110", 110, "linear", compress_rate, rank, num_classes, in_channels)
