"""Image transforms: the paper's augmentations and the evaluation transforms, per dataset.

The in-memory datasets hold uint8 tensors; the small tensor transforms here do the
paper's CIFAR augmentation about 5x faster per image than torchvision's generic ones
(which dispatch on PIL/tensor/tv_tensor types), which matters on CPU. ImageNet
images come from disk as PIL images and go through ``torchvision.transforms.v2``.
Randomness comes from torch's global generator, like torchvision's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import Compose, v2

from norton.errors import UserError
from norton.training import DATASETS  # defined where the CLI can read it without torch

# Normalisation statistics (mean, std) per channel. CIFAR-10 uses the NORTON
# reference's values (data/cifar10.py; the std is the widespread slightly-off one)
# so that the authors' released checkpoints score exactly what they report.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion-mnist": ((0.2860,), (0.3530,)),  # 28x28 training images, measured
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def check_dataset_name(name: str) -> str:
    """``name`` if it is one of :data:`DATASETS`, else a one-line ``UserError``."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return name


class Pad:
    """Zero-pad a ``(C, H, W)`` tensor by ``padding`` pixels on every side."""

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def __call__(self, image: Tensor) -> Tensor:
        return torch.nn.functional.pad(image, (self.padding,) * 4)

    def __repr__(self) -> str:
        return f"Pad({self.padding})"


class RandomCrop:
    """``torchvision``'s ``RandomCrop(size, padding)`` for ``(C, H, W)`` tensors: zero-pad, then crop."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def __call__(self, image: Tensor) -> Tensor:
        if self.padding:
            image = torch.nn.functional.pad(image, (self.padding,) * 4)  # (C, H + 2p, W + 2p)
        top, left = (int(torch.randint(0, extent - self.size + 1, (1,)).item()) for extent in image.shape[-2:])
        return image[:, top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror a ``(C, H, W)`` tensor left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor) -> Tensor:
        return image.flip(-1) if torch.rand(()).item() < self.p else image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToFloatNormalize:
    """uint8 ``(C, H, W)`` -> float32 ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        return image.float().div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToFloatNormalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RepeatChannels:
    """Repeat a one-channel image ``(1, H, W)`` to ``(n, H, W)`` (a view, no copy)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, image: Tensor) -> Tensor:
        return image.expand(self.n, -1, -1)

    def __repr__(self) -> str:
        return f"RepeatChannels(n={self.n})"


def build_transforms(
    name: str, *, train: bool, pad_to_32: bool = True, grey_to_rgb: bool = True
) -> Callable[[Any], Tensor]:
    """The paper's augmentations (``train=True``) or evaluation transforms for dataset ``name``.

    Input: a uint8 ``(C, H, W)`` tensor (a PIL image for ImageNet). Output: a float
    tensor ``(C, H, W)`` normalised with the dataset's mean/std.
    """
    check_dataset_name(name)
    mean, std = STATS[name]
    if name == "imagenet":  # PIL images from disk: torchvision's transforms
        crop = [v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()] if train else [
            v2.Resize(256, antialias=True), v2.CenterCrop(224)]
        return v2.Compose([v2.ToImage(), *crop, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
                           v2.ToPureTensor()])
    steps: list[Callable] = []
    size = 32
    if name == "fashion-mnist":
        size = 32 if pad_to_32 else 28
        if pad_to_32:
            steps.append(Pad(2))  # 28 -> 32 with black, the background colour
    if train:
        steps.append(RandomCrop(size, padding=4))
        # No flip for "synthetic": mirroring a class's oriented pattern can make it another class's.
        if name != "synthetic":
            steps.append(RandomHorizontalFlip())
    steps.append(ToFloatNormalize(mean, std))
    if name == "fashion-mnist" and grey_to_rgb:
        steps.append(RepeatChannels(3))  # after normalising: one channel of work, not three
    return Compose(steps)
