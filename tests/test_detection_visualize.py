"""Drawing detections (boxes, masks, keypoints), FPS timing, side-by-side PNG frames and GIF."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from norton.detection.models import create_detector
from norton.detection.visualize import (
    TITLE_HEIGHT,
    draw_detections,
    label_color,
    load_images,
    measure_fps,
    side_by_side,
)
from norton.errors import UserError

LABELME = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels where any channel differs."""
    return (before.to(torch.int16) - after.to(torch.int16)).abs().sum(0) > 0


def region(height, width, x0, y0, x1, y1):
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    return inside


def test_boxes_are_drawn_inside_their_box_only_and_low_scores_are_not():
    image = torch.zeros(3, 64, 80)
    detection = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 5.0, 75.0, 20.0]]),
                 "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.1])}
    drawn = draw_detections(image, detection, category_names=["__background__", "cat", "dog"])
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 64, 80)
    diff = changed(torch.zeros(3, 64, 80, dtype=torch.uint8), drawn)
    assert diff[12, 10:50].all() and diff[39, 10:50].all()  # the box's edges
    assert not (diff & ~region(64, 80, 10, 12, 51, 41)).any()  # nothing outside it (score 0.1 is hidden)
    assert not diff[25:35, 20:45].all()  # the box is not filled
    shown = draw_detections(image, detection, score_threshold=0.05)
    assert changed(drawn, shown)[5:21, 60:76].any()


def test_text_label_is_written():
    detection = {"boxes": torch.tensor([[2.0, 2.0, 60.0, 60.0]]), "labels": torch.tensor([1])}
    plain = draw_detections(torch.zeros(3, 64, 64), detection, category_names=["bg", "a"])
    named = draw_detections(torch.zeros(3, 64, 64), detection, category_names=["bg", "a much longer name"])
    assert changed(plain, named).any()  # the caption is drawn in the box


def test_masks_are_translucent_overlays_of_their_pixels():
    image = torch.full((3, 40, 40), 0.5)
    mask = torch.zeros(1, 1, 40, 40)
    mask[0, 0, 15:25, 5:30] = 0.9
    detection = {"boxes": torch.tensor([[0.0, 0.0, 39.0, 39.0]]), "labels": torch.tensor([3]),
                 "scores": torch.tensor([0.8]), "masks": mask}
    drawn = draw_detections(image, detection)
    base = draw_detections(image, {**detection, "masks": torch.zeros(1, 1, 40, 40)})
    diff = changed(base, drawn)
    assert diff[15:25, 5:30].all() and not (diff & ~region(40, 40, 5, 15, 30, 25)).any()
    color = torch.tensor(label_color(3), dtype=torch.uint8)
    assert not torch.equal(drawn[:, 20, 10], base[:, 20, 10]) and not torch.equal(drawn[:, 20, 10], color)  # blended


def test_target_masks_uint8_hw_are_drawn_too():
    masks = torch.zeros(1, 30, 30, dtype=torch.uint8)
    masks[0, 5:10, 5:10] = 1
    drawn = draw_detections(torch.zeros(3, 30, 30), {"boxes": torch.tensor([[0.0, 0.0, 29.0, 29.0]]),
                                                     "labels": torch.tensor([1]), "masks": masks})
    assert changed(torch.zeros(3, 30, 30, dtype=torch.uint8), drawn)[5:10, 5:10].all()


def test_keypoints_and_skeleton_lines_are_drawn_where_visible():
    keypoints = torch.tensor([[[10.0, 10.0, 1.0], [40.0, 10.0, 1.0], [25.0, 50.0, 0.0]]])
    detection = {"boxes": torch.tensor([[0.0, 0.0, 63.0, 63.0]]), "labels": torch.tensor([1]),
                 "keypoints": keypoints}
    without = draw_detections(torch.zeros(3, 64, 64), {**detection, "keypoints": keypoints[:, :0]})
    drawn = draw_detections(torch.zeros(3, 64, 64), detection, skeleton=[(0, 1), (1, 2)])
    diff = changed(without, drawn)
    assert diff[10, 10] and diff[10, 40] and diff[10, 25]  # both points and the line between them
    assert not diff[45:56, 20:31].any()  # the invisible point and its line are not drawn
    assert not (diff & ~region(64, 64, 6, 6, 45, 15)).any()


def test_real_photo_with_its_coco_annotations():
    from pycocotools import mask as mask_utils

    data = json.loads((LABELME / "annotations.json").read_text())
    info = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
    height, width = info["height"], info["width"]
    image = load_images(LABELME / info["file_name"])[0]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    masks = torch.stack([torch.from_numpy(mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects(a["segmentation"], height, width)))) for a in anns])
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]), "masks": masks}
    drawn = draw_detections(image, target, category_names=names)
    diff = changed((image * 255).round().to(torch.uint8), drawn)
    union = masks.bool().any(0)
    assert diff[union].float().mean() > 0.99  # every mask pixel is tinted
    inside = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.round().int().tolist():
        inside[max(y0 - 2, 0):y1 + 3, max(x0 - 2, 0):x1 + 3] = True
    assert not (diff & ~inside).any()


def test_bad_detection_is_a_user_error():
    with pytest.raises(UserError, match="needs 'boxes'"):
        draw_detections(torch.zeros(3, 8, 8), {"labels": torch.tensor([1])})
    with pytest.raises(UserError, match=r"must be \(3, H, W\)"):
        draw_detections(torch.zeros(8, 8), {"boxes": torch.zeros(0, 4)})


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    options = {"min_size": 64, "max_size": 64, "rpn_post_nms_top_n_test": 20, "box_score_thresh": 0.0,
               "box_detections_per_img": 5}  # a few drawn detections, little work
    baseline = create_detector("maskrcnn_resnet18_fpn", num_classes=3, **options)
    compressed = create_detector("maskrcnn_resnet18_fpn", num_classes=3, **options)
    return baseline.eval(), compressed.eval()


def test_measure_fps_is_positive_and_restores_the_mode(detectors):
    model = detectors[0].train()
    fps = measure_fps(model, [torch.rand(3, 48, 64)] * 2, warmup=1, repeats=2, batch_size=2)
    assert fps > 0 and model.training
    model.eval()
    with pytest.raises(UserError, match="repeats"):
        measure_fps(model, [torch.rand(3, 8, 8)], repeats=0)


def test_side_by_side_writes_frames_and_a_gif(detectors, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 48), (40 * index, 80, 120)).save(folder / f"{index}.png")
    (folder / "notes.txt").write_text("not an image")
    result = side_by_side(*detectors, folder, out_dir=tmp_path / "out", category_names=["bg", "a", "b"],
                          score_threshold=0.0, warmup=0, repeats=1, names=("dense", "pruned"))
    frames = sorted((tmp_path / "out").glob("frame_*.png"))
    assert frames == sorted(result["frames"]) and len(frames) == 3
    for frame in frames:
        with Image.open(frame) as picture:
            assert picture.size == (2 * 64, 48 + TITLE_HEIGHT)
    with Image.open(result["gif"]) as gif:
        assert gif.n_frames == 3 and gif.size == (2 * 64, 48 + TITLE_HEIGHT)
    assert set(result["fps"]) == {"dense", "pruned"} and all(v > 0 for v in result["fps"].values())
    with Image.open(frames[0]) as picture:
        left, right = picture.crop((0, 0, 64, TITLE_HEIGHT)), picture.crop((64, 0, 128, TITLE_HEIGHT))
        assert left.getbbox() is not None and right.getbbox() is not None  # both titles written
        assert left.tobytes() != right.tobytes()
        with Image.open(folder / "0.png") as source:
            plain = source.convert("RGB").tobytes()
        panel = picture.convert("RGB").crop((0, TITLE_HEIGHT, 64, TITLE_HEIGHT + 48))
        assert panel.tobytes() != plain  # detections drawn on the image


def test_inputs_are_checked_before_work(tmp_path):
    with pytest.raises(UserError, match="holds no image"):
        load_images(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_images(tmp_path / "missing")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="pip install av|cannot read video"):
        load_images(video)
