"""ONNX export of a compressed Faster R-CNN matches eager boxes, labels and scores."""
from __future__ import annotations

import pytest
import torch

import norton
from norton.detection.export import export_detector_onnx
from norton.detection.models import detector_example_inputs


def test_compressed_faster_rcnn_onnx_matches_eager(tmp_path):
    torch.manual_seed(0)
    model = norton.create_model("fasterrcnn_resnet18_fpn", num_classes=3, min_size=96, max_size=96,
                                rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                                box_detections_per_img=5, box_score_thresh=0.0).eval()
    image = detector_example_inputs(model, 96)[0]
    norton.decompose(model, 1, progress=False)
    norton.prune(model, [image], ratio=0.3)
    result = export_detector_onnx(model, tmp_path / "det.onnx", image)
    assert result.path.is_file() and result.opset == 17
    assert result.max_relative_difference is not None and result.max_relative_difference <= 1e-3


def test_bad_arguments(tmp_path):
    with pytest.raises(norton.UserError, match="torchvision detectors"):
        export_detector_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "x.onnx", torch.rand(3, 8, 8))
    model = norton.create_model("fasterrcnn_resnet18_fpn", min_size=64, max_size=64)
    with pytest.raises(norton.UserError, match="opset"):
        export_detector_onnx(model, tmp_path / "x.onnx", torch.rand(3, 64, 64), opset=9)
    with pytest.raises(norton.UserError, match=r"\(3, H, W\)"):
        export_detector_onnx(model, tmp_path / "x.onnx", torch.rand(1, 3, 64, 64))
    assert not (tmp_path / "x.onnx").exists()
