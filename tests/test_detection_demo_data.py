"""The Fashion-MNIST demo set: COCO layout, boxes/masks/keypoints from the glyph pixels, determinism, flips."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from norton.detection.coco import CocoDetection, coco_datasets
from norton.detection.demo_data import FASHION_MNIST_CLASSES, extreme_keypoints, make_demo_data
from norton.detection.transforms import train_transforms
from norton.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"), train_images=12, val_images=6, canvas=96, seed=1)


def test_layout_and_categories(demo: Path) -> None:
    for split, count in (("train", 12), ("val", 6)):
        assert len(list((demo / f"{split}2017").iterdir())) == count
        instances = json.loads((demo / "annotations" / f"instances_{split}2017.json").read_text())
        assert [c["name"] for c in instances["categories"]] == list(FASHION_MNIST_CLASSES)
        keypoints = json.loads((demo / "annotations" / f"person_keypoints_{split}2017.json").read_text())
        assert keypoints["categories"][0]["keypoints"] == ["top", "bottom", "left", "right"]
        assert [a["id"] for a in keypoints["annotations"]] == [a["id"] for a in instances["annotations"]]
    train, val = coco_datasets(demo, kind="masks")
    assert (len(train), len(val), train.num_classes) == (12, 6, 11)
    train_kp, _ = coco_datasets(demo, kind="keypoints")
    assert train_kp.num_classes == 2 and train_kp.flip_indices == [0, 1, 3, 2]


def test_boxes_masks_and_keypoints_come_from_the_glyph(demo: Path) -> None:
    masks = CocoDetection(demo / "val2017", demo / "annotations/instances_val2017.json", kind="masks")
    points = CocoDetection(demo / "val2017", demo / "annotations/person_keypoints_val2017.json", kind="keypoints")
    counts = []
    for index in range(len(masks)):
        image, target = masks[index]
        _, keypoint_target = points[index]
        boxes, count = target["boxes"], len(target["boxes"])
        counts.append(count)
        assert image.shape == (3, 96, 96) and 1 <= count <= 3
        for i in range(count):
            mask = target["masks"][i].numpy().astype(bool)
            rows, cols = np.nonzero(mask)
            assert boxes[i].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]  # tight box
            assert keypoint_target["keypoints"][i].flatten().tolist() == pytest.approx(extreme_keypoints(mask))
            # The glyph is bright where its mask is, on a dark background.
            assert image[:, mask].mean() > image[:, ~mask].mean() + 0.2
            for j in range(i + 1, count):  # no two boxes overlap
                x0, y0 = torch.maximum(boxes[i, :2], boxes[j, :2])
                x1, y1 = torch.minimum(boxes[i, 2:], boxes[j, 2:])
                assert x1 <= x0 or y1 <= y0
    assert len(set(counts)) > 1


def test_flip_maps_keypoints_onto_the_flipped_glyph(demo: Path) -> None:
    dataset = CocoDetection(demo / "train2017", demo / "annotations/person_keypoints_train2017.json",
                            kind="keypoints")
    masks = CocoDetection(demo / "train2017", demo / "annotations/instances_train2017.json", kind="masks",
                          transforms=train_transforms("masks", flip_p=1.0))
    dataset.transforms = train_transforms("keypoints", dataset.flip_indices, flip_p=1.0)
    for index in range(3):
        _, flipped = dataset[index]
        _, flipped_masks = masks[index]
        for mask, keypoints in zip(flipped_masks["masks"], flipped["keypoints"], strict=True):
            assert keypoints.flatten().tolist() == pytest.approx(extreme_keypoints(mask.numpy().astype(bool)))


def test_deterministic_by_seed(demo: Path, tmp_path: Path) -> None:
    again = make_demo_data(tmp_path / "again", train_images=12, val_images=6, canvas=96, seed=1)
    other = make_demo_data(tmp_path / "other", train_images=12, val_images=6, canvas=96, seed=2)
    name = "annotations/instances_train2017.json"
    assert (again / name).read_text() == (demo / name).read_text() != (other / name).read_text()
    image = "val2017/000000000003.jpg"
    assert (again / image).read_bytes() == (demo / image).read_bytes() != (other / image).read_bytes()


def test_extreme_keypoints_hand_computed() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[1, 2:5] = True  # top row: columns 2..4, centre x = 3.5
    mask[2:5, 1] = True  # left column: rows 2..4, centre y = 3.5
    mask[4, 6] = True  # bottom-right pixel
    assert extreme_keypoints(mask) == [3.5, 1.5, 2, 4.0, 4.5, 2, 1.5, 3.5, 2, 6.5, 4.5, 2]


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="canvas must be at least 64"):
        make_demo_data(tmp_path, canvas=32)
    with pytest.raises(UserError, match="train_images must be"):
        make_demo_data(tmp_path, train_images=0)
    with pytest.raises(UserError, match="Fashion-MNIST not found"):
        make_demo_data(tmp_path, fashion_mnist_dir=tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        make_demo_data(tmp_path / "file")
