"""Detection transforms: a flipped sample's boxes, masks and keypoints land where they must (hand-computed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from norton.detection.coco import CocoDetection
from norton.detection.transforms import (
    COCO_PERSON_FLIP_INDICES,
    RandomHorizontalFlip,
    eval_transforms,
    flip_keypoints,
    train_transforms,
)
from norton.errors import UserError


def _sample() -> tuple[tv_tensors.Image, dict]:
    """A 2x4 image (W = 4) with one box, its mask and three keypoints (left, right, middle; one unlabelled)."""
    image = tv_tensors.Image(torch.arange(24, dtype=torch.uint8).reshape(3, 2, 4))
    mask = torch.zeros(1, 2, 4, dtype=torch.uint8)
    mask[0, :, 0:2] = 1  # the two left columns
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), format="XYXY", canvas_size=(2, 4)),
        "masks": tv_tensors.Mask(mask),
        "keypoints": torch.tensor([[[0.5, 0.5, 2.0], [1.5, 1.5, 1.0], [0.0, 0.0, 0.0]]]),  # (K=1, P=3, 3)
        "labels": torch.tensor([1]),
    }
    return image, target


def test_flip_moves_everything_where_it_must() -> None:
    image, target = _sample()
    flipped_image, flipped = RandomHorizontalFlip(p=1.0, flip_indices=[1, 0, 2])(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert flipped["boxes"].tolist() == [[2.0, 0.0, 4.0, 2.0]]  # x -> 4 - x, then x0 < x1
    assert flipped["masks"][0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    # Point 0 (x 0.5) and point 1 (x 1.5) swap places and mirror: new 0 = old 1 at 4 - 1.5, new 1 = old 0 at 4 - 0.5;
    # the unlabelled point stays at (0, 0, 0) instead of moving to x = 4.
    assert flipped["keypoints"].tolist() == [[[2.5, 1.5, 1.0], [3.5, 0.5, 2.0], [0.0, 0.0, 0.0]]]
    assert flipped["labels"].tolist() == [1]
    assert target["keypoints"][0, 0].tolist() == [0.5, 0.5, 2.0]  # the input is left alone


def test_flip_keypoints_is_an_involution() -> None:
    points = torch.tensor([[[1.0, 2.0, 2.0], [3.0, 4.0, 2.0], [5.0, 6.0, 1.0]]])
    once = flip_keypoints(points, 10, [0, 2, 1])
    assert once.tolist() == [[[9.0, 2.0, 2.0], [5.0, 6.0, 1.0], [7.0, 4.0, 2.0]]]
    assert torch.equal(flip_keypoints(once, 10, [0, 2, 1]), points)


def test_probability_zero_changes_nothing() -> None:
    image, target = _sample()
    same_image, same = RandomHorizontalFlip(p=0.0, flip_indices=[1, 0, 2])(image, target)
    assert torch.equal(same_image, image) and torch.equal(same["boxes"], target["boxes"])


def test_train_transforms_flip_half_the_time_and_scale() -> None:
    torch.manual_seed(0)
    transform = train_transforms("keypoints", flip_indices=[1, 0, 2])
    flips = 0
    for _ in range(200):
        image, target = _sample()
        out_image, out = transform(image, target)
        assert out_image.dtype == torch.float32 and float(out_image.max()) == pytest.approx(23 / 255)
        assert out["masks"].dtype == torch.uint8 and out["boxes"].dtype == torch.float32
        flips += int(out["boxes"][0, 0] == 2.0)
    assert 70 < flips < 130


def test_eval_transforms_only_scale() -> None:
    image, target = _sample()
    out_image, out = eval_transforms()(image, target)
    torch.testing.assert_close(out_image, image.float() / 255)
    assert torch.equal(out["keypoints"], target["keypoints"]) and torch.equal(out["boxes"], target["boxes"])


def test_keypoint_flip_needs_matching_indices() -> None:
    image, target = _sample()
    with pytest.raises(UserError, match="flipping keypoints needs flip_indices"):
        RandomHorizontalFlip(p=1.0)(image, target)
    with pytest.raises(UserError, match="flip_indices lists 17 keypoints but the targets have 3"):
        train_transforms("keypoints", flip_p=1.0)(image, target)  # COCO's person map by default
    assert train_transforms("keypoints").transforms[0].flip_indices == COCO_PERSON_FLIP_INDICES


def test_flipped_dataset_sample(tmp_path: Path) -> None:
    """Through CocoDetection: a 32-pixel-wide image's box [2, 4, 10, 12] becomes [22, 4, 30, 12]."""
    from test_detection_coco import write_coco

    image_dir, annotation_file = write_coco(tmp_path, keypoints=True)
    plain = CocoDetection(image_dir, annotation_file, kind="keypoints")
    flipped = CocoDetection(image_dir, annotation_file, kind="keypoints",
                            transforms=train_transforms("keypoints", plain.flip_indices, flip_p=1.0))
    image, target = plain[0]
    flipped_image, flipped_target = flipped[0]
    assert torch.equal(flipped_image, image.flip(-1))
    assert flipped_target["boxes"].tolist() == [[22.0, 4.0, 30.0, 12.0], [6.0, 16.0, 16.0, 22.0]]
    # left_ear (3, 5) and right_ear (9, 5) swap and mirror: left_ear = 32 - 9, right_ear = 32 - 3; nose 32 - 6.
    assert flipped_target["keypoints"][0].tolist() == [[23.0, 5.0, 2.0], [29.0, 5.0, 2.0], [26.0, 11.0, 1.0]]
