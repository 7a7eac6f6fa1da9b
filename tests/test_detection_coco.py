"""COCO reading: every annotation kind on tiny datasets written here, each bad input, the grouped sampler,
and Debian's labelme-examples (real photographs) against pycocotools' own decoding."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from norton.detection.coco import (
    CocoDetection,
    GroupedBatchSampler,
    aspect_ratio_groups,
    coco_datasets,
    collate,
    detection_loader,
    keypoint_flip_indices,
)
from norton.detection.transforms import COCO_PERSON_FLIP_INDICES
from norton.errors import UserError

LABELME = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's list-of-runs RLE (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _square(y0: int, y1: int, x0: int, x1: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def write_coco(folder: Path, *, annotations: list[dict] | None = None, images: list[dict] | None = None,
               keypoints: bool = False) -> tuple[Path, Path]:
    """Three 32x32 images (the third without annotations) and a COCO json with polygon, compressed RLE,
    list RLE and crowd annotations; categories 5 ("cat") and 12 ("dog"); ``keypoints`` adds a 3-point schema."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = images or [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in (1, 2, 3)]
    rng = np.random.default_rng(0)
    for info in images:
        Image.fromarray(rng.integers(0, 256, (info["height"], info["width"], 3), dtype=np.uint8)).save(
            image_dir / info["file_name"])
    if annotations is None:
        annotations = [
            {"id": 10, "image_id": 1, "category_id": 5, "bbox": [2, 4, 8, 8], "area": 64, "iscrowd": 0,
             "segmentation": [[2, 4, 10, 4, 10, 12, 2, 12]],
             "keypoints": [3, 5, 2, 9, 5, 2, 6, 11, 1]},
            {"id": 11, "image_id": 1, "category_id": 12, "bbox": [16, 16, 10, 6], "area": 60, "iscrowd": 0,
             "segmentation": _rle(_square(16, 22, 16, 26)), "keypoints": [17, 17, 2, 25, 17, 2, 0, 0, 0]},
            {"id": 12, "image_id": 2, "category_id": 12, "bbox": [0, 0, 5, 7], "area": 35, "iscrowd": 0,
             "segmentation": _uncompressed_rle(_square(0, 7, 0, 5)), "keypoints": [1, 1, 2, 4, 1, 2, 2, 6, 2]},
            {"id": 13, "image_id": 2, "category_id": 5, "bbox": [20, 20, 12, 12], "area": 144, "iscrowd": 1,
             "segmentation": _uncompressed_rle(_square(20, 32, 20, 32)), "keypoints": [0] * 9},
        ]
    categories = [{"id": 12, "name": "dog"}, {"id": 5, "name": "cat"}]
    if keypoints:
        for category in categories:
            category["keypoints"] = ["left_ear", "right_ear", "nose"]
    annotation_file = folder / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, annotation_file


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path]:
    return write_coco(tmp_path, keypoints=True)


def test_boxes_labels_and_image(coco: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*coco)
    assert len(dataset) == 2 and dataset.skipped["images without annotations"] == 1
    assert dataset.num_classes == 3 and dataset.category_names == ["__background__", "cat", "dog"]
    assert dataset.category_ids == [0, 5, 12]  # label -> COCO id, for writing results back
    image, target = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    raw = torch.from_numpy(np.array(Image.open(coco[0] / "1.png"))).permute(2, 0, 1)
    torch.testing.assert_close(image, raw.float() / 255)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 4, 10, 12], [16, 16, 26, 22]]))
    assert target["labels"].tolist() == [1, 2] and target["image_id"] == 1
    assert target["iscrowd"].tolist() == [0, 0] and target["area"].tolist() == [64, 60]
    assert type(target["boxes"]) is torch.Tensor  # plain tensors, not tv_tensors


def test_polygon_and_rle_masks(coco: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*coco, kind="masks")
    _, first = dataset[0]
    _, second = dataset[1]
    assert first["masks"].shape == (2, 32, 32) and first["masks"].dtype == torch.uint8
    polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 4, 10, 4, 10, 12, 2, 12]], 32, 32)))
    assert np.array_equal(first["masks"][0].numpy(), polygon)
    assert np.array_equal(first["masks"][1].numpy(), _square(16, 22, 16, 26))  # compressed RLE, exact
    assert np.array_equal(second["masks"][0].numpy(), _square(0, 7, 0, 5))  # list RLE, exact
    assert second["masks"].shape == (1, 32, 32)  # the crowd region is not a target


def test_crowd_regions(coco: tuple[Path, Path]) -> None:
    dropped = CocoDetection(*coco, kind="masks")
    kept = CocoDetection(*coco, kind="masks", keep_crowd=True)
    assert dropped[1][1]["iscrowd"].tolist() == [0]
    _, target = kept[1]
    assert target["iscrowd"].tolist() == [0, 1]
    assert np.array_equal(target["masks"][1].numpy(), _square(20, 32, 20, 32))
    assert dropped.coco.anns[13]["iscrowd"] == 1  # the ground truth keeps it, for COCOeval to ignore


def test_keypoints(coco: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*coco, kind="keypoints")
    assert dataset.num_keypoints == 3 and dataset.flip_indices == [1, 0, 2]
    _, target = dataset[0]
    assert target["keypoints"].shape == (2, 3, 3)
    assert target["keypoints"][0].tolist() == [[3, 5, 2], [9, 5, 2], [6, 11, 1]]
    assert target["keypoints"][1, 2].tolist() == [0, 0, 0]
    assert dataset.coco.anns[11]["num_keypoints"] == 2  # filled in for COCOeval


def test_keypoint_flip_indices_from_names() -> None:
    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle"]
    assert keypoint_flip_indices(names) == COCO_PERSON_FLIP_INDICES
    assert keypoint_flip_indices(["top", "bottom", "left", "right"]) == [0, 1, 3, 2]


def test_empty_images_kept_for_evaluation(coco: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*coco, kind="masks", skip_empty=False)
    assert len(dataset) == 3 and not dataset.skipped
    _, target = dataset[2]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 32, 32) and target["labels"].shape == (0,)


def test_degenerate_boxes_skipped_with_a_count(tmp_path: Path) -> None:
    annotations = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4]},
                   {"id": 2, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0, 3]},
                   {"id": 3, "image_id": 2, "category_id": 5, "bbox": [5, 5, 3, -1]}]
    dataset = CocoDetection(*write_coco(tmp_path, annotations=annotations))
    assert dataset.skipped["boxes of non-positive size"] == 2
    assert len(dataset) == 1 and dataset[0][1]["boxes"].shape == (1, 4)


def test_box_within_tolerance_is_clamped(tmp_path: Path) -> None:
    annotations = [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [-0.5, 2, 32.8, 4]}]
    _, target = CocoDetection(*write_coco(tmp_path, annotations=annotations))[0]
    assert target["boxes"].tolist() == [[0, 2, 32, 6]]


@pytest.mark.parametrize(("annotation", "kind", "message"), [
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [20, 20, 20, 5]}, "boxes", "annotation 7: box"),
    ({"id": 7, "image_id": 9, "category_id": 5, "bbox": [1, 1, 2, 2]}, "boxes", "annotation 7 names image 9"),
    ({"id": 7, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]}, "boxes", "annotation 7 names category 99"),
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2]}, "boxes", "annotation 7 needs 'bbox'"),
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2]}, "masks", "annotation 7 needs a mask"),
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "segmentation": [[1, 2, 3, 4]]},
     "masks", "annotation 7 needs a mask"),
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2],
      "segmentation": {"size": [16, 16], "counts": "abc"}}, "masks", "annotation 7: RLE mask"),
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "keypoints": [1, 2, 2]},
     "keypoints", "annotation 7 needs 'keypoints': 9 numbers"),
    ({"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "keypoints": [1, 2, 3] * 3},
     "keypoints", "annotation 7: keypoint visibility"),
])
def test_bad_annotations_name_file_and_id(tmp_path: Path, annotation: dict, kind: str, message: str) -> None:
    image_dir, annotation_file = write_coco(tmp_path, annotations=[annotation], keypoints=True)
    with pytest.raises(UserError, match=message) as error:
        CocoDetection(image_dir, annotation_file, kind=kind)
    assert str(annotation_file) in str(error.value) and "\n" not in str(error.value)


def test_malformed_json(tmp_path: Path) -> None:
    image_dir, annotation_file = write_coco(tmp_path)
    annotation_file.write_text('{"images": [], "annotations": [')
    with pytest.raises(UserError, match=rf"{annotation_file} is not valid JSON \(line 1"):
        CocoDetection(image_dir, annotation_file)
    annotation_file.write_text('{"images": []}')
    with pytest.raises(UserError, match="needs the lists 'images', 'annotations' and 'categories'"):
        CocoDetection(image_dir, annotation_file)
    with pytest.raises(UserError, match="cannot read COCO annotation file"):
        CocoDetection(image_dir, tmp_path / "absent.json")


def test_missing_image_and_wrong_size(coco: tuple[Path, Path]) -> None:
    image_dir, annotation_file = coco
    (image_dir / "2.png").unlink()
    with pytest.raises(UserError, match=r"image .*2\.png listed in .*annotations\.json is missing"):
        CocoDetection(image_dir, annotation_file)
    Image.new("RGB", (20, 32)).save(image_dir / "2.png")
    dataset = CocoDetection(image_dir, annotation_file)  # sizes are checked when an image is read
    with pytest.raises(UserError, match=r"2\.png is 20x32 but .* says 32x32"):
        dataset[1]


def test_bad_kind_and_no_keypoint_category(tmp_path: Path) -> None:
    image_dir, annotation_file = write_coco(tmp_path)
    with pytest.raises(UserError, match="kind must be one of"):
        CocoDetection(image_dir, annotation_file, kind="poses")
    with pytest.raises(UserError, match="no category lists 'keypoints'"):
        CocoDetection(image_dir, annotation_file, kind="keypoints")


def test_background_category_gets_no_label(tmp_path: Path) -> None:
    image_dir, annotation_file = write_coco(tmp_path)
    data = json.loads(annotation_file.read_text())
    data["categories"].append({"id": 0, "name": "_background_"})
    annotation_file.write_text(json.dumps(data))
    assert CocoDetection(image_dir, annotation_file).category_names == ["__background__", "cat", "dog"]


def test_coco_datasets_layout(tmp_path: Path) -> None:
    for split in ("train", "val"):
        image_dir, annotation_file = write_coco(tmp_path / split, keypoints=True)
        image_dir.rename(tmp_path / f"{split}2017")
        (tmp_path / "annotations").mkdir(exist_ok=True)
        annotation_file.rename(tmp_path / "annotations" / f"instances_{split}2017.json")
    train, val = coco_datasets(tmp_path, kind="masks")
    assert len(train) == 2 and len(val) == 3  # training skips the image without annotations, validation keeps it
    with pytest.raises(UserError, match="person_keypoints_train2017.json not found"):
        coco_datasets(tmp_path, kind="keypoints")


# ------------------------------------------------------------------ batching
def test_grouped_batch_sampler_groups_and_covers() -> None:
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]  # 5 portrait, 6 landscape
    sampler = GroupedBatchSampler(list(np.random.default_rng(0).permutation(len(groups))), groups, batch_size=2)
    batches = list(sampler)
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(groups)))
    assert len(batches) == len(sampler) == 3 + 3  # ceil(5 / 2) + ceil(6 / 2)
    assert sorted(len(batch) for batch in batches) == [1, 2, 2, 2, 2, 2]


def test_loader_groups_by_aspect_ratio_and_reshuffles(tmp_path: Path) -> None:
    shapes = [(32, 48), (48, 32), (32, 32), (48, 32), (32, 48), (32, 48), (48, 32), (32, 40)]  # (H, W)
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(shapes)]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 5, "bbox": [1, 1, 8, 8]} for i in range(len(shapes))]
    dataset = CocoDetection(*write_coco(tmp_path, annotations=annotations, images=images))
    assert aspect_ratio_groups(dataset) == [1, 0, 1, 0, 1, 1, 0, 1]
    assert aspect_ratio_groups(torch.utils.data.Subset(dataset, [1, 2])) == [0, 1]
    loader = detection_loader(dataset, batch_size=2, train=True, seed=3)
    epochs = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
        batches = [(tuple(i.shape[-1] >= i.shape[-2] for i in images), [t["image_id"] for t in targets])
                   for images, targets in loader]
        assert all(len(set(landscape)) == 1 for landscape, _ in batches)
        assert sorted(i for _, ids in batches for i in ids) == list(range(1, 9))
        epochs.append([ids for _, ids in batches])
    assert epochs[0] != epochs[1]
    loader.batch_sampler.set_epoch(0)  # type: ignore[union-attr]
    assert [[t["image_id"] for t in targets] for _, targets in loader] == epochs[0]  # same seed, same epoch
    evaluation = detection_loader(dataset, batch_size=3, train=False)
    assert [[t["image_id"] for t in targets] for _, targets in evaluation] == [[1, 2, 3], [4, 5, 6], [7, 8]]


def test_collate_keeps_lists() -> None:
    batch = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 5), {"a": 2})]
    images, targets = collate(batch)
    assert [i.shape[1] for i in images] == [4, 6] and targets == [{"a": 1}, {"a": 2}]


def test_loader_options_checked(coco: tuple[Path, Path]) -> None:
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        detection_loader(CocoDetection(*coco), batch_size=0, train=True)


# ------------------------------------------------------------------ labelme-examples (real photographs)
def _labelme() -> Path:
    annotation_file = LABELME / "annotations.json"
    if not annotation_file.is_file():
        pytest.fail(f"{annotation_file} is missing: apt-get install labelme-examples (scripts/setup.sh does)")
    return annotation_file


def test_labelme_examples_boxes_and_masks_match_pycocotools() -> None:
    annotation_file = _labelme()
    data = json.loads(annotation_file.read_text())
    dataset = CocoDetection(LABELME, annotation_file, kind="masks")
    assert len(dataset) == len(data["images"]) == 3
    assert dataset.num_classes == 21 and "person" in dataset.category_names  # 20 VOC classes, "_background_" dropped
    seen = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        info = dataset.coco.imgs[target["image_id"]]
        assert image.shape == (3, info["height"], info["width"])
        anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
        expected_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        torch.testing.assert_close(target["boxes"], expected_boxes.float())
        for ann, mask in zip(anns, target["masks"], strict=True):
            rles = mask_utils.frPyObjects(ann["segmentation"], info["height"], info["width"])
            expected = mask_utils.decode(mask_utils.merge(rles))
            assert np.array_equal(mask.numpy(), expected) and mask.sum() > 0
            seen += 1
        names = [dataset.category_names[label] for label in target["labels"].tolist()]
        categories = {c["id"]: c["name"] for c in data["categories"]}
        assert names == [categories[a["category_id"]] for a in anns]
    assert seen == len(data["annotations"]) == 12
