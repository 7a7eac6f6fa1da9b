"""Detection augmentation on torchvision.transforms.v2: horizontal flip (keypoints swapped left/right), to float.

The torchvision detection reference's default policy (``hflip``): a random horizontal flip,
then uint8 -> float in [0, 1]; the detector resizes and normalises inside itself
(``GeneralizedRCNNTransform``). Images, ``BoundingBoxes`` and ``Mask`` are flipped by v2's
kernels. Keypoints travel as a plain ``(K, P, 3)`` tensor (x, y, visibility), flipped here as
the reference flips them: ``x -> W - x`` (the same continuous coordinates as the boxes; v2's
``KeyPoints`` would use ``W - 1 - x``), then reordered by ``flip_indices`` so a left eye
becomes a right eye, and invisible points (visibility 0) kept at (0, 0).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from norton.errors import UserError

# COCO person keypoints: nose, then (left, right) pairs of eyes, ears, shoulders, elbows,
# wrists, hips, knees, ankles; a flip swaps each pair.
COCO_PERSON_FLIP_INDICES = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def flip_keypoints(keypoints: Tensor, width: int, flip_indices: Sequence[int]) -> Tensor:
    """``(K, P, 3)`` keypoints of an image of ``width`` pixels, mirrored: ``x -> width - x``, points reordered."""
    if keypoints.shape[-2] != len(flip_indices):
        raise UserError(f"flip_indices lists {len(flip_indices)} keypoints but the targets have "
                        f"{keypoints.shape[-2]}; pass the dataset's flip_indices")
    flipped = keypoints[:, list(flip_indices)].clone()  # (K, P, 3), left and right swapped
    flipped[..., 0] = width - flipped[..., 0]
    flipped[flipped[..., 2] == 0] = 0  # an unlabelled point stays "not there", not at x = width
    return flipped


class RandomHorizontalFlip(nn.Module):
    """With probability ``p``: flip the image, boxes, masks (v2 kernels) and keypoints (:func:`flip_keypoints`)."""

    def __init__(self, p: float = 0.5, flip_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.p = p
        self.flip_indices = list(flip_indices) if flip_indices is not None else None

    def forward(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if torch.rand(()) >= self.p:
            return image, target
        import torchvision.transforms.v2.functional as F

        width = image.shape[-1]
        target = dict(target)
        for key in ("boxes", "masks"):
            if key in target:
                target[key] = F.horizontal_flip(target[key])
        if "keypoints" in target:
            if self.flip_indices is None:
                raise UserError("flipping keypoints needs flip_indices (which keypoint becomes which): pass "
                                "train_transforms('keypoints', flip_indices=dataset.flip_indices)")
            target["keypoints"] = flip_keypoints(target["keypoints"], width, self.flip_indices)
        return F.horizontal_flip(image), target


def train_transforms(kind: str = "boxes", flip_indices: Sequence[int] | None = None, *, flip_p: float = 0.5) -> Any:
    """Training transforms: random horizontal flip, then float [0, 1].

    For ``kind="keypoints"`` without ``flip_indices``, COCO's person flip map
    (:data:`COCO_PERSON_FLIP_INDICES`) is used; a dataset's own is ``dataset.flip_indices``.
    """
    from torchvision.transforms import v2

    if kind == "keypoints" and flip_indices is None:
        flip_indices = COCO_PERSON_FLIP_INDICES
    return v2.Compose([RandomHorizontalFlip(flip_p, flip_indices), v2.ToDtype(torch.float32, scale=True)])


def eval_transforms() -> Any:
    """Evaluation transforms: float [0, 1] only (the image keeps its geometry, so results map to the json)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
