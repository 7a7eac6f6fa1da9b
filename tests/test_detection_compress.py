"""decompose / prune on a detector: the body by default, other parts on request, heads' outputs kept."""
from __future__ import annotations

import pytest
import torch

import norton
from norton.decomposition.low_rank_layers import LowRankLinear
from norton.detection.models import body_widths, detector_example_inputs
from norton.detection.parts import outside_parts

SMALL = {"min_size": 96, "max_size": 96, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
         "box_detections_per_img": 5, "box_score_thresh": 0.0}


def detector(kind="fasterrcnn", **kwargs):
    torch.manual_seed(0)
    return norton.create_model(f"{kind}_resnet18_fpn", num_classes=3, **SMALL, **kwargs).eval()


def run(model, images):
    with torch.no_grad():
        return model(images)[0]


def test_decompose_and_prune_act_on_the_body_by_default(tmp_path):
    model = detector("maskrcnn")
    images = detector_example_inputs(model, 96)
    norton.decompose(model, 1, progress=False)
    assert all(name.startswith("backbone.body.") for name in model.norton_plan[0]["ranks"])
    norton.prune(model, images, ratio=0.3)
    removed = model.norton_plan[1]["removed"]
    assert removed and all(name.startswith("backbone.body.") for name in removed)
    # the FPN's lateral convs follow the pruned body through the dependency graph
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == body_widths(model.backbone.body)
    assert body_widths(model.backbone.body) == [44, 89, 179, 358]
    result = run(model, images)
    assert result["masks"].shape[1:] == (1, 96, 96) and model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    norton.save(model, tmp_path / "det.pt")
    loaded, again = norton.load(tmp_path / "det.pt"), run(model, images)
    reloaded = run(loaded, images)
    assert all(torch.equal(again[key], reloaded[key]) for key in again)


def test_fpn_and_rpn_on_request_keep_the_heads_outputs():
    model = detector()
    images = detector_example_inputs(model, 96)
    norton.prune(model, images, ratio=0.3, detector_parts=("fpn", "rpn"))
    assert model.rpn.head.conv[0][0].out_channels == 179  # int(256 * 0.7)
    assert model.rpn.head.cls_logits.out_channels == 3 and model.rpn.head.bbox_pred.out_channels == 12
    assert model.backbone.fpn.layer_blocks[0][0].out_channels == 179
    assert model.roi_heads.box_head.fc6.in_features == 179 * 7 * 7  # the RoI features follow the FPN
    assert body_widths(model.backbone.body) == [64, 128, 256, 512]  # the body was not asked for
    result = run(model, images)
    assert result["boxes"].shape[1] == 4 and model.roi_heads.box_predictor.cls_score.out_features == 3


@pytest.mark.slow  # a full SVD of the 12544x1024 fc6 (~15 s on a loaded CPU)
def test_box_head_low_rank_svd_on_request():
    model = detector()
    images = detector_example_inputs(model, 96)
    before = run(model, images)
    norton.decompose(model, 1024, method="svd", detector_parts=("box_head",), progress=False)  # full rank: exact
    assert isinstance(model.roi_heads.box_head.fc6, LowRankLinear)
    after = run(model, images)
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)
    with pytest.raises(norton.UserError, match="method='svd'"):
        norton.prune(model, images, ratio=0.3, detector_parts=("box_head",))
    with pytest.raises(norton.UserError, match="no layer cp-filter takes"):
        norton.decompose(model, 1, detector_parts=("box_head",), progress=False)


def test_parts_are_checked():
    model = detector()
    assert outside_parts(model, ("body",)) == ["backbone.fpn", "rpn", "roi_heads"]
    assert "rpn.head.cls_logits" in outside_parts(model, ("rpn",))
    with pytest.raises(norton.UserError, match="unknown detector part"):
        norton.decompose(model, 1, detector_parts=("neck",), progress=False)
    with pytest.raises(norton.UserError, match="no mask_head"):
        norton.decompose(model, 1, detector_parts=("mask_head",), progress=False)
    with pytest.raises(norton.UserError, match="torchvision detectors"):
        norton.decompose(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 1, detector_parts=("body",))
