"""Datasets and loaders: CIFAR-10/100, ImageNet folders, Fashion-MNIST and a built-in synthetic set.

Every dataset comes as three splits (:class:`DataSplits`):

* ``train``: the training images minus a held-out validation part, with the
  paper's augmentations;
* ``val``: ``val_size`` training images drawn at random (deterministic by
  ``seed``), with the evaluation transforms. Model selection happens here;
* ``test``: the official test set (ImageNet: the ``val`` folder), evaluation
  transforms, touched only for the final number.

The NORTON reference picks its best epoch on the test set; norton does not
(docs/training.md). Images stay ``uint8`` tensors in memory (CIFAR, Fashion-MNIST,
synthetic; transformed per sample by the small tensor transforms below) or files
on disk (ImageNet; decoded by PIL and transformed by ``torchvision.transforms.v2``).
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import Compose, v2

from norton.errors import UserError

DATASETS = ("cifar10", "cifar100", "imagenet", "fashion-mnist", "synthetic")
DEFAULT_DATA_DIR = Path("~/data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Normalisation statistics. CIFAR-10 uses the NORTON reference's values
# (data/cifar10.py; the std is the widespread slightly-off one) so that the
# authors' released checkpoints score exactly what they report.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion-mnist": ((0.2860,), (0.3530,)),  # 28x28 training images, measured
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
# Held-out validation images taken from the training set when val_size is None.
_DEFAULT_VAL_SIZE = {"cifar10": 5000, "cifar100": 5000, "imagenet": 10000, "fashion-mnist": 5000, "synthetic": 500}
_SYNTHETIC_SIZES = {"train": 5000, "test": 1000}

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


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


@dataclass(frozen=True)
class Loaders:
    """Data loaders of one :class:`DataSplits`; ``train_sampler.set_epoch`` reshuffles."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    train_sampler: DistributedSampler


# --------------------------------------------------------------------------- datasets


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

    def __init__(self, base: Dataset, indices: Sequence[int] | Tensor, transform: Callable | None) -> None:
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


# --------------------------------------------------------------------------- transforms
# The in-memory datasets hold uint8 tensors; these small tensor transforms do the
# paper's CIFAR augmentation about 5x faster per image than torchvision's generic
# ones (which dispatch on PIL/tensor/tv_tensor types), which matters on CPU.
# Randomness comes from torch's global generator, like torchvision's.


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
        top, left = (torch.randint(0, extent - self.size + 1, (1,)).item() for extent in image.shape[-2:])
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
    _check_name(name)
    mean, std = _STATS[name]
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


# --------------------------------------------------------------------------- splits


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
        root: where the files are (see docs/training.md); ``None`` means ``~/data``,
            and for Fashion-MNIST also Debian's ``/usr/share/datasets/fashion-mnist``.
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
    _check_name(name)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of images, got {limit}")
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
    mean, std = _STATS[name]
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


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def _load_raw(name: str, root: str | os.PathLike | None, *, download: bool) -> tuple[Dataset, Dataset, int]:
    """``(train, test, num_classes)`` without transforms: images as uint8 tensors or PIL images."""
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, download=download)
    if name == "imagenet":
        return load_image_folders(root)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download=download)
    train, test = _synthetic_splits()
    return TensorImageDataset(*train), TensorImageDataset(*test), 10


@functools.lru_cache(maxsize=1)
def _synthetic_splits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    # Generated once per process (datasets never write to their image tensors).
    return (synthetic_images(_SYNTHETIC_SIZES["train"], seed=0), synthetic_images(_SYNTHETIC_SIZES["test"], seed=1))


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


def _read_cifar_batch(path: Path, label_key: str, human: str) -> tuple[Tensor, Tensor]:
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


def load_cifar(
    name: str, root: str | os.PathLike | None = None, *, download: bool = False
) -> tuple[TensorImageDataset, TensorImageDataset, int]:
    """CIFAR-10/100 from torchvision's on-disk format: ``<root>/cifar-10-batches-py/data_batch_1`` ...

    ``root`` may also be the batches folder itself. Returns ``(train, test, num_classes)``
    without transforms.
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
    parts = [[_read_cifar_batch(found / f, label_key, human) for f in files] for files in (train_files, test_files)]
    train, test = (
        TensorImageDataset(torch.cat([p[0] for p in part]), torch.cat([p[1] for p in part])) for part in parts
    )
    for split in (train, test):
        if split.labels.numel() and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < num_classes:
            raise UserError(f"{human} labels in {found} fall outside 0..{num_classes - 1}: the files are "
                            f"not {human} batches; download them again with --download")
    return train, test, num_classes


def _torchvision_download(tv_class: str, root: Path, human: str) -> None:
    import torchvision.datasets

    try:
        for train in (True, False):
            getattr(torchvision.datasets, tv_class)(str(root), train=train, download=True)
    except Exception as error:  # offline, proxy, disk full: say so in one line
        raise UserError(f"could not download {human} to {root} ({type(error).__name__}: {error}); "
                        "place the files there by hand (see docs/training.md)") from error


# --------------------------------------------------------------------------- ImageNet


def load_image_folders(root: str | os.PathLike | None) -> tuple[Dataset, Dataset, int]:
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


def read_idx(path: str | os.PathLike) -> Tensor:
    """An idx file (``.gz`` or not) -> uint8 tensor of its shape, e.g. ``(N, 28, 28)`` or ``(N,)``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
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


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding the four Fashion-MNIST idx files (``.gz`` or not), or ``None``.

    Looked up in ``root``, ``root/fashion-mnist``, ``root/FashionMNIST/raw`` (torchvision's
    layout), then Debian's ``/usr/share/datasets/fashion-mnist``, then ``~/data/FashionMNIST/raw``.
    """
    candidates = []
    if root is not None:
        root = Path(root).expanduser()
        candidates += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    candidates += [DEBIAN_FASHION_MNIST, DEFAULT_DATA_DIR.expanduser() / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(_idx_path(folder, stem) is not None for stem in _FASHION_FILES.values()):
            return folder
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, download: bool = False
) -> tuple[TensorImageDataset, TensorImageDataset, int]:
    """Fashion-MNIST from idx files (see :func:`find_fashion_mnist`): images ``(N, 1, 28, 28)`` uint8."""
    folder = find_fashion_mnist(root)
    if folder is None and download:
        target = Path(root if root is not None else DEFAULT_DATA_DIR).expanduser()
        _torchvision_download("FashionMNIST", target, "Fashion-MNIST")
        folder = find_fashion_mnist(target)
    if folder is None:
        where = str(DEBIAN_FASHION_MNIST) if root is None else f"{Path(root).expanduser()} or {DEBIAN_FASHION_MNIST}"
        raise UserError(f"Fashion-MNIST not found in {where}: install Debian's dataset-fashion-mnist "
                        "package or pass --download")
    splits = []
    for part in ("train", "test"):
        images = read_idx(_idx_path(folder, _FASHION_FILES[f"{part}_images"]))
        labels = read_idx(_idx_path(folder, _FASHION_FILES[f"{part}_labels"]))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"Fashion-MNIST {part} files in {folder} do not match: images {tuple(images.shape)}, "
                            f"labels {tuple(labels.shape)}; fetch them again")
        if labels.numel() and int(labels.max()) > 9:
            raise UserError(f"Fashion-MNIST {part} labels in {folder} exceed 9: fetch the files again")
        splits.append(TensorImageDataset(images.unsqueeze(1), labels.long()))  # (N, 1, 28, 28)
    return splits[0], splits[1], 10


# --------------------------------------------------------------------------- synthetic


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


# --------------------------------------------------------------------------- loaders


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``: every sample on exactly one rank, no padding.

    For evaluation, where ``DistributedSampler``'s padding would count some images twice.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def build_loaders(
    splits: DataSplits,
    *,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
) -> Loaders:
    """Loaders for ``splits``; sharded over ranks when ``torch.distributed`` is initialised.

    The training order is a permutation seeded by ``(seed, epoch)`` (call
    ``loaders.train_sampler.set_epoch(epoch)``), so it is the same after a resume.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    common = {"num_workers": workers, "pin_memory": pin_memory}
    # A last training batch of one image breaks BatchNorm ("Expected more than 1 value per channel").
    drop_last = len(sampler) > batch_size and len(sampler) % batch_size == 1
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)

    def eval_loader(dataset: Dataset | None) -> DataLoader | None:
        if dataset is None:
            return None
        shard = ShardSampler(len(dataset), rank=rank, world_size=world)
        return DataLoader(dataset, batch_size=eval_batch_size or batch_size, sampler=shard, **common)

    return Loaders(train=train, val=eval_loader(splits.val), test=eval_loader(splits.test), train_sampler=sampler)
