"""COCO AP/AR: hand-made ground truth and detections with known answers, equal to pycocotools run directly."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from norton.detection.coco import CocoDetection, detection_loader
from norton.detection.evaluate import (
    STAT_NAMES,
    coco_metrics,
    evaluate_detector,
    format_metrics,
    oks_sigmas,
    to_coco_results,
)
from norton.errors import UserError

# Two 40x40 images; image 1 holds objects 1 (cat) and 2 (cat), image 2 holds object 3 (dog).
BOXES = {1: [2, 2, 10, 10], 2: [20, 20, 12, 12], 3: [5, 10, 20, 16]}  # xywh
OBJECTS = {1: (1, 7), 2: (1, 7), 3: (2, 9)}  # annotation id -> (image id, category id)


def _mask(box: list[int]) -> np.ndarray:
    x, y, w, h = box
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [40, 40], "counts": rle["counts"].decode("ascii")}


def _keypoints(box: list[int]) -> list[float]:
    x, y, w, h = box
    return [x + 1, y + 1, 2, x + w - 1, y + h - 1, 2]


def ground_truth() -> dict[str, Any]:
    annotations = [{"id": i, "image_id": OBJECTS[i][0], "category_id": OBJECTS[i][1], "bbox": box,
                    "area": box[2] * box[3], "iscrowd": 0, "segmentation": _rle(_mask(box)),
                    "keypoints": _keypoints(box), "num_keypoints": 2} for i, box in BOXES.items()]
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 40} for i in (1, 2)],
            "annotations": annotations,
            "categories": [{"id": 7, "name": "cat", "keypoints": ["left", "right"]},
                           {"id": 9, "name": "dog", "keypoints": ["left", "right"]}]}


def coco_gt() -> COCO:
    coco = COCO()
    coco.dataset = ground_truth()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def perfect(iou_type: str, ids: tuple[int, ...] = (1, 2, 3)) -> list[dict[str, Any]]:
    geometry = {"bbox": lambda b: BOXES[b], "segm": lambda b: _rle(_mask(BOXES[b])),
                "keypoints": lambda b: _keypoints(BOXES[b])}[iou_type]
    key = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    return [{"image_id": OBJECTS[i][0], "category_id": OBJECTS[i][1], "score": 1.0, key: geometry(i)} for i in ids]


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_perfect_detections_score_100(iou_type: str) -> None:
    metrics = coco_metrics(coco_gt(), perfect(iou_type), iou_type)
    assert list(metrics) == list(STAT_NAMES[iou_type])
    main = ("AP", "AP50", "AP75", "AR100") if iou_type != "keypoints" else ("AP", "AP50", "AP75", "AR", "AR50")
    for name in main:
        assert metrics[name] == pytest.approx(100.0), name


def test_one_of_two_found_known_ap_and_ar() -> None:
    """Only cat 1 of cats {1, 2} found: precision 1 up to recall 0.5, then nothing.

    COCO's AP interpolates precision at 101 recall points 0, 0.01, ..., 1: 51 of them (<= 0.5) see
    precision 1, so the cat's AP is 51/101; the dog is found, AP 1. AP = mean = (51/101 + 1) / 2.
    AR100 = (0.5 + 1) / 2.
    """
    metrics = coco_metrics(coco_gt(), perfect("bbox", (1, 3)), "bbox")
    assert metrics["AP"] == pytest.approx(100 * (51 / 101 + 1) / 2)
    assert metrics["AR100"] == pytest.approx(75.0) and metrics["AR1"] == pytest.approx(75.0)


def test_iou_062_counts_for_ap50_not_ap75() -> None:
    """Each detection covers 62% of its box's height (IoU 0.62): matched at IoU 0.50, 0.55, 0.60 of ten thresholds."""
    detections = perfect("bbox")
    for det in detections:
        x, y, w, h = det["bbox"]
        det["bbox"] = [x, y, w, h * 0.62]
    metrics = coco_metrics(coco_gt(), detections, "bbox")
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(30.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_equals_pycocotools_run_directly(iou_type: str) -> None:
    rng = np.random.default_rng(0)
    detections = perfect(iou_type) * 2
    for det in detections:  # jitter every geometry and score: a result with no round answer
        det["score"] = float(rng.uniform(0.1, 1.0))
        if iou_type == "bbox":
            det["bbox"] = [v + float(rng.normal(0, 1.5)) for v in det["bbox"]]
        elif iou_type == "keypoints":
            det["keypoints"] = [v + float(rng.normal(0, 1.0)) if i % 3 != 2 else v
                                for i, v in enumerate(det["keypoints"])]
        else:
            x, y, w, h = BOXES[[i for i in BOXES if OBJECTS[i][0] == det["image_id"]][0]]
            det["segmentation"] = _rle(_mask([x + int(rng.integers(0, 3)), y, w, h - int(rng.integers(0, 4))]))
    ours = coco_metrics(coco_gt(), detections, iou_type)
    gt = coco_gt()
    with contextlib.redirect_stdout(io.StringIO()):
        direct = COCOeval(gt, gt.loadRes(json.loads(json.dumps(detections))), iou_type)
        if iou_type == "keypoints":
            direct.params.kpt_oks_sigmas = np.full(2, 0.0669)  # COCO's mean sigma, for a 2-keypoint schema
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    expected = [100 * s if s >= 0 else -1.0 for s in direct.stats]
    assert list(ours.values()) == pytest.approx(expected, abs=0.05)
    assert 0 < ours["AP"] < 100


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_no_detections_score_zero(iou_type: str) -> None:
    metrics = coco_metrics(coco_gt(), [], iou_type)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


def test_missing_ground_truth_sizes_are_minus_one() -> None:
    metrics = coco_metrics(coco_gt(), perfect("bbox"), "bbox")
    assert metrics["APl"] == -1.0  # no object above 96x96 pixels: pycocotools' "nothing to score"


def test_quiet_unless_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    coco_metrics(coco_gt(), perfect("bbox"), "bbox")
    assert capsys.readouterr().out == ""
    coco_metrics(coco_gt(), perfect("bbox"), "bbox", verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_bad_detections() -> None:
    with pytest.raises(UserError, match="iou_type must be one of"):
        coco_metrics(coco_gt(), [], "boxes")
    with pytest.raises(UserError, match="detection 0 lacks score"):
        coco_metrics(coco_gt(), [{"image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2]}], "bbox")
    with pytest.raises(UserError, match="names image 5"):
        coco_metrics(coco_gt(), [{"image_id": 5, "category_id": 7, "bbox": [1, 1, 2, 2], "score": 1}], "bbox")


def test_oks_sigmas() -> None:
    assert oks_sigmas(coco_gt()) == pytest.approx([0.0669] * 2, abs=1e-4)
    coco = coco_gt()
    coco.dataset["categories"][0]["sigmas"] = [0.1, 0.2]
    assert oks_sigmas(coco) == [0.1, 0.2]


def test_to_coco_results() -> None:
    masks = torch.zeros(1, 1, 4, 6)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[0, 0, 0, 0] = 0.4  # below the 0.5 threshold
    output = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0]]), "labels": torch.tensor([2]),
              "scores": torch.tensor([0.75]), "masks": masks,
              "keypoints": torch.tensor([[[2.0, 1.0, 1.0], [4.0, 2.0, 1.0]]])}
    results = to_coco_results(output, 3, [0, 7, 9])
    assert results["bbox"] == [{"image_id": 3, "category_id": 9, "score": 0.75, "bbox": [2.0, 1.0, 3.0, 2.0]}]
    decoded = mask_utils.decode({**results["segm"][0]["segmentation"], "counts":
                                 results["segm"][0]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded, (masks[0, 0] > 0.5).numpy().astype(np.uint8))
    assert results["keypoints"][0]["keypoints"] == [2.0, 1.0, 1.0, 4.0, 2.0, 1.0]
    scaled = to_coco_results(output, 3, [0, 7, 9], scale=(2.0, 3.0), original_size=(12, 12))
    assert scaled["bbox"][0]["bbox"] == [4.0, 3.0, 6.0, 6.0]
    assert scaled["segm"][0]["segmentation"]["size"] == [12, 12]


class ReplayDetector(nn.Module):
    """Returns, for each image, the ground truth of the dataset as detections (labels already contiguous)."""

    def __init__(self, dataset: CocoDetection) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.dataset, self.calls, self.seen_modes = dataset, 0, []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.seen_modes.append(self.training)
        outputs = []
        for _ in images:
            _, target = self.dataset[self.calls]
            self.calls += 1
            count = len(target["boxes"])
            outputs.append({"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(count),
                            "masks": target["masks"][:, None].float(), "keypoints": target["keypoints"],
                            "keypoints_scores": torch.ones(count, 2)})
        return outputs


def test_evaluate_detector_on_a_dataset(tmp_path: Path) -> None:
    from PIL import Image

    data = ground_truth()
    for info in data["images"]:
        Image.new("RGB", (40, 40)).save(tmp_path / info["file_name"])
    (tmp_path / "gt.json").write_text(json.dumps(data))
    masks = CocoDetection(tmp_path, tmp_path / "gt.json", kind="masks")
    keypoints = CocoDetection(tmp_path, tmp_path / "gt.json", kind="keypoints")

    class Both(torch.utils.data.Dataset):  # masks and keypoints in one target, as the replay needs
        coco, category_ids = masks.coco, masks.category_ids

        def __len__(self) -> int:
            return len(masks)

        def __getitem__(self, i: int) -> Any:
            image, target = masks[i]
            return image, {**target, "keypoints": keypoints[i][1]["keypoints"]}

    dataset = Both()
    model = ReplayDetector(dataset).train()
    metrics = evaluate_detector(model, detection_loader(dataset, batch_size=2, train=False), progress=False)
    assert set(metrics) == {"bbox", "segm", "keypoints"}
    assert metrics["bbox"]["AP"] == metrics["segm"]["AP"] == metrics["keypoints"]["AP"] == pytest.approx(100.0)
    assert model.seen_modes == [False] and model.training  # evaluated in eval mode, mode restored
    with pytest.raises(UserError, match="needs a loader over a norton.detection.coco.CocoDetection"):
        evaluate_detector(model, [([torch.zeros(3, 4, 4)], [{}])])


def test_format_metrics_is_the_readme_table() -> None:
    metrics = {"bbox": coco_metrics(coco_gt(), perfect("bbox", (1, 3)), "bbox"),
               "keypoints": coco_metrics(coco_gt(), perfect("keypoints"), "keypoints")}
    table = format_metrics(metrics, extra={"MACs": "1.2G"}).splitlines()
    assert table[0].split("|")[1:-1] == [f" {c:<9} " if i == 0 else f" {c:>6} " for i, c in
                                         enumerate(["", "AP", "AP50", "AP75", "AR1", "AR10", "AR100", "MACs"])]
    boxes = [c.strip() for c in table[2].split("|")[1:-1]]
    assert boxes == ["boxes", "75.2", "75.2", "75.2", "75.0", "75.0", "75.0", "1.2G"]
    assert [c.strip() for c in table[3].split("|")[1:-1]][1:7] == ["AP", "AP50", "AP75", "AR", "AR50", "AR75"]
    assert table[4].split("|")[1].strip() == "keypoints" and "100.0" in table[4]
    only_keypoints = format_metrics({"keypoints": metrics["keypoints"]}).splitlines()
    assert "AR50" in only_keypoints[0] and len(only_keypoints) == 3
    assert "-" in format_metrics({"bbox": {**metrics["bbox"], "AP75": -1.0}}).splitlines()[2].split("|")[4]
