"""COCO AP and AR of a detector: boxes (``bbox``), masks (``segm``) and keypoints, computed by pycocotools.

:func:`evaluate_detector` runs a detector over a loader of a
:class:`~norton.detection.coco.CocoDetection`, turns its outputs into COCO results
(:func:`to_coco_results`: xywh boxes, COCO category ids, masks thresholded at 0.5 and
RLE-encoded, keypoints) and scores them against the dataset's ground truth with
:func:`coco_metrics` (pycocotools' ``COCOeval``, prints silenced). Metrics are percentages;
``-1`` where pycocotools has no ground truth to score (e.g. ``APs`` without small objects).
:func:`format_metrics` prints the NORTON README's table.
"""
from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from norton.errors import UserError

IOU_TYPES = ("bbox", "segm", "keypoints")
# pycocotools' ``COCOeval.stats`` in order, for each iou type.
STAT_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
}
# COCO's per-keypoint OKS sigmas (person: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles).
COCO_PERSON_SIGMAS = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]
COCO_PERSON_SIGMAS = [s / 10 for s in COCO_PERSON_SIGMAS]
MASK_THRESHOLD = 0.5
_GEOMETRY = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


def oks_sigmas(coco_gt: Any) -> list[float]:
    """OKS sigmas for the ground truth's keypoints: a category's own ``sigmas`` list if it has one (a norton
    extension of the format), COCO's for 17 keypoints, else COCO's mean sigma for every keypoint."""
    categories = [c for c in coco_gt.dataset.get("categories", []) if c.get("keypoints")]
    if not categories:
        raise UserError("keypoint AP needs a ground truth whose categories list 'keypoints' (person_keypoints_*.json)")
    count = len(categories[0]["keypoints"])
    own = categories[0].get("sigmas")
    if isinstance(own, list) and len(own) == count:
        return [float(s) for s in own]
    if count == len(COCO_PERSON_SIGMAS):
        return list(COCO_PERSON_SIGMAS)
    return [sum(COCO_PERSON_SIGMAS) / len(COCO_PERSON_SIGMAS)] * count


def _check_detections(detections: Sequence[Mapping[str, Any]], iou_type: str, image_ids: set[int]) -> None:
    geometry = _GEOMETRY[iou_type]
    for i, det in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "score", geometry) if k not in det]
        if missing:
            raise UserError(f"detection {i} lacks {', '.join(missing)}: COCO {iou_type} results need image_id, "
                            f"category_id, score and {geometry}")
        if det["image_id"] not in image_ids:
            raise UserError(f"detection {i} names image {det['image_id']!r}, which the ground truth does not list")


def _results(coco_gt: Any, detections: Sequence[Mapping[str, Any]]) -> Any:
    """pycocotools results object; with no detections an empty one (``loadRes`` cannot take [])."""
    if detections:
        return coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys: copy
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


def coco_metrics(coco_gt: Any, detections: Sequence[Mapping[str, Any]], iou_type: str, *,
                 image_ids: Iterable[int] | None = None, verbose: bool = False) -> dict[str, float]:
    """AP/AR (percent) of COCO-format ``detections`` against ``coco_gt`` (a pycocotools ``COCO``).

    ``detections``: ``{"image_id", "category_id", "score"}`` plus ``bbox`` (xywh), ``segmentation``
    (RLE) or ``keypoints`` (``3 P`` numbers) for ``iou_type`` ``"bbox"``, ``"segm"`` or ``"keypoints"``.
    ``image_ids``: the images scored (default: every image of ``coco_gt``); no detections scores 0.
    ``verbose``: let pycocotools print its summary.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    _check_detections(detections, iou_type, set(coco_gt.getImgIds()))
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        evaluator = COCOeval(coco_gt, _results(coco_gt, detections), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        if iou_type == "keypoints":
            evaluator.params.kpt_oks_sigmas = np.array(oks_sigmas(coco_gt))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(100 * value) if value >= 0 else -1.0
            for name, value in zip(STAT_NAMES[iou_type], evaluator.stats, strict=True)}


def to_coco_results(output: Mapping[str, Tensor], image_id: int, category_ids: Sequence[int], *,
                    scale: tuple[float, float] = (1.0, 1.0),
                    original_size: tuple[int, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """One image's detector output -> COCO results per iou type (``{"bbox": [...], "segm": [...], ...}``).

    ``output``: ``boxes`` (D, 4) xyxy, ``labels`` (D,), ``scores`` (D,), optionally ``masks``
    (D, 1, H, W) probabilities and ``keypoints`` (D, P, 3). ``category_ids[label]`` is the COCO id.
    ``scale`` = (x, y) factors back to the json's image size, ``original_size`` = its (H, W)
    (only when the transforms resized the image).
    """
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu() * torch.tensor([*scale, *scale])  # (D, 4) xyxy
    boxes[:, 2:] -= boxes[:, :2]  # xywh
    ids = torch.as_tensor(category_ids)[output["labels"].cpu()].tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    base = [{"image_id": image_id, "category_id": c, "score": s} for c, s in zip(ids, scores, strict=True)]
    results = {"bbox": [{**b, "bbox": box} for b, box in zip(base, boxes.tolist(), strict=True)]}
    if "masks" in output:
        masks = output["masks"].detach().float().cpu()  # (D, 1, H, W)
        if original_size is not None and tuple(masks.shape[-2:]) != tuple(original_size):
            masks = nn.functional.interpolate(masks, size=original_size, mode="bilinear", align_corners=False)
        binary = (masks[:, 0] > MASK_THRESHOLD).numpy().astype(np.uint8)  # (D, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # one RLE per detection
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")  # bytes -> str, as COCO json holds it
        results["segm"] = [{**b, "segmentation": rle} for b, rle in zip(base, rles, strict=True)]
    if "keypoints" in output:
        points = output["keypoints"].detach().float().cpu().clone()  # (D, P, 3)
        points[..., 0] *= scale[0]
        points[..., 1] *= scale[1]
        results["keypoints"] = [{**b, "keypoints": p} for b, p in zip(base, points.flatten(1).tolist(), strict=True)]
    return results


def _coco_dataset(dataset: Any) -> Any:
    """The :class:`CocoDetection` under ``dataset`` (through ``Subset`` s)."""
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco") or not hasattr(dataset, "category_ids"):
        raise UserError("evaluate_detector needs a loader over a norton.detection.coco.CocoDetection "
                        f"(its ground truth and category ids), got {type(dataset).__name__}")
    return dataset


def _gather(results: dict[str, list[dict[str, Any]]], image_ids: list[int]) -> tuple[dict[str, list], list[int]]:
    """All ranks' results and image ids under ``torchrun`` (each rank saw its shard)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return results, image_ids
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (results, image_ids))
    merged: dict[str, list] = {t: [r for part, _ in gathered for r in part[t]] for t in results}
    return merged, [i for _, ids in gathered for i in ids]


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: Iterable[Any], *, progress: bool = True,
                      verbose: bool = False) -> dict[str, dict[str, float]]:
    """COCO AP/AR (percent) of ``model`` on ``loader`` (over a ``CocoDetection``), per iou type the model outputs.

    Returns ``{"bbox": {...}, "segm": {...} (masks), "keypoints": {...} (keypoints)}`` with
    :data:`STAT_NAMES` keys. The model runs in eval mode on its own device; its mode is restored.
    """
    from tqdm.auto import tqdm

    dataset = _coco_dataset(getattr(loader, "dataset", None))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in IOU_TYPES}
    image_ids: list[int] = []
    types = {"bbox"}
    show = progress and sys.stderr.isatty()
    try:
        for images, targets in tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, disable=not show):
            outputs = model([image.to(device) for image in images])
            for image, target, output in zip(images, targets, outputs, strict=True):
                image_id = int(target["image_id"])
                info = dataset.coco.imgs[image_id]
                height, width = image.shape[-2:]
                scale = (info["width"] / width, info["height"] / height)
                per_type = to_coco_results(output, image_id, dataset.category_ids, scale=scale,
                                           original_size=(info["height"], info["width"]))
                for iou_type, items in per_type.items():
                    types.add(iou_type)
                    results[iou_type].extend(items)
                image_ids.append(image_id)
    finally:
        model.train(was_training)
    results, image_ids = _gather(results, image_ids)
    if not image_ids:
        raise UserError("the evaluation loader yielded no images")
    return {t: coco_metrics(dataset.coco, results[t], t, image_ids=image_ids, verbose=verbose)
            for t in IOU_TYPES if t in types}


_ROWS = {"bbox": "boxes", "segm": "masks", "keypoints": "keypoints"}
_COLUMNS = {"bbox": ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"),
            "segm": ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"),
            "keypoints": ("AP", "AP50", "AP75", "AR", "AR50", "AR75")}


def format_metrics(metrics: Mapping[str, Mapping[str, float]], *, extra: Mapping[str, str] | None = None) -> str:
    """The NORTON README's table: boxes/masks AP, AP50, AP75, AR1, AR10, AR100; keypoints AP, AP50, AP75, AR,
    AR50, AR75 (under their own header row, as the README). Percentages; ``-`` where there is no ground truth.
    ``extra``: columns appended to every row (e.g. ``{"MACs": "4.1G", "Params": "11.2M"}``)."""
    extra = dict(extra or {})
    extra_names, extra_values = list(extra), list(extra.values())

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(f"{c:<9}" if i == 0 else f"{c:>6}" for i, c in enumerate(cells)) + " |"

    first = "keypoints" if set(metrics) & set(IOU_TYPES) == {"keypoints"} else "bbox"
    lines = [row(["", *_COLUMNS[first], *extra_names]),
             "|" + "|".join(["-" * 11] + ["-" * 8] * (6 + len(extra_names))) + "|"]
    for iou_type in IOU_TYPES:
        if iou_type not in metrics:
            continue
        if iou_type == "keypoints" and first != "keypoints":  # a second header under the boxes/masks rows
            lines.append(row(["", *_COLUMNS["keypoints"], *[""] * len(extra_names)]))
        values = metrics[iou_type]
        cells = [f"{values[k]:.1f}" if values.get(k, -1.0) >= 0 else "-" for k in _COLUMNS[iou_type]]
        lines.append(row([_ROWS[iou_type], *cells, *extra_values]))
    return "\n".join(lines)
