"""The model zoo: the paper's architectures plus any torchvision classifier, behind one registry.

``create_model(name, *, compress_rate, rank, num_classes, in_channels)`` builds
``vgg_16_bn``, ``vgg_19_bn``, ``resnet_56``, ``resnet_110``, ``densenet_40``
(CIFAR, 32x32) or ``resnet_50`` (ImageNet, 224x224) with the reference's
per-layer widths and decomposition, so the authors' checkpoints load with
``strict=True``; ``"torchvision.<name>"`` builds ``torchvision.models.<name>``.
Every model carries ``model.norton_architecture = {"name", "kwargs"}`` (plain
JSON data) so it can be rebuilt before its weights are loaded.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from norton.compress_rate import parse_compress_rate
from norton.errors import UserError
from norton.limits import check_architecture_kwargs
from norton.models import densenet, detectors, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (registers the builders)
from norton.models._layers import CompressRate, check_positive, check_rank
from norton.models._registry import ModelEntry, get_model_entry, list_models, register_model

__all__ = ["ModelEntry", "create_model", "get_model_entry", "list_models", "register_model"]

TORCHVISION_PREFIX = "torchvision."


def create_model(
    name: str,
    *,
    compress_rate: CompressRate = None,
    rank: int = 0,
    num_classes: int | None = None,
    in_channels: int = 3,
    **options: Any,
) -> nn.Module:
    """Build the architecture ``name`` and record how it was built in ``model.norton_architecture``.

    Args:
        name: a name from :func:`list_models`, or ``"torchvision.<name>"``.
        compress_rate: per-position rates in ``[0, 1)`` (a spec string such as
            ``"[0.]+[0.1]*2"`` or a list); ``None`` keeps every width. See docs/models.md.
        rank: 0 for dense convs; ``R > 0`` makes the reference's decomposed convs rank-``R`` CPDBlocks.
        num_classes: size of the classifier; ``None`` is the model's default (10 or 1000).
        in_channels: input image channels.
        options: a detector's options (``backbone=``, ``min_size=``, ...; see
            :func:`norton.detection.models.create_detector`); other models take none.

    Raises:
        UserError: unknown name, or arguments the architecture cannot take.
    """
    if not isinstance(name, str):
        raise UserError(f"model name must be a string, got {type(name).__name__}")
    # Bounded before anything is built: a billion classes or a rank of ten million would not fit in memory.
    check_architecture_kwargs({"rank": rank, "num_classes": num_classes, "in_channels": in_channels}, name)
    if name.startswith(TORCHVISION_PREFIX):
        if options:
            raise UserError(f"{name} takes no option {next(iter(options))!r}")
        return _create_torchvision(
            name, compress_rate=compress_rate, rank=rank, num_classes=num_classes, in_channels=in_channels
        )
    entry = get_model_entry(name)
    if entry.dataset == detectors.DETECTION_DATASET:  # a detector records its own architecture
        return entry.builder(compress_rate=compress_rate, rank=rank, num_classes=num_classes,
                             in_channels=in_channels, **options)
    if options:
        raise UserError(f"{name} takes no option {next(iter(options))!r}")
    kwargs: dict[str, Any] = {
        # Recorded as the full per-position list: plain JSON, independent of spec syntax.
        "compress_rate": None if compress_rate is None else parse_compress_rate(compress_rate),
        "rank": rank,
        "num_classes": entry.num_classes if num_classes is None else num_classes,
        "in_channels": in_channels,
    }
    model = entry.builder(**kwargs)
    if kwargs["compress_rate"] is not None:
        kwargs["compress_rate"] = kwargs["compress_rate"][: entry.compress_rate_length]
    set_architecture(model, {"name": name, "kwargs": kwargs})
    return model


def set_architecture(model: nn.Module, architecture: dict[str, Any]) -> None:
    """Record how ``model`` was built (plain data; not a parameter, buffer or submodule)."""
    object.__setattr__(model, "norton_architecture", architecture)


def _create_torchvision(
    name: str, *, compress_rate: CompressRate, rank: int, num_classes: int | None, in_channels: int
) -> nn.Module:
    import torchvision.models

    short = name[len(TORCHVISION_PREFIX):]
    if compress_rate is not None and any(parse_compress_rate(compress_rate)):
        raise UserError(f"{name} takes no compress_rate: prune it with the pruning engine instead")
    if check_rank(rank) != 0:
        raise UserError(f"{name} takes no rank: decompose it with norton.decomposition.decompose instead")
    if check_positive(in_channels, "in_channels") != 3:
        raise UserError(f"{name} is built for 3 input channels, got in_channels={in_channels}")
    available = torchvision.models.list_models(module=torchvision.models)
    if short not in available:
        raise UserError(f"unknown torchvision classifier {short!r}; available: {', '.join(available)}")
    num_classes = 1000 if num_classes is None else check_positive(num_classes, "num_classes")
    model = torchvision.models.get_model(short, weights=None, num_classes=num_classes)
    set_architecture(model, {"name": name, "kwargs": {"num_classes": num_classes}})
    return model
