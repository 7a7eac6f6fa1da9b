"""create_detector: kinds, aliases, options, bodies from files, FPN widths, save/load, errors."""
from __future__ import annotations

import pytest
import torch

import norton
from norton.detection.models import body_widths, create_detector, detector_example_inputs, is_detector

SMALL = {"min_size": 96, "max_size": 96, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
         "box_detections_per_img": 5, "box_score_thresh": 0.0}


def small(name: str, **kwargs):
    torch.manual_seed(0)
    return norton.create_model(name, **SMALL, **kwargs).eval()


def outputs(model, images):
    with torch.no_grad():
        return model(images)[0]


@pytest.mark.parametrize("kind, extra", [("fasterrcnn", ()), ("maskrcnn", ("masks",)),
                                         ("keypointrcnn", ("keypoints", "keypoints_scores"))])
def test_each_kind_builds_runs_and_is_listed(kind, extra):
    model = small(f"{kind}_resnet18_fpn", num_classes=4)
    assert is_detector(model) and f"{kind}_resnet50_fpn" in norton.list_models()
    result = outputs(model, detector_example_inputs(model, 96))
    assert set(result) == {"boxes", "labels", "scores", *extra}
    assert result["boxes"].shape[1] == 4 and result["boxes"].shape[0] <= 5
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_num_keypoints_and_default_classes():
    model = small("keypointrcnn_resnet18_fpn", num_keypoints=5)
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 5
    assert model.roi_heads.box_predictor.cls_score.out_features == 2  # torchvision's default for keypoints
    assert small("fasterrcnn_resnet18_fpn").roi_heads.box_predictor.cls_score.out_features == 91


def test_alias_builds_the_resnet50_detector():
    model = create_detector("fasterrcnn_CPresnet50_fpn", **SMALL)
    assert model.norton_architecture["name"] == "fasterrcnn_CPresnet50_fpn"
    assert [block[0].in_channels for block in model.backbone.fpn.inner_blocks] == [256, 512, 1024, 2048]
    # torchvision's own detector: 41,755,286 parameters + 53,120 FrozenBatchNorm affine buffers, trainable here
    assert sum(p.numel() for p in model.parameters()) == 41_755_286 + 53_120


def test_pruned_resnet50_file_sets_fpn_widths(tmp_path):
    body = norton.create_model("resnet_50", compress_rate="[0.]+[0.25]*3+[0.5]*16", rank=1)
    norton.save(body, tmp_path / "body.pt")
    model = create_detector("maskrcnn_resnet50_fpn", backbone=tmp_path / "body.pt", **SMALL).eval()
    widths = [block[0].in_channels for block in model.backbone.fpn.inner_blocks]
    assert widths == body_widths(model.backbone.body) == [192, 384, 768, 2048]
    assert all(p.requires_grad for p in model.parameters())  # compressed: every layer trains
    assert not any("Frozen" in type(m).__name__ for m in model.modules())
    outputs(model, detector_example_inputs(model, 96))
    loaded_body = norton.load(tmp_path / "body.pt")
    torch.testing.assert_close(model.backbone.body.conv1.weight, loaded_body.conv1.weight)


def test_torchvision_weights_file_and_module(tmp_path):
    import torchvision

    classifier = torchvision.models.resnet18(num_classes=7)
    torch.save(classifier.state_dict(), tmp_path / "tv.pth")
    model = create_detector("fasterrcnn_resnet18_fpn", backbone=tmp_path / "tv.pth", **SMALL)
    torch.testing.assert_close(model.backbone.body.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
    adopted = create_detector("fasterrcnn_resnet18_fpn", backbone=classifier, **SMALL)
    assert adopted.norton_architecture["kwargs"]["backbone"]["architecture"]["name"] == "torchvision.resnet18"


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "keypointrcnn"])
def test_compressed_body_detector_save_load_identical(tmp_path, kind):
    body = norton.create_model("torchvision.resnet18")
    norton.decompose(body, 1, progress=False)
    norton.prune(body, torch.randn(1, 3, 64, 64), ratio=0.25)
    model = create_detector(f"{kind}_resnet18_fpn", backbone=body, num_classes=3, **SMALL).eval()
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == body_widths(body) == [48, 96, 192, 384]
    norton.save(model, tmp_path / "det.pt")
    loaded = norton.load(tmp_path / "det.pt")
    images = detector_example_inputs(model, 96)
    expected, got = outputs(model, images), outputs(loaded, images)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    with pytest.raises(norton.UserError, match="unknown detector"):
        create_detector("fasterrcnn_vgg16_fpn")
    with pytest.raises(norton.UserError, match="unknown model"):
        norton.create_model("retinanet_resnet50_fpn")
    with pytest.raises(norton.UserError, match="not found"):
        create_detector("fasterrcnn_resnet50_fpn", backbone=tmp_path / "missing.pt")
    norton.save(norton.create_model("resnet_56"), tmp_path / "r56.pt")
    with pytest.raises(norton.UserError, match="not a ResNet-50"):
        create_detector("fasterrcnn_resnet50_fpn", backbone=tmp_path / "r56.pt")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(norton.UserError, match="not a torchvision-format ResNet-50"):
        create_detector("fasterrcnn_resnet50_fpn", backbone=tmp_path / "junk.pth")
    with pytest.raises(norton.UserError, match="takes no option"):
        create_detector("fasterrcnn_resnet18_fpn", rpn_typo=3)
    with pytest.raises(norton.UserError, match="no keypoints"):
        create_detector("fasterrcnn_resnet18_fpn", num_keypoints=5)
    for error in (ValueError,):
        try:
            create_detector("nope")
        except error as caught:
            assert "\n" not in str(caught)
