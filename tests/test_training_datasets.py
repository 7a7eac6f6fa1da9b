"""Tests for norton.training.datasets: the three splits, their transforms, sizes and seeds; synthetic images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _training_files import make_cifar10, make_fashion, make_image_folders, pixel_of
from norton.errors import UserError
from norton.training.datasets import DataSplits, build_datasets, split_indices, synthetic_images

# --------------------------------------------------------------------------- splits


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


def test_image_folders_shapes_and_classes(tmp_path):
    make_image_folders(tmp_path)
    splits = build_datasets("imagenet", tmp_path, val_size=2)
    assert (splits.num_classes, splits.image_size, len(splits.train), len(splits.test)) == (2, 224, 4, 6)
    image, label = splits.test[5]
    assert image.shape == (3, 224, 224) and label == 1
    image, _ = splits.train[0]
    assert image.shape == (3, 224, 224)


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


def test_debian_fashion_mnist_files():
    folder = Path("/usr/share/datasets/fashion-mnist")
    assert folder.is_dir(), "install Debian's dataset-fashion-mnist package (scripts/setup.sh does)"
    splits = build_datasets("fashion-mnist", val_size=5000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    labels = torch.as_tensor(splits.train.base.targets)
    assert torch.equal(labels.bincount(), torch.full((10,), 6000))
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_split_indices_and_argument_errors():
    train, val = split_indices(10, 3, seed=0)
    assert len(train) == 7 and len(val) == 3 and set(train.tolist()) | set(val.tolist()) == set(range(10))
    with pytest.raises(UserError, match="val_size"):
        split_indices(10, 10, seed=0)
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        build_datasets("mnist")
    with pytest.raises(UserError, match="limit"):
        build_datasets("synthetic", limit=0)
    with pytest.raises(UserError, match="val_size"):
        build_datasets("synthetic", val_size=-1)


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
