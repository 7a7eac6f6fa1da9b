"""A detector's dense part as one tensor-in, tensors-out module, and calibration images for it.

Data-aware steps (``auto_compress``'s sensitivity analysis, recovery after pruning or
decomposition) run a model on batches of images and watch its layers. A torchvision R-CNN
takes a list of images of any size and returns detections chosen by non-differentiable
steps (top-k proposals, NMS), and its RoI heads' work depends on how many proposals there
are. The parts norton compresses (body, FPN, RPN head) sit before all of that, so the
data-aware steps run :class:`DetectorFeatures`: the detector's own modules from the
normalized, resized and padded image batch up to the FPN maps and the RPN head's outputs.
Its change under compression is what the detections are computed from, and it is a plain
function of a ``(B, 3, H, W)`` tensor.

:func:`detector_calibration_inputs` turns what a detection ``DataLoader`` yields (``(images,
targets)`` pairs, or lists of images) into such batches, through the detector's own
``transform`` in eval mode (the test-time resize). Importing this module imports nothing heavy.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from norton.errors import UserError
from norton.limits import check_int

__all__ = ["DetectorFeatures", "detector_calibration_inputs"]


class DetectorFeatures(nn.Module):
    """``detector``'s backbone (body + FPN) and RPN head: ``(B, 3, H, W)`` -> FPN maps, objectness, box deltas.

    The input is the detector's transformed batch (``detector.transform(images)[0].tensors``);
    the modules are the detector's own (not copies), so hooks on them fire here.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector: Any = detector  # a GeneralizedRCNN (typed Any: torchvision's attributes are untyped)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        maps = list(self.detector.backbone(x).values())  # (B, F, H_l, W_l) per level
        objectness, deltas = self.detector.rpn.head(maps)  # (B, A, H_l, W_l), (B, 4A, H_l, W_l) per level
        return (*maps, *objectness, *deltas)


def detector_calibration_inputs(
    calibration: Iterable[Any], detector: nn.Module, *, max_images: int | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Calibration batches for :class:`DetectorFeatures`: each ``(B, 3, H, W)``, transformed as the detector does.

    Args:
        calibration: an iterable of batches, each a list/tuple of image tensors ``(3, H, W)``
            (any sizes), a tensor ``(B, 3, H, W)``, or a pair whose first item is one of those
            (``(images, targets)`` from a detection DataLoader; targets are never read).
        detector: the torchvision detector whose ``transform`` (normalize, resize, pad) is applied.
        max_images: stop after this many images; None reads all.
        device: where the batches live (the detector's device).

    Raises ``UserError`` (one line, nothing changed) for: a non-iterable, no batches, a batch
    that holds no images, an image that is not ``(C, H, W)`` with the detector's channel count,
    non-finite values.
    """
    from norton.calibration import EMPTY, check_iterable
    from norton.example_inputs import model_device

    if max_images is not None:
        check_int(max_images, "max_images")
    check_iterable(calibration, "a DataLoader over detection images")
    target = torch.device(device) if device is not None else model_device(detector)
    transform: Any = detector.transform
    channels = len(transform.image_mean)
    inputs: list[Tensor] = []
    seen = 0
    was_training = transform.training
    transform.eval()  # the test-time resize (training picks a random size)
    try:
        for index, batch in enumerate(calibration):
            images = _batch_images(batch, index, channels)
            if max_images is not None:
                images = images[: max_images - seen]
            if not images:
                continue
            with torch.no_grad():
                x = transform([image.to(target, torch.float32) for image in images])[0].tensors
            inputs.append(x)
            seen += x.shape[0]
            if max_images is not None and seen >= max_images:
                break
    finally:
        transform.train(was_training)
    if not inputs:
        raise UserError(EMPTY)
    return inputs


def _batch_images(batch: Any, index: int, channels: int) -> list[Tensor]:
    """The images of one calibration batch as a list of checked ``(C, H, W)`` tensors."""
    from norton.calibration import check_batch_finite

    images = batch
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], Tensor):
        images = batch[0]  # (images, targets)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (dict, list, tuple)) \
            and isinstance(batch[0], Tensor) and batch[0].ndim == 4:
        images = batch[0]  # (tensor of images, targets)
    if isinstance(images, Tensor):
        images = list(images) if images.ndim == 4 else [images]
    if not isinstance(images, (tuple, list)) or not all(isinstance(image, Tensor) for image in images):
        raise UserError(f"calibration batch {index} is a {type(batch).__name__} holding no image tensors: each batch "
                        "must be a list of images (C, H, W), a tensor (B, C, H, W) or an (images, targets) pair")
    for image in images:
        if image.ndim != 3 or image.shape[0] != channels:
            raise UserError(f"calibration batch {index} has an image of shape {tuple(image.shape)}; the detector "
                            f"takes images of shape ({channels}, H, W)")
        check_batch_finite(image, index)
    return list(images)
