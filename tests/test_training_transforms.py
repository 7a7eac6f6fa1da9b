"""Tests for norton.training.transforms: the tensor augmentations against their definitions."""
from __future__ import annotations

import pytest
import torch

from _training_files import CIFAR10_MEAN, CIFAR10_STD
from norton.errors import UserError
from norton.training.transforms import RandomCrop, RandomHorizontalFlip, build_transforms


def test_eval_transform_normalises_with_dataset_statistics():
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = build_transforms("cifar10", train=False)(image)
    expected = (128 / 255 - CIFAR10_MEAN) / CIFAR10_STD
    torch.testing.assert_close(out, expected.expand(3, 32, 32))


def test_random_crop_returns_a_window_of_the_padded_image():
    torch.manual_seed(0)
    image = torch.arange(3 * 8 * 8).remainder(251).to(torch.uint8).view(3, 8, 8)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))  # (3, 12, 12)
    windows = {(t, l): padded[:, t:t + 8, l:l + 8] for t in range(5) for l in range(5)}  # noqa: E741
    seen = set()
    for _ in range(60):
        crop = RandomCrop(8, padding=2)(image)
        seen |= {key for key, window in windows.items() if torch.equal(window, crop)}
    assert len(seen) > 5 and seen <= set(windows)


def test_random_flip_mirrors_about_half_the_time():
    torch.manual_seed(0)
    image = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    outputs = [RandomHorizontalFlip()(image) for _ in range(200)]
    flipped = sum(torch.equal(o, image.flip(-1)) for o in outputs)
    assert sum(torch.equal(o, image) for o in outputs) + flipped == 200 and 60 < flipped < 140


def test_train_transform_differs_from_eval_transform():
    torch.manual_seed(0)
    image = torch.arange(3 * 32 * 32).remainder(251).to(torch.uint8).view(3, 32, 32)
    train, evaluate = build_transforms("cifar10", train=True), build_transforms("cifar10", train=False)
    outputs = [train(image) for _ in range(10)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert sum(torch.equal(o, evaluate(image)) for o in outputs) < 10


def test_fashion_mnist_transform_pads_with_black_and_repeats_the_channel():
    out = build_transforms("fashion-mnist", train=False)(torch.full((1, 28, 28), 255, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[2])
    black, white = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530
    assert out[:, 0, :].allclose(torch.tensor(black)) and out[:, 2:30, 2:30].allclose(torch.tensor(white))


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        build_transforms("mnist", train=True)
