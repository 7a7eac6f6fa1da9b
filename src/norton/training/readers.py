"""On-disk dataset formats read into tensors: CIFAR python batches, ImageNet folders, Fashion-MNIST idx files.

Each reader checks what it reads and stops with one line naming the file and how to
get a good copy. CIFAR and Fashion-MNIST come back as uint8 tensors
``(images (N, C, H, W), labels (N,))``; ImageNet as torchvision ``ImageFolder``s (PIL
images decoded per sample). Nothing is downloaded unless asked.

Where the files are looked up: an explicit folder (``--data_dir``) is used or refused;
only when no folder is given do the defaults (``~/data``, and for Fashion-MNIST
Debian's ``/usr/share/datasets/fashion-mnist``) apply.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from norton.errors import UserError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

DEFAULT_DATA_DIR = Path("~/data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

ImagesAndLabels = tuple[Tensor, Tensor]  # (N, C, H, W) uint8, (N,) int64


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    # name: (folder, train files, test files, label key, classes, human name, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                "CIFAR-10", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100, "CIFAR-100", "CIFAR100"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays, lists and strings) and nothing else.

    A pickle can run arbitrary code on load; this one only builds numpy arrays.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 moved numpy.core
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str, human: str) -> ImagesAndLabels:
    """One CIFAR python batch -> ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``."""
    hint = "delete it and download again with --download"
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="latin1").load()
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
        data = torch.as_tensor(batch["data"])
        labels = torch.as_tensor(batch[label_key], dtype=torch.long)
    except Exception as error:  # any failure here means the file is not a CIFAR batch
        raise UserError(f"{human} file {path} is not a CIFAR python batch ({type(error).__name__}: {error}); "
                        f"{hint}") from error
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise UserError(f"{human} file {path} holds data {tuple(data.shape)} {data.dtype} and "
                        f"{tuple(labels.shape)} labels, expected (N, 3072) uint8 and (N,); {hint}")
    return data.reshape(-1, 3, 32, 32), labels  # rows are channel-major 32x32 planes


def read_cifar(
    name: str, root: str | os.PathLike | None = None, *, download: bool = False
) -> tuple[ImagesAndLabels, ImagesAndLabels, int]:
    """CIFAR-10/100 from torchvision's on-disk format: ``<root>/cifar-10-batches-py/data_batch_1`` ...

    ``root`` may also be the batches folder itself. Returns ``(train, test, num_classes)``.
    """
    folder, train_files, test_files, label_key, num_classes, human, tv_class = _CIFAR[name]
    root = Path(root if root is not None else DEFAULT_DATA_DIR).expanduser()
    candidates = [root / folder, root]
    found = next((c for c in candidates if all((c / f).is_file() for f in train_files + test_files)), None)
    if found is None and download:
        _torchvision_download(tv_class, root, human)
        found = root / folder
    if found is None:
        raise UserError(f"{human} not found in {root / folder}: download it with --download or place "
                        f"the python batches ({', '.join(train_files + test_files)}) there")
    splits = []
    for files in (train_files, test_files):
        parts = [_read_cifar_batch(found / f, label_key, human) for f in files]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise UserError(f"{human} labels in {found} fall outside 0..{num_classes - 1}: the files are "
                            f"not {human} batches; download them again with --download")
        splits.append((images, labels))
    return splits[0], splits[1], num_classes


def _torchvision_download(tv_class: str, root: Path, human: str) -> None:
    import torchvision.datasets

    try:
        for train in (True, False):
            getattr(torchvision.datasets, tv_class)(str(root), train=train, download=True)
    except Exception as error:  # offline, proxy, disk full: say so in one line
        raise UserError(f"could not download {human} to {root} ({type(error).__name__}: {error}); "
                        "place the files there by hand (see docs/training.md)") from error


# --------------------------------------------------------------------------- ImageNet


def read_image_folders(root: str | os.PathLike | None) -> tuple[ImageFolder, ImageFolder, int]:
    """ImageNet-style folders ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``.

    ``<root>/ILSVRC2012_img_train`` (the reference's name) is accepted for ``train``.
    The ``val`` folder is the test split. Returns ``(train, test, num_classes)``.
    """
    from torchvision.datasets import ImageFolder

    if root is None:
        raise UserError("ImageNet needs --data_dir: the folder holding train/ and val/ (see docs/training.md)")
    root = Path(root).expanduser()
    train_dir = next((d for d in (root / "train", root / "ILSVRC2012_img_train") if d.is_dir()), None)
    val_dir = root / "val"
    if train_dir is None or not val_dir.is_dir():
        missing = root / "train" if train_dir is None else val_dir
        raise UserError(f"ImageNet folder {missing} not found: put the images in {root}/train/<class>/ and "
                        f"{root}/val/<class>/ (see docs/training.md)")
    folders = []
    for folder in (train_dir, val_dir):
        try:
            folders.append(ImageFolder(str(folder)))
        except (FileNotFoundError, RuntimeError) as error:
            raise UserError(f"ImageNet folder {folder} has no images in class sub-folders ({error}); "
                            "sort the images into one folder per class") from error
    train, test = folders
    if train.classes != test.classes:
        raise UserError(f"the class folders of {train_dir} ({len(train.classes)}) and {val_dir} "
                        f"({len(test.classes)}) differ: both need the same class sub-folders")
    return train, test, len(train.classes)


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> Tensor:
    """An idx file (``.gz`` or not) -> uint8 tensor of its shape, e.g. ``(N, 28, 28)`` or ``(N,)``."""
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read idx file {path} ({error}); delete it and fetch it again") from error
    # Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions,
    # then one big-endian int32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise UserError(f"{path} is not a uint8 idx file (magic number {raw[:4].hex() or 'missing'}, "
                        "expected 000008xx); delete it and fetch it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + math.prod(dims):
        raise UserError(f"{path} is truncated or padded: header says {dims} ({header + math.prod(dims)} bytes), "
                        f"file has {len(raw)} bytes; delete it and fetch it again")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def _fashion_candidates(root: str | os.PathLike | None) -> list[Path]:
    """Folders to look in: inside ``root`` when given (and nowhere else), else the defaults."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    return [DEBIAN_FASHION_MNIST, DEFAULT_DATA_DIR.expanduser() / "FashionMNIST" / "raw"]


def _is_complete(folder: Path) -> bool:
    return all(_idx_path(folder, stem) is not None for stem in FASHION_MNIST_FILES.values())


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the four Fashion-MNIST idx files (``.gz`` or not), or ``None``.

    With ``root``: ``root``, ``root/fashion-mnist`` or ``root/FashionMNIST/raw`` (torchvision's
    layout), and nowhere else: a folder the user names is never swapped for another copy.
    Without: Debian's ``/usr/share/datasets/fashion-mnist``, then ``~/data/FashionMNIST/raw``.
    """
    return next((folder for folder in _fashion_candidates(root) if _is_complete(folder)), None)


def _fashion_not_found(root: str | os.PathLike | None) -> str:
    """One line saying where Fashion-MNIST was looked for and which file is missing."""
    candidates = _fashion_candidates(root)
    # The folder holding the most of the four files is the one the user meant.
    def present(folder: Path) -> int:
        return sum(_idx_path(folder, stem) is not None for stem in FASHION_MNIST_FILES.values())

    folder = max(candidates, key=present)
    if present(folder) == 0:
        if root is None:
            return (f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} or {candidates[1]}: install Debian's "
                    "dataset-fashion-mnist package, pass --data_dir, or pass --download")
        state = "does not exist" if not candidates[0].is_dir() else "holds no Fashion-MNIST idx files"
        return (f"Fashion-MNIST not found: --data_dir {candidates[0]} {state} (looked for "
                f"{FASHION_MNIST_FILES['train_images']}[.gz] there and in fashion-mnist/, FashionMNIST/raw/); "
                "put the four idx files there, pass --download, or drop --data_dir to use the system copy")
    missing = [stem for stem in FASHION_MNIST_FILES.values() if _idx_path(folder, stem) is None]
    return (f"Fashion-MNIST in {folder} is incomplete: {missing[0]}[.gz] is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; add the file, or pass --download")


def read_fashion_mnist(
    root: str | os.PathLike | None = None, *, download: bool = False
) -> tuple[ImagesAndLabels, ImagesAndLabels, int]:
    """Fashion-MNIST from idx files (see :func:`find_fashion_mnist`): images ``(N, 1, 28, 28)`` uint8."""
    folder = find_fashion_mnist(root)
    if folder is None and download:
        target = Path(root if root is not None else DEFAULT_DATA_DIR).expanduser()
        _torchvision_download("FashionMNIST", target, "Fashion-MNIST")
        folder = find_fashion_mnist(target)
    if folder is None:
        raise UserError(_fashion_not_found(root))
    splits = []
    for part in ("train", "test"):
        images = read_idx(folder / _existing(folder, FASHION_MNIST_FILES[f"{part}_images"]))
        labels = read_idx(folder / _existing(folder, FASHION_MNIST_FILES[f"{part}_labels"]))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"Fashion-MNIST {part} files in {folder} do not match: images {tuple(images.shape)}, "
                            f"labels {tuple(labels.shape)}; fetch them again")
        if labels.numel() and int(labels.max()) > 9:
            raise UserError(f"Fashion-MNIST {part} labels in {folder} exceed 9: fetch the files again")
        splits.append((images.unsqueeze(1), labels.long()))  # (N, 1, 28, 28), (N,)
    return splits[0], splits[1], 10


def _existing(folder: Path, stem: str) -> str:
    path = _idx_path(folder, stem)
    if path is None:  # removed between the look-up and the read
        raise UserError(f"Fashion-MNIST in {folder} is incomplete: {stem}[.gz] is missing; add the file")
    return path.name
