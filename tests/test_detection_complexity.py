"""Detector MACs/params part by part with fixed RoI counts (norton.detection.complexity, norton complexity)."""
import json

import pytest
import torch
from torchvision.models import detection

from norton.cli.main import main
from norton.complexity import count_complexity
from norton.detection.complexity import detector_complexity, format_complexity
from norton.detection.models import create_detector
from norton.errors import UserError

SMALL = {"min_size": 64, "max_size": 64}


def total_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def small_mask_rcnn():
    torch.manual_seed(0)
    return create_detector("maskrcnn_resnet18_fpn", num_classes=5, **SMALL)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_params_equal_torchvisions_exactly(name):
    # Params do not depend on the image size: a 64-pixel transform keeps this fast.
    model = getattr(detection, name)(weights=None, weights_backbone=None, **SMALL)
    result = detector_complexity(model, 64)
    assert result.params == total_params(model)
    assert sum(part.params for part in result.parts) == result.params
    ours = create_detector(name, **SMALL)
    assert detector_complexity(ours, 64).params == total_params(ours) == total_params(model)


def test_deterministic_and_independent_of_the_weights(small_mask_rcnn):
    first = detector_complexity(small_mask_rcnn, 96)
    again = detector_complexity(small_mask_rcnn, 96)
    torch.manual_seed(123)
    other = create_detector("maskrcnn_resnet18_fpn", num_classes=5, **SMALL)
    assert first == again
    assert (first.macs, first.params) == (detector_complexity(other, 96).macs, detector_complexity(other, 96).params)
    assert sum(part.macs for part in first.parts) == first.macs
    assert small_mask_rcnn.training  # the model's mode is restored


def test_roi_parts_scale_with_the_roi_counts(small_mask_rcnn):
    none = detector_complexity(small_mask_rcnn, 64, proposals=0, detections=0, convention="conv+linear")
    some = detector_complexity(small_mask_rcnn, 64, proposals=10, detections=3, convention="conv+linear")
    # conv+linear closed forms: fc6 12544->1024, fc7 1024->1024, predictor 1024 -> 5 + 4*5
    box = 256 * 7 * 7 * 1024 + 1024 * 1024 + 1024 * (5 + 20)
    # mask head: 4 convs 3x3 256->256 on 14x14, ConvTranspose 2x2 256->256 (14->28), 1x1 256->5 on 28x28
    mask = 4 * 14 * 14 * 256 * 256 * 9 + 14 * 14 * 256 * 256 * 4 + 28 * 28 * 256 * 5
    assert some.macs - none.macs == 10 * box + 3 * mask
    assert some.params == none.params  # heads that saw no RoI still count their parameters
    rows = {part.name: part.runs for part in some.parts}
    assert rows["roi_heads.box_head"] == 10 and rows["roi_heads.mask_predictor"] == 3 and rows["backbone.body"] == 1


def test_body_is_counted_at_the_transformed_size(small_mask_rcnn):
    # min/max size 64: a 128x96 image is scaled by min(64/96, 64/128) to 64x48, then padded to 64x64
    result = detector_complexity(small_mask_rcnn, (128, 96), convention="conv+linear")
    assert result.image_size == (64, 64)
    body = count_complexity(small_mask_rcnn.backbone.body, example_inputs=torch.zeros(1, 3, 64, 64))
    assert next(p for p in result.parts if p.name == "backbone.body").macs == body.macs
    assert "64x64" in format_complexity(result)
    tall = detector_complexity(create_detector("maskrcnn_resnet18_fpn", min_size=64, max_size=200), (128, 96))
    assert tall.image_size == (96, 64)  # 128x96 -> 85x64 -> padded to 96x64


def test_protocols():
    model = create_detector("keypointrcnn_resnet18_fpn", **SMALL)
    paper = detector_complexity(model, 64)
    most = detector_complexity(model, 64, protocol="max")
    assert (paper.proposals, paper.detections) == (1000, 1)
    assert (most.proposals, most.detections) == (1000, model.roi_heads.detections_per_img)
    keypoint_rows = [p for p in paper.parts if p.name.startswith("roi_heads.keypoint")]
    assert most.macs - paper.macs == 99 * sum(p.macs for p in keypoint_rows)


def test_count_complexity_of_a_detector_is_per_image():
    # An image list's batch is its length, not the 3 channels of its first image.
    model = create_detector("fasterrcnn_resnet18_fpn", **SMALL)
    images = [torch.zeros(3, 64, 64), torch.zeros(3, 64, 64)]
    body_share = count_complexity(model, example_inputs=images, convention="conv+linear")
    one = count_complexity(model, example_inputs=images[:1], convention="conv+linear")
    counted = detector_complexity(model, 64, proposals=0, detections=0, convention="conv+linear")
    assert body_share.input_size == (3, 64, 64)
    image_level = sum(p.macs for p in counted.parts if p.runs == 1 and not p.name.startswith("roi_heads"))
    assert min(body_share.macs, one.macs) >= image_level  # never a third of the backbone


def test_user_errors(small_mask_rcnn):
    with pytest.raises(UserError, match="torchvision R-CNNs"):
        detector_complexity(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(UserError, match="unknown protocol"):
        detector_complexity(small_mask_rcnn, protocol="typical")
    with pytest.raises(UserError, match="proposals"):
        detector_complexity(small_mask_rcnn, proposals=-1)
    with pytest.raises(UserError, match="unknown complexity convention"):
        detector_complexity(small_mask_rcnn, convention="flops")


def test_cli_detector_json(capsys):
    code = main(["complexity", "--model", "fasterrcnn_resnet18_fpn", "--input-size", "64", "--proposals", "5",
                 "--per-layer", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["proposals"] == 5 and report["detections"] == 1
    assert report["params"] == total_params(create_detector("fasterrcnn_resnet18_fpn"))
    assert sum(part["macs"] for part in report["parts"]) == report["macs"] == report["baseline_macs"]


def test_cli_compressed_body_reduces_macs(capsys):
    code = main(["complexity", "--arch", "fasterrcnn_resnet50_fpn", "--input-size", "64", "--proposals", "10", "-r", "1",
                 "-cpr", "[0.]+[0.1]*2+[0.4]*5+[0.75]*12"])
    out = capsys.readouterr().out
    assert code == 0 and "body resnet_50, rank 1" in out
    macs = next(line for line in out.splitlines() if line.startswith("MACs")).split()
    assert float(macs[-1].rstrip("%")) > 10  # the compressed body's saving


@pytest.mark.parametrize(("argv", "message"), [
    (["--arch", "resnet_56", "--proposals", "3"], "for detectors"),
    (["--arch", "fasterrcnn_resnet18_fpn", "--detections", "-1"], "--detections must be in [0,"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    code = main(["complexity", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_papers_faster_rcnn_row_at_800():
    # README: FasterRCNN 134.85G MACs, 41.81M params (the reference convention).
    result = detector_complexity(detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None), 800)
    assert result.image_size == (800, 800)
    assert round(result.macs / 1e9, 2) == 134.85 and round(result.params / 1e6, 2) == 41.81
