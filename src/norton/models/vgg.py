"""VGG-16/19 with batch norm for 32x32 inputs (CIFAR), as in the NORTON reference.

Module names follow the reference so its checkpoints load: ``features.conv{i}``,
``features.norm{i}``, ``features.relu{i}``, ``features.pool{i}`` (``i`` is the
position in the config, pools included), then ``classifier.linear1``,
``classifier.norm1`` (BatchNorm1d), ``classifier.relu1``, ``classifier.linear2``.

``compress_rate[k]`` truncates the output width of the ``k``-th conv to
``int(width * (1 - compress_rate[k]))``. With ``rank > 0`` every conv is a
CPDBlock with a bias (the reference's default), so the state dict holds
``features.conv{i}.feature.{pointwise,vertical,horizontal}.weight`` and ``.bias``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from norton.compress_rate import parse_compress_rate
from norton.models._layers import CompressRate, check_positive, check_rank, conv3x3, expand_compress_rate, pruned_width
from norton.models._registry import register_model

Config = list[int | str]  # conv widths, "M" for a 2x2 max pool


class VGG(nn.Module):
    """VGG-BN body plus the reference's two-layer classifier (Linear, BN1d, ReLU, Linear)."""

    def __init__(
        self, widths: Config, *, hidden: int = 512, rank: int = 0, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        channels = in_channels
        for i, width in enumerate(widths):
            if isinstance(width, str):  # "M"
                self.features.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            # The reference's CPDBlock defaults to bias=True and VGG keeps that default.
            self.features.add_module(f"conv{i}", conv3x3(channels, width, rank=rank, bias=True))
            self.features.add_module(f"norm{i}", nn.BatchNorm2d(width))
            self.features.add_module(f"relu{i}", nn.ReLU(inplace=True))
            channels = width
        self.classifier = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(channels, hidden),
                norm1=nn.BatchNorm1d(hidden),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C, 2, 2) for 32x32 inputs
        # Functional, not a module, as in the reference: MAC counters that hook modules skip it.
        x = F.avg_pool2d(x, 2)  # (B, C, 1, 1)
        return self.classifier(x.flatten(1))  # (B, num_classes)


def _conv_names(config: Config) -> list[str]:
    return [f"features.conv{i}" for i, width in enumerate(config) if width != "M"]


def _create_vgg(
    name: str, config: Config, compress_rate: CompressRate, rank: int, num_classes: int, in_channels: int
) -> VGG:
    rank = check_rank(rank)
    check_positive(num_classes, "num_classes")
    check_positive(in_channels, "in_channels")
    names = _conv_names(config)
    if compress_rate is not None:
        rates = parse_compress_rate(compress_rate)
        # The reference appends one 0 to VGG's list, so one entry short leaves the last conv whole.
        compress_rate = rates + [0.0] if len(rates) == len(names) - 1 else rates
    per_conv = iter(expand_compress_rate(compress_rate, names, name))
    widths: Config = [
        width if isinstance(width, str) else pruned_width(width, next(per_conv), f"features.conv{i}")
        for i, width in enumerate(config)
    ]
    # The classifier's hidden layer keeps the uncompressed width of the last conv, as in the reference.
    return VGG(widths, hidden=int(config[-1]), rank=rank, num_classes=num_classes, in_channels=in_channels)


CONFIGS: dict[str, Config] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _describe(config: Config) -> tuple[str, ...]:
    return tuple(f"{conv} output channels" for conv in _conv_names(config))


@register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=_describe(CONFIGS["vgg16"]))
def vgg_16_bn(*, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16-BN for CIFAR (13 convs; 13 compress rates, or 12 leaving the last conv whole)."""
    return _create_vgg("vgg_16_bn", CONFIGS["vgg16"], compress_rate, rank, num_classes, in_channels)


@register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=_describe(CONFIGS["vgg19"]))
def vgg_19_bn(*, compress_rate: CompressRate = None, rank: int = 0, num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-19-BN for CIFAR (16 convs; 16 compress rates, or 15 leaving the last conv whole)."""
    return _create_vgg("vgg_19_bn", CONFIGS["vgg19"], compress_rate, rank, num_classes, in_channels)
