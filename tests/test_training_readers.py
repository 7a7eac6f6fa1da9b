"""Tests for norton.training.readers: on-disk formats written here, the look-up rules, and errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import norton.training.readers as readers
from _training_files import FASHION_STEMS, cifar_batch, make_cifar10, make_fashion, make_image_folders, write_idx
from norton.errors import UserError
from norton.training.datasets import build_datasets
from norton.training.readers import find_fashion_mnist, read_cifar, read_fashion_mnist, read_idx

# --------------------------------------------------------------------------- CIFAR


def test_read_cifar10_concatenates_the_batches_in_order(tmp_path):
    make_cifar10(tmp_path, per_batch=4)
    (train_images, train_labels), (test_images, test_labels), classes = read_cifar("cifar10", tmp_path)
    assert classes == 10 and train_images.shape == (20, 3, 32, 32) and train_images.dtype == torch.uint8
    assert train_images[:, 0, 0, 0].tolist() == list(range(20)) and train_labels.tolist() == [i % 10 for i in range(20)]
    assert test_images.shape == (6, 3, 32, 32) and test_labels.tolist() == [i % 10 for i in range(200, 206)]


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    folder = make_cifar10(tmp_path)
    assert read_cifar("cifar10", folder)[1][0].shape[0] == 6


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    cifar_batch(folder / "train", first=0, n=10, label_key="fine_labels", num_classes=100)
    cifar_batch(folder / "test", first=150, n=3, label_key="fine_labels", num_classes=100)
    _, (_, labels), classes = read_cifar("cifar100", tmp_path)
    assert classes == 100 and labels.tolist() == [50, 51, 52]


def test_missing_cifar_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*cifar-10-batches-py: download it with --download"):
        read_cifar("cifar10", tmp_path)


def test_malformed_cifar_batch_is_a_user_error(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR python batch"):
        read_cifar("cifar10", tmp_path)


def test_cifar_batch_with_wrong_shape_is_a_user_error(tmp_path):
    folder = make_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(UserError, match=r"expected \(N, 3072\) uint8"):
        read_cifar("cifar10", tmp_path)


def test_cifar_labels_out_of_range_are_a_user_error(tmp_path):
    folder = make_cifar10(tmp_path)
    cifar_batch(folder / "test_batch", first=0, n=3, num_classes=1000)  # labels 0, 1, 2 ... fine
    cifar_batch(folder / "data_batch_2", first=20, n=3, num_classes=256)  # labels 20, 21, 22: not CIFAR-10
    with pytest.raises(UserError, match="fall outside 0..9"):
        read_cifar("cifar10", tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path, capsys):
    folder = make_cifar10(tmp_path)
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({"data": _Payload(), "labels": []}, handle)
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        read_cifar("cifar10", tmp_path)
    assert "pwned" not in capsys.readouterr().out


# --------------------------------------------------------------------------- ImageNet folders


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


def test_imagenet_needs_a_folder():
    with pytest.raises(UserError, match="ImageNet needs --data_dir"):
        build_datasets("imagenet")


# --------------------------------------------------------------------------- idx files


def test_read_idx_round_trip_and_header_checks(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert torch.equal(read_idx(tmp_path / "a.gz"), torch.from_numpy(array))
    write_idx(tmp_path / "plain", array, compress=False)
    assert torch.equal(read_idx(tmp_path / "plain"), torch.from_numpy(array))
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4)  # float32 type code
    with pytest.raises(UserError, match="not a uint8 idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "short")


# --------------------------------------------------------------------------- Fashion-MNIST: where it is read from


@pytest.fixture
def system_copy(tmp_path, monkeypatch):
    """A complete stand-in for Debian's copy, 30 training images (the --data_dir copies have 12)."""
    folder = make_fashion(tmp_path / "system", n_train=30, n_test=7)
    monkeypatch.setattr(readers, "DEBIAN_FASHION_MNIST", folder)
    monkeypatch.setattr(readers, "DEFAULT_DATA_DIR", tmp_path / "no-home-data")
    return folder


def train_size(root) -> int:
    return read_fashion_mnist(root)[0][0].shape[0]


def test_without_a_folder_the_system_copy_is_used(system_copy):
    assert find_fashion_mnist() == system_copy and train_size(None) == 30


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_a_complete_data_dir_is_used_instead_of_the_system_copy(system_copy, tmp_path, layout):
    folder = make_fashion(tmp_path / "mine" / layout, n_train=12, compress=layout != "")
    assert find_fashion_mnist(tmp_path / "mine") == folder and train_size(tmp_path / "mine") == 12


def test_a_missing_data_dir_is_refused_not_replaced(system_copy, tmp_path):
    with pytest.raises(UserError, match=r"--data_dir .*nowhere does not exist"):
        read_fashion_mnist(tmp_path / "nowhere")
    assert find_fashion_mnist(tmp_path / "nowhere") is None


def test_an_empty_data_dir_is_refused_not_replaced(system_copy, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--data_dir .*empty holds no Fashion-MNIST idx files"):
        build_datasets("fashion-mnist", tmp_path / "empty")


@pytest.mark.parametrize("missing", FASHION_STEMS)
def test_an_incomplete_data_dir_names_the_missing_file(system_copy, tmp_path, missing):
    folder = make_fashion(tmp_path / "mine")
    (folder / f"{missing}.gz").unlink()
    with pytest.raises(UserError, match=rf"Fashion-MNIST in .*mine is incomplete: {missing}\[\.gz\] is missing; add the file"):
        build_datasets("fashion-mnist", folder)


def test_an_incomplete_subfolder_is_the_one_named(system_copy, tmp_path):
    folder = make_fashion(tmp_path / "mine" / "FashionMNIST" / "raw")
    for stem in FASHION_STEMS[1:]:
        (folder / f"{stem}.gz").unlink()
    with pytest.raises(UserError, match=r"FashionMNIST/raw is incomplete: train-labels-idx1-ubyte\[\.gz\] is "
                                        r"missing \(and 2 more\)"):
        build_datasets("fashion-mnist", tmp_path / "mine")


def test_no_copy_anywhere_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(readers, "DEFAULT_DATA_DIR", tmp_path / "nothing")
    with pytest.raises(UserError, match="Fashion-MNIST not found .*dataset-fashion-mnist"):
        build_datasets("fashion-mnist")


def test_fashion_mnist_with_mismatched_files_is_a_user_error(tmp_path):
    make_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(UserError, match="do not match"):
        build_datasets("fashion-mnist", tmp_path)
