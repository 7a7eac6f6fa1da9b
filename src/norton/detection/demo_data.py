"""A small COCO-format detection set built from real Fashion-MNIST glyphs, for an offline detection demo.

Each image is a dark noisy canvas (default 128x128 RGB) holding 1-3 Fashion-MNIST glyphs, each
scaled 1-2x, tinted, drawn opaque, and placed without overlapping another's box. Per glyph:

* class: its Fashion-MNIST class (10 categories, Fashion-MNIST's names, COCO ids 1..10);
* box: the tight box of its foreground pixels (glyph value > :data:`FOREGROUND`);
* mask: those pixels, as compressed RLE (COCO allows RLE and polygons; RLE is exact);
* keypoints: the top-, bottom-, left- and right-most foreground pixels (pixel centres; a tie is
  averaged along the row or column), all visible (2). A horizontal flip swaps ``left`` and
  ``right`` (:data:`KEYPOINT_FLIP_INDICES`) and maps each point exactly onto its partner.

The layout is torchvision's references' (``train2017/``, ``val2017/``, ``annotations/``):
``instances_*.json`` (boxes, masks, 10 categories) and ``person_keypoints_*.json`` (the same
objects as one category, ``garment``, with the four keypoints, as COCO's ``person``).
Training images use Fashion-MNIST's train split, validation images its test split; the same
seed writes the same files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from norton.errors import UserError
from norton.io import write_json
from norton.limits import check_image_side, check_int

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KEYPOINT_NAMES = ("top", "bottom", "left", "right")
KEYPOINT_FLIP_INDICES = [0, 1, 3, 2]
SKELETON = [[1, 3], [3, 2], [2, 4], [4, 1]]  # 1-based, as COCO: top-left-bottom-right-top
FOREGROUND = 40  # a glyph pixel above this (of 255) belongs to the object
_OPAQUE = 96.0  # a glyph pixel this bright (or brighter) hides the background
MIN_CANVAS = 64  # a 2x glyph is 56 pixels wide
_PLACEMENT_TRIES = 30
_GAP = 2  # pixels between two glyphs' boxes


def _glyph(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One 28x28 glyph scaled 1-2x and cropped to its foreground: uint8 ``(h, w)``, or None if blank."""
    from PIL import Image

    side = int(round(28 * rng.uniform(1.0, 2.0)))
    scaled = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
    rows, cols = np.nonzero(scaled > FOREGROUND)
    if rows.size == 0:
        return None
    return scaled[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]


def _place(size: tuple[int, int], boxes: list[list[int]], canvas: int, rng: np.random.Generator) -> list[int] | None:
    """A free ``[x0, y0, x1, y1]`` of ``size`` (h, w) on the canvas, at least ``_GAP`` from ``boxes``."""
    height, width = size
    for _ in range(_PLACEMENT_TRIES):
        x0, y0 = int(rng.integers(0, canvas - width + 1)), int(rng.integers(0, canvas - height + 1))
        box = [x0, y0, x0 + width, y0 + height]
        if all(box[0] >= b[2] + _GAP or b[0] >= box[2] + _GAP or box[1] >= b[3] + _GAP or b[1] >= box[3] + _GAP
               for b in boxes):
            return box
    return None


def extreme_keypoints(mask: np.ndarray) -> list[float]:
    """COCO keypoints ``[x, y, 2] * 4`` (top, bottom, left, right) of a boolean ``(H, W)`` mask, at pixel centres."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    points = [
        (cols[rows == top].mean(), top), (cols[rows == bottom].mean(), bottom),
        (left, rows[cols == left].mean()), (right, rows[cols == right].mean()),
    ]
    return [v for x, y in points for v in (float(x) + 0.5, float(y) + 0.5, 2)]


def _make_split(images: np.ndarray, labels: np.ndarray, count: int, image_dir: Path, canvas: int,
                max_objects: int, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Write ``count`` JPEGs into ``image_dir``; return COCO ``images`` and ``annotations`` (instances form)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    image_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, count + 1):
        picture = np.clip(20.0 + 8.0 * rng.standard_normal((canvas, canvas, 3), dtype=np.float32), 0, 255)  # (H, W, 3)
        boxes: list[list[int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            index = int(rng.integers(len(images)))
            glyph = _glyph(images[index], rng)
            box = None if glyph is None else _place(glyph.shape, boxes, canvas, rng)
            if glyph is None or box is None:
                continue
            boxes.append(box)
            x0, y0, x1, y1 = box
            # Opaque from _OPAQUE up, so dark garments stand out too; their texture kept in the shade.
            alpha = np.clip(glyph[..., None] / _OPAQUE, 0.0, 1.0)  # (h, w, 1)
            shade = 0.45 + 0.55 * glyph[..., None] / max(int(glyph.max()), 1)
            tint = rng.uniform(0.55, 1.0, 3) * 255.0
            picture[y0:y1, x0:x1] = picture[y0:y1, x0:x1] * (1 - alpha) + alpha * shade * tint
            mask = np.zeros((canvas, canvas), dtype=np.uint8)
            mask[y0:y1, x0:x1] = glyph > FOREGROUND
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(labels[index]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0,
                "segmentation": {"size": [canvas, canvas], "counts": rle["counts"].decode("ascii")},
                "keypoints": extreme_keypoints(mask.astype(bool)), "num_keypoints": len(KEYPOINT_NAMES),
            })
        name = f"{image_id:012d}.jpg"  # JPEG as COCO: noise does not compress in PNG (40 KB an image)
        Image.fromarray(picture.astype(np.uint8)).save(image_dir / name, quality=92)
        entries.append({"id": image_id, "file_name": name, "width": canvas, "height": canvas})
    return entries, annotations


def make_demo_data(out_dir: str | os.PathLike, *, fashion_mnist_dir: str | os.PathLike | None = None,
                   train_images: int = 1500, val_images: int = 300, canvas: int = 128, max_objects: int = 3,
                   seed: int = 0) -> Path:
    """Write the demo set to ``out_dir`` (COCO layout, see the module docstring) and return ``out_dir``.

    ``fashion_mnist_dir``: the folder of the idx files (default: Debian's
    ``/usr/share/datasets/fashion-mnist``, then ``~/data/FashionMNIST/raw``).
    """
    from norton.training.readers import read_fashion_mnist

    train_images = check_int(train_images, "train_images", maximum=1_000_000)
    val_images = check_int(val_images, "val_images", maximum=1_000_000)
    canvas = check_image_side(canvas, "canvas")
    if canvas < MIN_CANVAS:
        raise UserError(f"canvas must be at least {MIN_CANVAS} pixels (a glyph scaled 2x is 56), got {canvas}")
    max_objects = check_int(max_objects, "max_objects", maximum=20)
    seed = check_int(seed, "seed", minimum=0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a folder for the demo data")
    (train, test, _) = read_fashion_mnist(fashion_mnist_dir)
    instance_categories = [{"id": i + 1, "name": name, "supercategory": "garment"}
                           for i, name in enumerate(FASHION_MNIST_CLASSES)]
    keypoint_category = {"id": 1, "name": "garment", "supercategory": "garment",
                         "keypoints": list(KEYPOINT_NAMES), "skeleton": SKELETON}
    for split_index, (split, (images, labels), count) in enumerate(
            (("train", train, train_images), ("val", test, val_images))):
        rng = np.random.default_rng([seed, split_index])
        entries, annotations = _make_split(images[:, 0].numpy(), labels.numpy(), count, out / f"{split}2017",
                                           canvas, max_objects, rng)
        info = {"description": f"norton detection demo: Fashion-MNIST {'train' if split == 'train' else 'test'} "
                               f"glyphs on {canvas}x{canvas} canvases", "seed": seed}
        instances = [{k: v for k, v in a.items() if k not in ("keypoints", "num_keypoints")} for a in annotations]
        write_json({"info": info, "images": entries, "annotations": instances, "categories": instance_categories},
                   out / "annotations" / f"instances_{split}2017.json")
        keypoints = [{**a, "category_id": 1} for a in annotations]
        write_json({"info": info, "images": entries, "annotations": keypoints, "categories": [keypoint_category]},
                   out / "annotations" / f"person_keypoints_{split}2017.json")
    return out
