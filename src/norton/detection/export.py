"""ONNX export of a torchvision detector (Faster / Mask / Keypoint R-CNN), checked against eager.

torchvision's R-CNNs export with the legacy (TorchScript-tracing) exporter at opset >= 11
and one fixed image size: the graph takes one image ``(3, H, W)`` and returns boxes,
labels and scores (+ masks / keypoints). The file is written beside the target, run in
onnxruntime on the example image and compared with eager PyTorch (boxes and scores within
a tolerance, labels equal); only a file that passes is renamed into place.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from norton.deploy.export import (
    ExportCheckError,
    ExportResult,
    _publish,
    _target,
    _temporary_beside,
    onnxruntime_session,
)
from norton.errors import UserError

MIN_OPSET = 11
OUTPUT_KEYS = ("boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores")


def export_detector_onnx(
    model: nn.Module, path: str | os.PathLike, image: Tensor, *, opset: int = 17, tolerance: float = 1e-3,
) -> ExportResult:
    """Export ``model`` (eval mode) at ``image``'s size to ONNX and check it in onnxruntime.

    Args:
        model: a torchvision detector (``norton.detection.create_detector``), compressed or not.
        path: the ``.onnx`` file to write.
        image: one image ``(3, H, W)``; the exported graph takes images of this size.
        opset: ONNX opset, at least 11 (torchvision's RoIAlign and NMS need it).
        tolerance: largest box / score difference allowed, relative to the largest box coordinate.

    Raises:
        UserError: not a detector, a bad image or opset; ExportCheckError: outputs differ from eager.
    """
    from norton.detection.models import is_detector

    if not is_detector(model):
        raise UserError(f"export_detector_onnx exports torchvision detectors, got a {type(model).__name__}; "
                        "use norton.export_onnx for classifiers")
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise UserError(f"image must be one (3, H, W) tensor, got {shape}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"opset must be an integer >= {MIN_OPSET} (torchvision's detection ops), got {opset!r}")
    target = _target(path, ".onnx")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model([image])[0]
        keys = [key for key in OUTPUT_KEYS if key in expected]
        with _temporary_beside(target) as tmp:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings about Python values in the graph
                torch.onnx.export(model, ([image],), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=keys)
            session = onnxruntime_session(tmp)
            actual = session.run(None, {session.get_inputs()[0].name: image.detach().cpu().numpy()})
            difference = compare_detections(expected, dict(zip(keys, actual, strict=True)), tolerance)
            _publish(tmp, target)
    finally:
        model.train(was_training)
    return ExportResult(target, "onnx", opset, (1,), difference)


def compare_detections(expected: dict[str, Tensor], actual: dict[str, Any], tolerance: float) -> float:
    """Largest difference of boxes / scores (+ masks, keypoints) relative to the largest box coordinate.

    ``ExportCheckError`` if the number of detections or any label differs, or a difference exceeds ``tolerance``.
    """
    count = expected["boxes"].shape[0]
    got = {key: torch.as_tensor(np.asarray(value)) for key, value in actual.items()}
    if got["boxes"].shape[0] != count:
        raise ExportCheckError(f"ONNX finds {got['boxes'].shape[0]} detections, eager {count}; no file was written")
    if not torch.equal(got["labels"].long().cpu(), expected["labels"].long().cpu()):
        raise ExportCheckError("ONNX labels differ from eager PyTorch; no file was written")
    scale = max(float(expected["boxes"].abs().max()) if count else 1.0, 1.0)
    worst = 0.0
    for key, value in expected.items():
        if key == "labels" or count == 0:
            continue
        worst = max(worst, float((got[key].float() - value.float().cpu()).abs().max()) / (scale if key != "scores" else 1.0))
    if not worst <= tolerance:
        raise ExportCheckError(f"ONNX detections differ from eager PyTorch by {worst:.3g} > {tolerance:g}; "
                               "no file was written")
    return worst
