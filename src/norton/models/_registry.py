"""The model registry: names -> keyword-only builders plus what each expects as input.

A family module decorates its builders with ``@register_model(...)``; importing
:mod:`norton.models` imports every family, so every name is registered before
``create_model`` or ``list_models`` is called.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: the registry name (the builder's function name), e.g. ``"resnet_56"``.
        builder: keyword-only function ``(*, compress_rate, rank, num_classes, in_channels) -> nn.Module``.
        input_size: side of the square input images it is built for (32 or 224).
        dataset: ``"cifar10"`` or ``"imagenet"``: the data its default ``num_classes`` fits.
        num_classes: default number of classes.
        compress_rate_slots: what each ``compress_rate`` entry truncates, in order (one line each).
    """

    name: str
    builder: Builder
    input_size: int
    dataset: str
    num_classes: int
    compress_rate_slots: tuple[str, ...]

    @property
    def compress_rate_length(self) -> int:
        """How many ``compress_rate`` entries the architecture reads."""
        return len(self.compress_rate_slots)


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    *, input_size: int, dataset: str, num_classes: int, compress_rate_slots: tuple[str, ...]
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under its function name; a duplicate name is an error."""

    def decorator(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, builder, input_size, dataset, num_classes, tuple(compress_rate_slots))
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of the registered architectures, sorted (``torchvision.<name>`` is accepted too)."""
    return sorted(_MODELS)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ``UserError`` listing the known names if there is none."""
    from norton.errors import UserError

    try:
        return _MODELS[name]
    except KeyError:
        raise UserError(
            f"unknown model {name!r}; available: {', '.join(list_models())} (or torchvision.<name>)"
        ) from None
