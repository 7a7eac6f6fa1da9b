"""auto_compress, prune(target_macs) and the compress pipeline on a detector; its calibration and feature view."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import norton
from norton.auto.sensitivity import capture
from norton.detection.complexity import detector_complexity
from norton.detection.features import DetectorFeatures, detector_calibration_inputs
from norton.detection.models import body_widths, detector_example_inputs
from norton.detection.parts import parts_macs
from norton.errors import UserError

SIZE = 64
SMALL = {"min_size": SIZE, "max_size": SIZE, "rpn_pre_nms_top_n_test": 30, "rpn_post_nms_top_n_test": 10,
         "box_detections_per_img": 5, "box_score_thresh": 0.0}


def detector(kind: str = "fasterrcnn") -> nn.Module:
    torch.manual_seed(0)
    return norton.create_model(f"{kind}_resnet18_fpn", num_classes=3, **SMALL).eval()


def loader_batches(n: int = 2, per_batch: int = 2) -> list:
    """What a detection DataLoader yields: (images, targets) with images of different sizes."""
    generator = torch.Generator().manual_seed(3)
    return [(tuple(torch.rand(3, SIZE, SIZE + 8 * i, generator=generator) for i in range(per_batch)),
             tuple({"boxes": torch.zeros(0, 4)} for _ in range(per_batch))) for _ in range(n)]


def outputs(model: nn.Module, images: list) -> dict:
    with torch.no_grad():
        return model(images)[0]


def test_calibration_batches_are_the_detectors_transformed_images():
    model = detector()
    inputs = detector_calibration_inputs(loader_batches(3), model, max_images=5)
    assert [x.shape[0] for x in inputs] == [2, 2, 1]
    assert all(x.shape[1] == 3 and x.shape[-1] % 32 == 0 for x in inputs)  # resized and padded to the divisor
    # the same images as a list, a 4-D tensor or a pair give the same batch
    image = torch.rand(3, SIZE, SIZE)
    as_list = detector_calibration_inputs([[image]], model)[0]
    as_tensor = detector_calibration_inputs([image[None]], model)[0]
    as_pair = detector_calibration_inputs([(image[None], [{}])], model)[0]
    assert torch.equal(as_list, as_tensor) and torch.equal(as_list, as_pair)
    assert model.transform.training is False


@pytest.mark.parametrize(("calibration", "message"), [
    ([], "gave no batches"),
    (torch.rand(2, 3, SIZE, SIZE), "iterable of batches"),
    ([[torch.rand(1, SIZE, SIZE)]], r"images of shape \(3, H, W\)"),
    ([[torch.full((3, SIZE, SIZE), math.nan)]], "NaN"),
    ([("not", "images")], "holding no image tensors"),
])
def test_calibration_mistakes_are_one_line(calibration, message):
    with pytest.raises(UserError, match=message):
        detector_calibration_inputs(calibration, detector())


def test_feature_view_runs_the_detectors_own_modules():
    model = detector()
    x = detector_calibration_inputs([[torch.rand(3, SIZE, SIZE)]], model)[0]
    outs = DetectorFeatures(model)(x)
    levels = len(model.backbone(x))
    assert len(outs) == 3 * levels  # FPN maps, objectness and box deltas per level
    assert outs[0].shape[1] == 256 and outs[levels].shape[1] == 3 and outs[2 * levels].shape[1] == 12
    # a hook on the detector's module fires in the view: they are the same modules
    seen = []
    model.backbone.body.conv1.register_forward_hook(lambda *_: seen.append(True))
    DetectorFeatures(model)(x)
    assert seen


def test_sensitivity_sees_every_output_not_only_the_first():
    """A change that reaches only the second output must have a non-zero gradient at its layer."""
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.first(x), self.second(x)

    model = TwoOutputs()
    batch = capture(model, torch.rand(2, 3, 5, 5), [model.second], samples=2, generator=torch.Generator())
    assert float(batch.g[model.second].abs().sum()) > 0


@pytest.mark.slow  # two auto_compress runs of a ResNet-18 detector, each traced twice: ~40 s on 2 cores
def test_auto_compress_meets_the_parts_budget_and_round_trips(tmp_path):
    model = detector()
    before = copy.deepcopy(model.state_dict())
    images = detector_example_inputs(model, SIZE)
    result = norton.auto_compress(model, images, target_macs=0.5, calibration=loader_batches(2), ranks=(1,),
                                  sensitivity_images=4, calibration_images=4, detector_parts=("body", "fpn"),
                                  progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    parts = ("body", "fpn")
    fraction = parts_macs(result, images, parts) / parts_macs(model, images, parts)
    assert abs(fraction - 0.5) <= 0.02 * 0.5
    assert all(block[0].out_channels == 256 for block in result.backbone.fpn.layer_blocks)  # the RoI heads' input
    assert result.roi_heads.box_predictor.cls_score.out_features == 3
    norton.save(result, tmp_path / "auto.pt")
    loaded = norton.load(tmp_path / "auto.pt").eval()
    a, b = outputs(result.eval(), images), outputs(loaded, images)
    assert all(torch.equal(a[key], b[key]) for key in a)
    # the same call under another global random state gives the same weights
    torch.manual_seed(99)
    again = norton.auto_compress(model, images, target_macs=0.5, calibration=loader_batches(2), ranks=(1,),
                                 sensitivity_images=4, calibration_images=4, detector_parts=("body", "fpn"),
                                 progress=False)
    first, second = result.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_auto_compress_on_a_detector_refuses_what_it_cannot_judge():
    model = detector()
    images = detector_example_inputs(model, SIZE)
    with pytest.raises(UserError, match="body and fpn"):
        norton.auto_compress(model, images, target_macs=0.5, calibration=loader_batches(1), detector_parts=("rpn",))
    with pytest.raises(UserError, match="target_latency is for classifiers"):
        norton.auto_compress(model, images, target_latency=0.5, calibration=loader_batches(1))
    with pytest.raises(UserError, match="gave no batches"):
        norton.auto_compress(model, images, target_macs=0.5, calibration=[])


def test_prune_target_macs_is_a_fraction_of_the_parts_macs():
    model = detector()
    images = detector_example_inputs(model, SIZE)
    original = parts_macs(model, images, ("body",))
    norton.prune(model, images, target_macs=0.6, criterion="l1")
    assert abs(parts_macs(model, images, ("body",)) / original - 0.6) <= 0.02 * 0.6
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == body_widths(model.backbone.body)


def test_complexity_of_a_detector_with_a_pruned_fpn_counts_the_narrower_box_head():
    model = detector()
    dense = detector_complexity(model, SIZE)
    norton.prune(model, detector_example_inputs(model, SIZE), ratio=0.5, detector_parts=("fpn",))
    assert model.roi_heads.box_head.fc6.in_features == 128 * 7 * 7
    pruned = detector_complexity(model, SIZE)
    assert pruned.macs < dense.macs and pruned.params < dense.params
