"""Tiny dataset files in the real on-disk formats, written by the training tests."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR10_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
FASHION_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def cifar_batch(path: Path, first: int, n: int, label_key: str = "labels", num_classes: int = 10) -> None:
    """``n`` images whose every pixel is ``first + i`` and whose label is ``(first + i) % num_classes``.

    Written as the real files are: protocol 2, numpy arrays under the pre-2.0 module name.
    """
    values = np.arange(first, first + n, dtype=np.uint8)
    batch = {"data": np.repeat(values[:, None], 3072, axis=1), label_key: [int(v) % num_classes for v in values],
             "batch_label": "fake"}
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def make_cifar10(root: Path, per_batch: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        cifar_batch(folder / f"data_batch_{i + 1}", first=i * per_batch, n=per_batch)
    cifar_batch(folder / "test_batch", first=200, n=6)
    return folder


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_fashion(root: Path, n_train: int = 12, n_test: int = 5, *, compress: bool = True) -> Path:
    """Fashion-MNIST idx files: image ``i`` is all ``i``, its label ``i % 10``."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), dtype=np.uint8)
        write_idx(root / f"{part}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(root / f"{part}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress=compress)
    return root


def make_image_folders(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((20, 24, 3), 40 * c + i, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def pixel_of(image: torch.Tensor) -> int:
    """The raw uint8 value of a constant image after CIFAR-10 evaluation transforms."""
    raw = (image * CIFAR10_STD + CIFAR10_MEAN) * 255
    return int(raw.mean().round())
