"""Datasets as three splits: CIFAR-10/100, ImageNet folders, Fashion-MNIST and a built-in synthetic set.

Every dataset comes as three splits (:class:`DataSplits`):

* ``train``: the training images minus a held-out validation part, with the
  paper's augmentations;
* ``val``: ``val_size`` training images drawn at random (deterministic by
  ``seed``), with the evaluation transforms. Model selection happens here;
* ``test``: the official test set (ImageNet: the ``val`` folder), evaluation
  transforms, touched only for the final number.

The NORTON reference picks its best epoch on the test set; norton does not
(docs/training.md). Images stay ``uint8`` tensors in memory (CIFAR, Fashion-MNIST,
synthetic; transformed per sample by :mod:`norton.training.transforms`) or files
on disk (ImageNet; decoded by PIL). The file formats are read by
:mod:`norton.training.readers`.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from norton.errors import UserError
from norton.limits import check_split_options
from norton.training.readers import read_cifar, read_fashion_mnist, read_image_folders
from norton.training.transforms import DATASETS, STATS, build_transforms, check_dataset_name

__all__ = ["DATASETS", "DataSplits", "ImageSet", "TensorImageDataset", "TransformedSubset", "build_datasets",
           "split_indices", "synthetic_images"]

# Held-out validation images taken from the training set when val_size is None.
_DEFAULT_VAL_SIZE = {"cifar10": 5000, "cifar100": 5000, "imagenet": 10000, "fashion-mnist": 5000, "synthetic": 500}
_SYNTHETIC_SIZES = {"train": 5000, "test": 1000}


class ImageSet(Protocol):
    """A map-style dataset of ``(image, label)`` pairs that knows its labels (``targets``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, Any]: ...

    @property
    def targets(self) -> list[int]: ...


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one dataset and what a model needs to know about it.

    ``val`` is ``None`` when ``val_size=0``. ``mean``/``std`` are those of the
    ``Normalize`` step (one value per channel of the model's input).
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one transformed image."""
        return (self.in_channels, self.image_size, self.image_size)


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W) uint8`` with labels ``(N,) int64``."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable | None = None) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"{images.dtype} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]  # (C, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class TransformedSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image.

    Lets the training and validation parts of one training set share the raw
    images while using different transforms.
    """

    def __init__(self, base: ImageSet, indices: Sequence[int] | Tensor, transform: Callable | None) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[int(self.indices[index])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

    @property
    def targets(self) -> list[int]:
        base_targets = torch.as_tensor(self.base.targets)  # (N_base,)
        return base_targets[self.indices].tolist()


def split_indices(n: int, val_size: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """A random, seed-deterministic partition of ``range(n)`` into ``(train, val)`` index tensors."""
    if not 0 <= val_size < n:
        raise UserError(f"val_size must be in [0, {n - 1}] for a training set of {n} images, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    return order[val_size:], order[:val_size]


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    download: bool = False,
    augment: bool = True,
    pad_to_32: bool = True,
    grey_to_rgb: bool = True,
) -> DataSplits:
    """Load dataset ``name`` from ``root`` and split it into train / validation / test.

    Args:
        name: one of :data:`DATASETS`.
        root: where the files are (see docs/training.md). A folder given is used or refused;
            ``None`` means ``~/data``, and for Fashion-MNIST Debian's ``/usr/share/datasets/fashion-mnist``.
        limit: keep at most this many images in each split (a random subset), for quick runs.
        val_size: training images held out for validation; ``None`` picks the dataset's
            default (5,000 for CIFAR and Fashion-MNIST, 10,000 for ImageNet, 500 for synthetic,
            at most a tenth of the training set), ``0`` none.
        seed: chooses the validation images and the ``limit`` subsets.
        download: fetch CIFAR or Fashion-MNIST with torchvision when missing.
        augment: use the training augmentations on ``train`` (else evaluation transforms).
        pad_to_32, grey_to_rgb: Fashion-MNIST only: pad 28x28 to 32x32 and repeat the grey
            channel three times, so the CIFAR architectures apply unchanged.
    """
    check_dataset_name(name)
    check_split_options(limit=limit, val_size=val_size)
    train_base, test_base, num_classes = _load_raw(name, root, download=download)
    if val_size is None:
        val_size = min(_DEFAULT_VAL_SIZE[name], len(train_base) // 10)
    train_idx, val_idx = split_indices(len(train_base), val_size, seed=seed)
    test_idx = torch.randperm(len(test_base), generator=torch.Generator().manual_seed(seed + 1))
    if limit is not None:
        train_idx, val_idx, test_idx = train_idx[:limit], val_idx[:limit], test_idx[:limit]
    test_idx = test_idx.sort().values  # the full test set in file order; a subset in file order

    kw = {"pad_to_32": pad_to_32, "grey_to_rgb": grey_to_rgb}
    train_tf = build_transforms(name, train=augment, **kw)
    eval_tf = build_transforms(name, train=False, **kw)
    mean, std = STATS[name]
    in_channels = len(mean)
    image_size = {"imagenet": 224, "fashion-mnist": 32 if pad_to_32 else 28}.get(name, 32)
    if name == "fashion-mnist" and grey_to_rgb:
        mean, std, in_channels = mean * 3, std * 3, 3
    return DataSplits(
        name=name,
        train=TransformedSubset(train_base, train_idx, train_tf),
        val=TransformedSubset(train_base, val_idx, eval_tf) if len(val_idx) else None,
        test=TransformedSubset(test_base, test_idx, eval_tf),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
    )


def _load_raw(name: str, root: str | os.PathLike | None, *, download: bool) -> tuple[ImageSet, ImageSet, int]:
    """``(train, test, num_classes)`` without transforms: images as uint8 tensors or PIL images."""
    if name == "imagenet":
        return read_image_folders(root)
    if name in ("cifar10", "cifar100"):
        train, test, num_classes = read_cifar(name, root, download=download)
    elif name == "fashion-mnist":
        train, test, num_classes = read_fashion_mnist(root, download=download)
    else:
        (train, test), num_classes = _synthetic_splits(), 10
    return TensorImageDataset(*train), TensorImageDataset(*test), num_classes


@functools.lru_cache(maxsize=1)
def _synthetic_splits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    # Generated once per process (datasets never write to their image tensors).
    return (synthetic_images(_SYNTHETIC_SIZES["train"], seed=0), synthetic_images(_SYNTHETIC_SIZES["test"], seed=1))


def synthetic_images(
    n: int, *, seed: int, num_classes: int = 10, image_size: int = 32
) -> tuple[Tensor, Tensor]:
    """``n`` class-dependent RGB patterns: ``(images (n, 3, S, S) uint8, labels (n,) int64)``.

    Class ``c`` is a colour grating with its own orientation and frequency, at a
    random phase and contrast, plus noise: a convnet learns it in an epoch or two,
    a linear model on pixels does not (the phase varies). Deterministic in ``seed``.
    """
    classes = torch.Generator().manual_seed(12345)  # the classes are the same for every seed
    angle = torch.arange(num_classes) * math.pi / num_classes  # (K,)
    frequency = 1.5 + (torch.arange(num_classes) % 3).float()  # (K,) periods per image
    colour = 0.3 + 0.7 * torch.rand(num_classes, 3, generator=classes)  # (K, 3)

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]  # (n,) balanced, shuffled
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)  # (n, 1, 1)
    contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)  # (n, 1, 1, 1)
    coords = torch.arange(image_size, dtype=torch.float32) / image_size  # (S,)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (S, S) each
    direction = x * torch.cos(angle)[:, None, None] + y * torch.sin(angle)[:, None, None]  # (K, S, S)
    wave = torch.cos(2 * math.pi * frequency[labels, None, None] * direction[labels] + phase)  # (n, S, S)
    image = 0.5 + 0.4 * contrast * colour[labels, :, None, None] * wave[:, None]  # (n, 3, S, S)
    image = image + 0.08 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels
