"""Calibration data as users hand it over: an iterable of batches, labels optional and unused.

Data-aware steps (recovery after pruning or decomposition, ``auto_compress``'s
sensitivity analysis) run the model on a few hundred unlabeled images. Users already
have those in a ``DataLoader``, so that is what they pass: any iterable whose items are
input tensors ``(B, *image)`` or ``(input, target, ...)`` pairs/lists whose first item is
the input. :func:`calibration_inputs` turns it into a list of checked input tensors on
the model's device; every mistake (no batches, a batch that is not a tensor, images of
another shape, NaNs) is a one-line ``UserError`` raised while reading, before any model
is touched. :func:`run_calibration` runs a model over those inputs in eval mode without
gradients and restores its modes afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from norton.errors import UserError
from norton.limits import check_int

__all__ = ["calibration_inputs", "count_images", "evaluating", "run_calibration"]

T = TypeVar("T")

EMPTY = (
    "calibration gave no batches: pass an iterable of input tensors or (input, target) pairs, "
    "e.g. a DataLoader over a few hundred training images"
)


def _example_tensor(example_inputs: Any) -> Tensor:
    """The single input tensor of ``example_inputs``; models with several inputs are not calibrated."""
    if isinstance(example_inputs, Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 and isinstance(example_inputs[0], Tensor):
        return example_inputs[0]
    kind = "a dict" if isinstance(example_inputs, Mapping) else type(example_inputs).__name__
    raise UserError(
        f"calibration needs a model that takes one input tensor, but example_inputs is {kind}: "
        "pass a single example tensor such as torch.randn(1, 3, 32, 32)"
    )


def _batch_input(batch: Any, index: int) -> Tensor:
    """The input tensor of one calibration batch (a tensor, or the first item of a pair/list)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    kind = f"a {type(batch).__name__}" + (
        f" whose first item is a {type(batch[0]).__name__}" if isinstance(batch, (tuple, list)) and batch else ""
    )
    raise UserError(
        f"calibration batch {index} is {kind}: each batch must be an input tensor or an (input, target) pair"
    )


def check_iterable(calibration: Any, example: str) -> None:
    """``UserError`` unless ``calibration`` is an iterable of batches (a tensor or a string is not)."""
    if isinstance(calibration, (Tensor, str, bytes)) or not isinstance(calibration, Iterable):
        raise UserError(f"calibration must be an iterable of batches (e.g. {example}), "
                        f"got {type(calibration).__name__}")


def check_batch_finite(x: Tensor, index: int) -> None:
    """``UserError`` naming calibration batch ``index`` when ``x`` holds NaN or infinite values."""
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        raise UserError(f"calibration batch {index} has NaN or infinite values: check the data and its transforms")


def calibration_inputs(
    calibration: Iterable[Any],
    example_inputs: Any,
    *,
    max_images: int | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Materialise ``calibration`` into checked input tensors ``[(B_i, *image), ...]``.

    Args:
        calibration: an iterable of batches, each an input tensor ``(B, *image)`` or a
            tuple/list whose first item is one (``(input, target)`` from a DataLoader);
            targets are never read.
        example_inputs: one example tensor ``(B0, *image)`` the model runs on; every
            batch must have its per-image shape ``image``.
        max_images: stop after this many images (the last batch is cut); None reads all.
        device: where the returned tensors live (the model's device); None keeps the
            example's device. Floating-point batches take the example's dtype.

    Raises ``UserError`` (one line, nothing changed) for: an object that is not
    iterable, no batches, a batch that is neither a tensor nor a pair, a batch of
    another per-image shape (both shapes are named), non-finite values.
    """
    example = _example_tensor(example_inputs)
    if example.ndim < 1:
        raise UserError("example_inputs must have a batch dimension, e.g. torch.randn(1, 3, 32, 32)")
    if max_images is not None:
        check_int(max_images, "max_images")
    check_iterable(calibration, "a DataLoader or a list of tensors")
    target = torch.device(device) if device is not None else example.device
    image = tuple(example.shape[1:])
    inputs: list[Tensor] = []
    seen = 0
    for index, batch in enumerate(calibration):
        x = _batch_input(batch, index)
        if tuple(x.shape[1:]) != image or x.ndim != example.ndim:
            raise UserError(
                f"calibration batch {index} has shape {tuple(x.shape)}, i.e. images of shape {tuple(x.shape[1:])}, "
                f"but the model's example input {tuple(example.shape)} has images of shape {image}"
            )
        if x.shape[0] == 0:
            continue
        if max_images is not None:
            x = x[: max_images - seen]
        check_batch_finite(x, index)
        x = x.to(target, dtype=example.dtype) if x.is_floating_point() and example.is_floating_point() else x.to(target)
        inputs.append(x)
        seen += x.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if not inputs:
        raise UserError(EMPTY)
    return inputs


def count_images(inputs: Sequence[Tensor]) -> int:
    """The number of images in a list of calibration batches."""
    return sum(int(x.shape[0]) for x in inputs)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients inside the block; every module's mode is restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes.items():
            module.training = training


def run_calibration(model: nn.Module, inputs: Iterable[Tensor], fn: Callable[[Tensor, Any], T] | None = None) -> list[T]:
    """Run ``model`` on every batch in eval mode without gradients; ``fn(input, output)`` per batch.

    Returns the list of ``fn``'s results (the outputs themselves when ``fn`` is None).
    The model's modes are restored afterwards, also when ``fn`` raises.
    """
    results: list[Any] = []
    with evaluating(model):
        for x in inputs:
            output = model(x)
            results.append(output if fn is None else fn(x, output))
    return results
