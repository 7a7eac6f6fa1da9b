"""Tests for norton.training.data: on-disk formats written here, splits, transforms, loaders, errors."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import norton.training.data as data
from norton.errors import UserError
from norton.training.data import (
    DataSplits,
    ShardSampler,
    build_datasets,
    build_loaders,
    build_transforms,
    read_idx,
    split_indices,
    synthetic_images,
)

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR10_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)


# --------------------------------------------------------------------------- fake files


def _cifar_batch(path: Path, first: int, n: int, label_key: str = "labels", num_classes: int = 10) -> None:
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
        _cifar_batch(folder / f"data_batch_{i + 1}", first=i * per_batch, n=per_batch)
    _cifar_batch(folder / "test_batch", first=200, n=6)
    return folder


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, n_train: int = 12, n_test: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), dtype=np.uint8)
        _write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
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


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_shapes_labels_and_split_sizes(tmp_path):
    make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_size=5, seed=0)
    assert isinstance(splits, DataSplits)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    for dataset in (splits.val, splits.test):
        for image, label in (dataset[i] for i in range(len(dataset))):
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert label == pixel_of(image) % 10  # the label travels with its image


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    folder = make_cifar10(tmp_path)
    assert len(build_datasets("cifar10", folder, val_size=2).test) == 6


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _cifar_batch(folder / "train", first=0, n=10, label_key="fine_labels", num_classes=100)
    _cifar_batch(folder / "test", first=150, n=3, label_key="fine_labels", num_classes=100)
    splits = build_datasets("cifar100", tmp_path, val_size=2)
    assert splits.num_classes == 100
    assert sorted(label for _, label in (splits.test[i] for i in range(3))) == [50, 51, 52]


def test_eval_transform_normalises_with_dataset_statistics():
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = build_transforms("cifar10", train=False)(image)
    expected = (128 / 255 - CIFAR10_MEAN) / CIFAR10_STD
    torch.testing.assert_close(out, expected.expand(3, 32, 32))


def test_random_crop_returns_a_window_of_the_padded_image():
    torch.manual_seed(0)
    image = torch.arange(3 * 8 * 8).remainder(251).to(torch.uint8).view(3, 8, 8)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))  # (3, 12, 12)
    windows = {(t, l): padded[:, t:t + 8, l:l + 8] for t in range(5) for l in range(5)}
    seen = set()
    for _ in range(60):
        crop = data.RandomCrop(8, padding=2)(image)
        seen |= {key for key, window in windows.items() if torch.equal(window, crop)}
    assert len(seen) > 5 and seen <= set(windows)


def test_random_flip_mirrors_about_half_the_time():
    torch.manual_seed(0)
    image = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    outputs = [data.RandomHorizontalFlip()(image) for _ in range(200)]
    flipped = sum(torch.equal(o, image.flip(-1)) for o in outputs)
    assert sum(torch.equal(o, image) for o in outputs) + flipped == 200 and 60 < flipped < 140


def test_train_transform_differs_from_eval_transform():
    torch.manual_seed(0)
    image = torch.arange(3 * 32 * 32).remainder(251).to(torch.uint8).view(3, 32, 32)
    train, evaluate = build_transforms("cifar10", train=True), build_transforms("cifar10", train=False)
    outputs = [train(image) for _ in range(10)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert sum(torch.equal(o, evaluate(image)) for o in outputs) < 10


def test_val_split_is_disjoint_deterministic_and_seeded(tmp_path):
    make_cifar10(tmp_path, per_batch=20)
    a, b, c = (build_datasets("cifar10", tmp_path, val_size=30, seed=seed) for seed in (3, 3, 4))
    train, val = set(a.train.indices.tolist()), set(a.val.indices.tolist())
    assert not train & val and train | val == set(range(100))
    assert torch.equal(a.val.indices, b.val.indices) and torch.equal(a.train.indices, b.train.indices)
    assert not torch.equal(a.val.indices, c.val.indices)


def test_validation_uses_evaluation_transforms(tmp_path):
    make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_size=5)
    image, _ = splits.val[0]
    torch.manual_seed(1)
    again, _ = splits.val[0]
    assert torch.equal(image, again) and image.std(dim=(1, 2)).max() < 1e-5  # constant: no crop padding


def test_limit_caps_every_split(tmp_path):
    make_cifar10(tmp_path, per_batch=20)
    splits = build_datasets("cifar10", tmp_path, val_size=30, limit=7)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 7, 6)
    assert not set(splits.train.indices.tolist()) & set(splits.val.indices.tolist())


def test_val_size_zero_means_no_validation_split(tmp_path):
    make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_size=0)
    assert splits.val is None and len(splits.train) == 20


def test_missing_cifar_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*cifar-10-batches-py: download it with --download"):
        build_datasets("cifar10", tmp_path)


def test_malformed_cifar_batch_is_a_user_error(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR python batch"):
        build_datasets("cifar10", tmp_path)


def test_cifar_batch_with_wrong_shape_is_a_user_error(tmp_path):
    folder = make_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(UserError, match=r"expected \(N, 3072\) uint8"):
        build_datasets("cifar10", tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_loader_refuses_pickles_that_run_code(tmp_path, capsys):
    folder = make_cifar10(tmp_path)
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({"data": _Payload(), "labels": []}, handle)
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        build_datasets("cifar10", tmp_path)
    assert "pwned" not in capsys.readouterr().out


# --------------------------------------------------------------------------- ImageNet folders


def test_image_folders_shapes_and_classes(tmp_path):
    make_image_folders(tmp_path)
    splits = build_datasets("imagenet", tmp_path, val_size=2)
    assert (splits.num_classes, splits.image_size, len(splits.train), len(splits.test)) == (2, 224, 4, 6)
    image, label = splits.test[5]
    assert image.shape == (3, 224, 224) and label == 1
    image, _ = splits.train[0]
    assert image.shape == (3, 224, 224)


def test_image_folders_missing_val_is_a_user_error(tmp_path):
    make_image_folders(tmp_path)
    for f in (tmp_path / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "val").iterdir()):
        d.rmdir()
    with pytest.raises(UserError, match="no images in class sub-folders"):
        build_datasets("imagenet", tmp_path)
    (tmp_path / "val").rmdir()
    with pytest.raises(UserError, match=r"ImageNet folder .*val not found"):
        build_datasets("imagenet", tmp_path)


def test_image_folders_with_different_classes_is_a_user_error(tmp_path):
    make_image_folders(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(UserError, match="class folders .* differ"):
        build_datasets("imagenet", tmp_path)


# --------------------------------------------------------------------------- Fashion-MNIST


def test_read_idx_round_trip_and_header_checks(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    assert torch.equal(read_idx(tmp_path / "a.gz"), torch.from_numpy(array))
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4)  # float32 type code
    with pytest.raises(UserError, match="not a uint8 idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_pads_and_repeats_channels(tmp_path):
    make_fashion(tmp_path)
    splits = build_datasets("fashion-mnist", tmp_path, val_size=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 2, 5)
    image, label = splits.test[3]
    assert image.shape == (3, 32, 32) and label == 3
    assert torch.equal(image[0], image[2]) and splits.in_channels == 3
    border = (0 - 0.2860) / 0.3530  # padding is black
    assert torch.allclose(image[:, 0, :], torch.full((3, 32), border))
    plain = build_datasets("fashion-mnist", tmp_path, val_size=2, pad_to_32=False, grey_to_rgb=False)
    assert plain.test[0][0].shape == (1, 28, 28) and plain.input_size == (1, 28, 28)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "nothing")
    with pytest.raises(UserError, match="Fashion-MNIST not found .*dataset-fashion-mnist"):
        build_datasets("fashion-mnist", tmp_path / "empty")


def test_fashion_mnist_with_mismatched_files_is_a_user_error(tmp_path):
    make_fashion(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(UserError, match="do not match"):
        build_datasets("fashion-mnist", tmp_path)


def test_debian_fashion_mnist_files():
    folder = Path("/usr/share/datasets/fashion-mnist")
    assert folder.is_dir(), "install Debian's dataset-fashion-mnist package (scripts/setup.sh does)"
    splits = build_datasets("fashion-mnist", val_size=5000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    labels = torch.as_tensor(splits.train.base.targets)
    assert torch.equal(labels.bincount(), torch.full((10,), 6000))
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_class_dependent():
    images, labels = synthetic_images(200, seed=5)
    again, labels_again = synthetic_images(200, seed=5)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert torch.equal(labels.bincount(), torch.full((10,), 20))
    assert not torch.equal(synthetic_images(200, seed=6)[0], images)


def test_synthetic_classes_are_separable_by_their_spectra():
    # Phase-free features (|FFT| per channel) and a nearest-class-mean rule classify new
    # images of another seed: the label is in the pattern, not in the noise.
    def spectra(images):  # (N, 3, S, S) -> (N, 3 * S * S)
        centred = images.float() - images.float().mean(dim=(2, 3), keepdim=True)
        return torch.fft.fft2(centred).abs().flatten(1)

    train_images, train_labels = synthetic_images(300, seed=5)
    test_images, test_labels = synthetic_images(100, seed=6)
    features = spectra(train_images)
    centroids = torch.stack([features[train_labels == c].mean(0) for c in range(10)])  # (10, F)
    predicted = torch.cdist(spectra(test_images), centroids).argmin(1)
    assert (predicted == test_labels).float().mean() > 0.9


def test_synthetic_splits():
    splits = build_datasets("synthetic", limit=50)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 50, 50)
    assert splits.input_size == (3, 32, 32) and splits.num_classes == 10


# --------------------------------------------------------------------------- loaders and samplers


def test_loaders_batches_and_epoch_order():
    splits = build_datasets("synthetic", limit=40, val_size=10)
    loaders = build_loaders(splits, batch_size=16)
    images, labels = next(iter(loaders.train))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert sum(len(y) for _, y in loaders.val) == 10
    orders = []
    for epoch in (1, 2, 1):
        loaders.train_sampler.set_epoch(epoch)
        orders.append(list(loaders.train_sampler))
    assert orders[0] == orders[2] and orders[0] != orders[1] and sorted(orders[0]) == list(range(40))


def test_last_batch_of_one_image_is_dropped():
    splits = build_datasets("synthetic", limit=33, val_size=10)
    assert [len(y) for _, y in build_loaders(splits, batch_size=16).train] == [16, 16]
    assert [len(y) for _, y in build_loaders(splits, batch_size=11).train] == [11, 11, 11]


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(ShardSampler(11, rank=r, world_size=3)) for r in range(3)] == [len(s) for s in shards]


def test_split_indices_and_argument_errors():
    train, val = split_indices(10, 3, seed=0)
    assert len(train) == 7 and len(val) == 3
    with pytest.raises(UserError, match="val_size"):
        split_indices(10, 10, seed=0)
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        build_datasets("mnist")
    with pytest.raises(UserError, match="limit"):
        build_datasets("synthetic", limit=0)
    with pytest.raises(UserError, match="batch_size"):
        build_loaders(build_datasets("synthetic", limit=4), batch_size=0)
