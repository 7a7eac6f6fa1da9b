"""Example inputs: what a model is run on to trace, count or time it, in the forms torch users pass.

An example input is a tensor, a tuple (or list) of positional tensors, or a dict of
keyword tensors, as torch-pruning and ``torch.export`` accept; a torchvision detector
takes ONE positional list of images (``[image (3, H, W), ...]``). Pruning traces with it,
:func:`norton.complexity.count_complexity` counts MACs on it, and the deploy stage times
and checks models on it; the few ways of handling one live here once.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from norton.errors import UserError

ExampleInputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


def takes_image_list(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision detector (``GeneralizedRCNN``), whose one argument is a list of images."""
    # Only an imported torchvision detection module can have built one: nothing heavy is imported here.
    module = sys.modules.get("torchvision.models.detection.generalized_rcnn")
    return module is not None and isinstance(model, module.GeneralizedRCNN)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)`` as the example's form says.

    A detector's list of images is its one argument: ``model([image, ...])``.
    """
    if isinstance(example_inputs, list) and takes_image_list(model):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def tensors_in(value: Any) -> Iterable[Tensor]:
    """Every tensor in an example input or a model output (nested tuples, lists and dicts), in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def first_tensor(example_inputs: Any) -> Tensor:
    """The first tensor of an example input (its batch size is the batch), ``UserError`` if none."""
    for tensor in tensors_in(example_inputs):
        return tensor
    raise UserError("example_inputs must hold at least one tensor, e.g. torch.randn(1, 3, 32, 32)")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def on_device_of(example_inputs: Any, model: nn.Module) -> Any:
    """``example_inputs`` moved to the model's device (a meta-device model gets meta tensors)."""
    device = model_device(model)

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, Tensor) else value

    if isinstance(example_inputs, Mapping):
        return {key: move(value) for key, value in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(move(value) for value in example_inputs)
    return move(example_inputs)


def module_input_shapes(
    model: nn.Module, names: Iterable[str], example_inputs: Any, *, grad: bool = False, eval_mode: bool = False
) -> dict[str, torch.Size]:
    """The input shape each named submodule sees (its first call) on one forward of ``example_inputs``.

    ``grad`` runs the forward with autograd on (as training does); ``eval_mode`` runs it in
    eval mode (no BatchNorm statistics updated) and restores every module's mode after.
    """
    shapes: dict[str, torch.Size] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left alone
            shapes.setdefault(name, args[0].shape)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    modes = {module: module.training for module in model.modules()}
    try:
        if eval_mode:
            model.eval()
        with torch.set_grad_enabled(grad):
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return shapes
