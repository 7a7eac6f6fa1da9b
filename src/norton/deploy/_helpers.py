"""Small helpers the deploy modules share: tuples of example inputs, finiteness, module surgery, memory formats."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from norton.errors import UserError
from norton.example_inputs import model_device, tensors_in

Inputs = Tensor | tuple[Tensor, ...]
__all__ = ["Inputs", "all_finite", "as_tuple", "first_non_finite", "memory_format", "model_device",
           "non_finite_message", "set_submodule", "tensors_in", "to_memory_format"]


def as_tuple(inputs: Any) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple of tensors (``UserError`` for anything else)."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise UserError("example_inputs must be a tensor or a tuple of tensors, e.g. torch.randn(1, 3, 32, 32)")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    if not name:
        raise UserError("cannot replace the model itself; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the model's first parameter or buffer holding NaN or inf, else ``None``."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def non_finite_message(model: nn.Module, what: str) -> str:
    """One line for a model whose own outputs hold NaN or inf (names the first non-finite weight)."""
    culprit = first_non_finite(model)
    cause = f"its {culprit!r} holds NaN or inf" if culprit else "its weights are finite, so an activation overflows"
    return (f"{what}: the model's own outputs are not finite (NaN or inf; {cause}), so nothing can be "
            "checked against them: fix or retrain the model (a diverged training run?)")


def all_finite(value: Any) -> bool:
    """True when every floating-point tensor in ``value`` (a model output) is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors_in(value) if t.is_floating_point())


def memory_format(fmt: str) -> torch.memory_format:
    """``"channels_last"`` -> ``torch.channels_last``; anything else -> ``torch.contiguous_format``."""
    return torch.channels_last if fmt == "channels_last" else torch.contiguous_format


def to_memory_format(module: nn.Module, fmt: str) -> nn.Module:
    """Store ``module``'s 4-D weights in ``fmt`` (in place); convolutions then propagate it to activations."""
    return module.to(memory_format=memory_format(fmt))
