"""COCO-format detection data: boxes, polygon and RLE masks, crowd regions, keypoints.

:class:`CocoDetection` reads one image folder and one COCO annotation file (``instances_*.json``
or ``person_keypoints_*.json``) into torchvision's detection convention: an image ``(3, H, W)``
float in [0, 1] and a target dict (``boxes`` xyxy ``(K, 4)``, ``labels`` ``(K,)``, ``image_id``,
``area``, ``iscrowd``, ``masks`` uint8 ``(K, H, W)``, ``keypoints`` ``(K, P, 3)``).
:func:`coco_datasets` finds the torchvision references' layout (``train2017/``, ``val2017/``,
``annotations/instances_{train,val}2017.json``); :func:`detection_loader` batches with
aspect-ratio grouping (:class:`GroupedBatchSampler`).

What is refused, what is skipped (each as the torchvision detection reference does, where it does):

* refused with one line naming the file (and the annotation id): an unreadable or malformed json,
  an annotation whose image or category is not listed, a box crossing its image border by more
  than :data:`BOX_TOLERANCE` pixels (within it the box is clamped, as the reference clamps), a
  mask or keypoint list that is not COCO's shape, a missing image file, an image whose size
  differs from the json;
* skipped with a count in ``dataset.skipped``: boxes of non-positive width or height (the
  reference drops them after clamping), images without annotations when ``skip_empty`` (the
  reference does this for training only, so :func:`coco_datasets` skips on ``train2017`` only);
* crowd regions (``iscrowd=1``) are not training targets: the reference drops them from every
  target; they stay in ``dataset.coco``, the ground truth the evaluation reads, where COCOeval
  treats them as regions to ignore. ``keep_crowd=True`` keeps them in the targets with
  ``iscrowd=1`` (for drawing, or a model that handles them).

Category ids are mapped to contiguous labels ``1..C`` in increasing id order (0 is background);
``dataset.category_ids[label]`` turns a label back into the COCO id for results. A category
named ``background`` (any case, any underscores, as labelme writes ``_background_``) is the
background and gets no label.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from norton.errors import UserError
from norton.limits import check_loader_options

KINDS = ("boxes", "masks", "keypoints")
# Pixels a box may cross its image's border: annotation tools round, COCO has boxes ending at
# x = 640.01 on 640-pixel images. Within it the box is clamped; beyond it the file is wrong.
BOX_TOLERANCE = 1.0
Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


def read_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """A COCO annotation file as a dict, with ``images``, ``annotations`` and ``categories`` lists."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read COCO annotation file {path} ({error.strerror or error}); "
                        "check the path (the torchvision layout is root/annotations/instances_val2017.json)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"COCO annotation file {path} is not valid JSON (line {error.lineno}, column "
                        f"{error.colno}: {error.msg}); fix or replace the file") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO annotation file: it needs the lists 'images', 'annotations' "
                        "and 'categories'")
    return data


def _is_background(category: dict[str, Any]) -> bool:
    return str(category.get("name", "")).strip("_ ").lower() == "background"


def keypoint_flip_indices(names: Sequence[str]) -> list[int]:
    """Where each keypoint goes under a horizontal flip: ``left_eye`` <-> ``right_eye``, ``left`` <-> ``right``.

    COCO's 17 person keypoints give ``[0, 2, 1, 4, 3, ...]``; a name without a left/right partner stays.
    """
    position = {name: i for i, name in enumerate(names)}

    def partner(name: str) -> str:
        if "left" in name:
            return name.replace("left", "right")
        return name.replace("right", "left")

    return [position.get(partner(name), i) for i, name in enumerate(names)]


class CocoDetection(Dataset):
    """Images of ``image_dir`` with the annotations of ``annotation_file``, in torchvision's detection convention.

    ``kind``: ``"boxes"`` (Faster R-CNN), ``"masks"`` (Mask R-CNN: targets carry ``masks``) or
    ``"keypoints"`` (Keypoint R-CNN: only categories with keypoints, targets carry ``keypoints``).
    ``transforms(image, target)`` is a torchvision.transforms.v2 callable (default
    :func:`~norton.detection.transforms.eval_transforms`): it gets a uint8 ``tv_tensors.Image``,
    ``BoundingBoxes`` and ``Mask`` and plain ``keypoints`` ``(K, P, 3)``; targets come back as plain tensors.
    Everything in the json is checked here, before any image is read.
    """

    def __init__(self, image_dir: str | os.PathLike, annotation_file: str | os.PathLike, *,
                 transforms: Transforms | None = None, kind: str = "boxes", skip_empty: bool = True,
                 keep_crowd: bool = False, min_visible_keypoints: int = 1) -> None:
        if kind not in KINDS:
            raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.image_dir, self.annotation_file = Path(image_dir), Path(annotation_file)
        self.kind, self.keep_crowd = kind, keep_crowd
        if transforms is None:
            from norton.detection.transforms import eval_transforms

            transforms = eval_transforms()
        self.transforms = transforms
        data = read_coco_json(self.annotation_file)
        self._map_categories(data["categories"])
        images = self._check_images(data["images"])
        self.skipped: Counter[str] = Counter()
        self._targets: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:
            self._check_annotation(ann, images)
        self.coco = _coco_api(data)
        kept = sorted(images)
        if skip_empty:
            def has_targets(image_id: int) -> bool:
                anns = self._targets.get(image_id, [])
                if kind == "keypoints":  # the reference also drops persons-only images without keypoints
                    return sum(a["num_keypoints"] for a in anns) >= min_visible_keypoints
                return any(not a["iscrowd"] for a in anns)

            kept = [i for i in kept if has_targets(i)]
            if len(kept) < len(images):
                self.skipped["images without annotations"] = len(images) - len(kept)
        self.ids = kept
        self._check_files()

    # ------------------------------------------------------------------ checks
    def _map_categories(self, categories: list[Any]) -> None:
        where = self.annotation_file
        usable = []
        for category in categories:
            if not isinstance(category, dict) or not isinstance(category.get("id"), int):
                raise UserError(f"{where}: category {category!r} has no integer 'id'")
            if _is_background(category):
                continue
            if self.kind == "keypoints" and not category.get("keypoints"):
                continue
            usable.append(category)
        if not usable:
            hint = ("no category lists 'keypoints': use a person_keypoints_*.json file" if self.kind == "keypoints"
                    else "no categories besides the background")
            raise UserError(f"{where}: {hint}")
        usable.sort(key=lambda c: c["id"])
        self.category_ids: list[int] = [0] + [c["id"] for c in usable]  # label -> COCO id
        self.category_names: list[str] = ["__background__"] + [str(c.get("name", c["id"])) for c in usable]
        self.label_of: dict[int, int] = {cid: label for label, cid in enumerate(self.category_ids) if label}
        self.ignored_categories = {c["id"] for c in categories if isinstance(c, dict)} - set(self.label_of)
        self.num_classes = len(self.category_ids)
        self.keypoint_names: list[str] = []
        if self.kind == "keypoints":
            schemas = {tuple(c["keypoints"]) for c in usable}
            if len(schemas) > 1:
                raise UserError(f"{where}: categories list different keypoints ({len(schemas)} schemas); "
                                "a keypoint head predicts one set: keep one schema")
            self.keypoint_names = [str(name) for name in next(iter(schemas))]
        self.num_keypoints = len(self.keypoint_names)
        self.flip_indices: list[int] | None = (keypoint_flip_indices(self.keypoint_names)
                                               if self.keypoint_names else None)

    def _check_images(self, images: list[Any]) -> dict[int, dict[str, Any]]:
        checked = {}
        for info in images:
            ok = (isinstance(info, dict) and isinstance(info.get("id"), int) and isinstance(info.get("file_name"), str)
                  and all(isinstance(info.get(k), int) and info[k] > 0 for k in ("width", "height")))
            if not ok:
                raise UserError(f"{self.annotation_file}: image entry {str(info)[:120]} needs an integer 'id', "
                                "a 'file_name' and positive integer 'width' and 'height'")
            checked[info["id"]] = info
        return checked

    def _check_annotation(self, ann: Any, images: dict[int, dict[str, Any]]) -> None:
        where = f"{self.annotation_file}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            raise UserError(f"{where} has no integer 'id'")
        if ann.get("image_id") not in images:
            raise UserError(f"{where} names image {ann.get('image_id')!r}, which 'images' does not list")
        category = ann.get("category_id")
        if category not in self.label_of and category not in self.ignored_categories:
            raise UserError(f"{where} names category {category!r}, which 'categories' does not list")
        box = ann.get("bbox")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise UserError(f"{where} needs 'bbox': [x, y, width, height] (finite numbers), got {str(box)[:80]}")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(box[2] * box[3]))
        info = images[ann["image_id"]]
        x, y, w, h = box
        if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > info["width"] + BOX_TOLERANCE
                or y + h > info["height"] + BOX_TOLERANCE):
            raise UserError(f"{where}: box {box} lies outside its image {info['file_name']} "
                            f"({info['width']}x{info['height']}); fix the box or the image size")
        if self.kind == "keypoints" and category in self.label_of:
            ann["num_keypoints"] = self._check_keypoints(ann, where)
        if category not in self.label_of:
            return  # background or (for keypoints) a category without keypoints: not a target
        if self.kind == "masks":
            self._check_segmentation(ann.get("segmentation"), info, where)
        if w <= 0 or h <= 0:
            self.skipped["boxes of non-positive size"] += 1
            return
        if ann["iscrowd"] and not self.keep_crowd:
            return
        self._targets[ann["image_id"]].append(ann)

    def _check_keypoints(self, ann: dict[str, Any], where: str) -> int:
        points = ann.get("keypoints")
        n = self.num_keypoints
        if (not isinstance(points, list) or len(points) != 3 * n
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in points)):
            raise UserError(f"{where} needs 'keypoints': {3 * n} numbers (x, y, visibility for each of "
                            f"{n} keypoints), got {len(points) if isinstance(points, list) else points!r}")
        visibility = points[2::3]
        if any(v not in (0, 1, 2) for v in visibility):
            raise UserError(f"{where}: keypoint visibility must be 0, 1 or 2, got {sorted(set(visibility))}")
        return sum(v > 0 for v in visibility)

    @staticmethod
    def _check_segmentation(segmentation: Any, info: dict[str, Any], where: str) -> None:
        if isinstance(segmentation, dict):  # RLE: counts (list or compressed string) and [height, width]
            size = segmentation.get("size")
            if not isinstance(segmentation.get("counts"), (list, str)) or size != [info["height"], info["width"]]:
                raise UserError(f"{where}: RLE mask needs 'counts' and 'size' [{info['height']}, {info['width']}], "
                                f"got size {size}")
            return
        polygons_ok = isinstance(segmentation, list) and segmentation and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation)
        if not polygons_ok:
            raise UserError(f"{where} needs a mask: 'segmentation' as polygons [[x1, y1, x2, y2, x3, y3, ...]] "
                            f"or RLE {{'counts', 'size'}}, got {str(segmentation)[:80]}")

    def _check_files(self) -> None:
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"image {self.image_dir / missing[0]}{more} listed in {self.annotation_file} is "
                            "missing; pass the folder holding the images")

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratio(self, index: int) -> float:
        """Width / height of image ``index``, from the json (no image is read)."""
        info = self.coco.imgs[self.ids[index]]
        return info["width"] / info["height"]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        from PIL import Image
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as handle:
                pil = handle.convert("RGB")
        except OSError as error:
            raise UserError(f"cannot read image {path} ({error}); replace the file") from None
        height, width = info["height"], info["width"]
        if pil.size != (width, height):
            raise UserError(f"image {path} is {pil.width}x{pil.height} but {self.annotation_file} says "
                            f"{width}x{height}; the annotations belong to other images")
        anns = self._targets.get(image_id, [])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (K, 4) xywh
        boxes[:, 2:] += boxes[:, :2]  # xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a["iscrowd"]) for a in anns], dtype=torch.int64),
        }
        if self.kind == "masks":
            target["masks"] = tv_tensors.Mask(self.masks(anns, height, width))
        if self.kind == "keypoints":
            points = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32)
            target["keypoints"] = points.reshape(len(anns), self.num_keypoints, 3)  # (K, P, 3): x, y, visibility
        image, target = self.transforms(tv_tensors.Image(pil_to_tensor(pil)), target)
        plain = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
        return image.as_subclass(Tensor), plain

    def masks(self, anns: Sequence[dict[str, Any]], height: int, width: int) -> Tensor:
        """uint8 ``(K, H, W)`` masks of ``anns`` (polygons, list RLE or compressed RLE), decoded by pycocotools."""
        from pycocotools import mask as mask_utils

        if not anns:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        rles = [self.coco.annToRLE(a) for a in anns]
        return torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).contiguous()  # (H, W, K) -> (K, H, W)


def _coco_api(data: dict[str, Any]) -> Any:
    """pycocotools' ``COCO`` over an already-read dict (no second parse, no prints)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_datasets(root: str | os.PathLike, *, kind: str = "boxes", train_transforms: Transforms | None = None,
                  val_transforms: Transforms | None = None, year: int = 2017) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)`` from the torchvision references' layout under ``root``.

    ``root/train2017/``, ``root/val2017/``, ``root/annotations/instances_{train,val}2017.json``
    (``person_keypoints_*`` for ``kind="keypoints"``). Training skips images without
    annotations (counted in ``train.skipped``); validation keeps every image, as the reference.
    The default training transforms flip horizontally (keypoints swapped by the file's left/right names).
    """
    from norton.detection import transforms as detection_transforms

    root = Path(root)
    prefix = "person_keypoints" if kind == "keypoints" else "instances"
    datasets = []
    for split, transforms in (("train", train_transforms), ("val", val_transforms)):
        annotation_file = root / "annotations" / f"{prefix}_{split}{year}.json"
        if not annotation_file.is_file():
            raise UserError(f"{annotation_file} not found: {root} needs the COCO layout train{year}/, val{year}/, "
                            f"annotations/{prefix}_{{train,val}}{year}.json (norton detect make-demo-data writes one)")
        dataset = CocoDetection(root / f"{split}{year}", annotation_file, kind=kind, transforms=transforms,
                                skip_empty=split == "train")
        if split == "train" and transforms is None:
            dataset.transforms = detection_transforms.train_transforms(kind, flip_indices=dataset.flip_indices)
        datasets.append(dataset)
    return datasets[0], datasets[1]


# ---------------------------------------------------------------------- batching
def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Samples -> ``(images, targets)`` lists: detection images differ in size, so nothing is stacked."""
    return [image for image, _ in batch], [target for _, target in batch]


def aspect_ratio_groups(dataset: Dataset) -> list[int]:
    """Group of each sample: 1 when width >= height (landscape or square), 0 otherwise.

    Read from the json for :class:`CocoDetection` (and ``Subset`` s of it); other datasets load each image.
    """
    if isinstance(dataset, CocoDetection):
        return [int(dataset.aspect_ratio(i) >= 1) for i in range(len(dataset))]
    if isinstance(dataset, Subset):
        inner = aspect_ratio_groups(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    groups = []
    for i in range(len(dataset)):  # type: ignore[arg-type]  # map-style datasets have a length
        height, width = dataset[i][0].shape[-2:]
        groups.append(int(width >= height))
    return groups


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices from ``sampler``, each batch within one group.

    Images of similar aspect ratio padded together waste less (the detector pads a batch to its
    largest image). Indices are taken in the sampler's order and a batch is emitted as soon as its
    group has ``batch_size``; at the end each group's remainder is one short batch, so every index
    comes exactly once per epoch (the torchvision reference instead tops remainders up with repeats).
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        check_loader_options(batch_size=batch_size)
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer.copy()
                buffer.clear()
        for group in sorted(buffers):
            if buffers[group]:
                yield buffers[group]

    def __len__(self) -> int:
        counts = Counter(self.group_ids[index] for index in self.sampler)
        return sum(-(-count // self.batch_size) for count in counts.values())

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the order is seeded by ``(seed, epoch)``, so a resumed run repeats it)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def detection_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                     aspect_ratio_group: bool = True, seed: int = 0) -> DataLoader:
    """A loader of ``(images, targets)`` lists; sharded over ranks under ``torchrun``.

    Training: a permutation seeded by ``(seed, epoch)`` (call ``loader.batch_sampler.set_epoch(epoch)``
    with grouping, ``loader.sampler.set_epoch`` without), grouped by aspect ratio unless
    ``aspect_ratio_group=False``. Evaluation: dataset order, every image exactly once over the ranks.
    """
    from torch.utils.data import BatchSampler

    from norton.training.distributed import rank_and_world
    from norton.training.loaders import ShardSampler

    check_loader_options(batch_size=batch_size, workers=workers)
    rank, world = rank_and_world()
    if not train:
        shard = ShardSampler(len(dataset), rank=rank, world_size=world)  # type: ignore[arg-type]  # map-style
        return DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=workers, collate_fn=collate)
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    batches: Sampler[list[int]]
    if aspect_ratio_group:
        batches = GroupedBatchSampler(sampler, aspect_ratio_groups(dataset), batch_size)
    else:
        batches = BatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)
