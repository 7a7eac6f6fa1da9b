"""Data and baseline of ``bench_pareto.py``: Fashion-MNIST splits, calibration batches, the cached baseline.

Fashion-MNIST is read by norton's own readers (:func:`norton.build_datasets`): 28x28 grey images
padded to 32x32 and kept single-channel (the zoo's CIFAR ResNets built with ``in_channels=1``).
All 60,000 training images train (``val_size=0``: no model selection anywhere, every run stops
after a fixed number of epochs); the 10,000 test images give every reported top-1.

The baseline is trained once per ``(model, epochs, seed)`` with :func:`norton.fit` in a folder
under ``--out`` (resumable: a killed baseline continues from its ``last.pt``) and saved with
:func:`norton.save` as ``baseline.pt``, which later runs load instead of training again.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import norton
from norton.training.datasets import DataSplits, TransformedSubset
from norton.training.loaders import Loaders

BATCH_SIZE = 128
# Epochs of each zoo model's baseline (its cache folder is keyed by them).
BASELINE_EPOCHS = {"resnet_20": 8, "resnet_56": 8}
# The baseline's recipe: SGD (momentum 0.9, weight decay 5e-4), lr 0.1, per-step cosine to 0, no warm-up.
BASELINE_RECIPE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0.0}
# Every compressed model's fine-tuning: the same SGD at lr 0.01, per-step cosine to 0, no warm-up.
# training_form: fit's default, written down so each row records it (rows without it trained their
# CPDBlocks as written: the same function, several times slower on a CPU).
FINETUNE_RECIPE = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0.0, "training_form": "dense"}


@dataclass(frozen=True)
class Data:
    """The splits (augmented training images), un-augmented training images for calibration, the input size."""

    splits: DataSplits
    plain_train: TransformedSubset  # the same training images with the evaluation transforms
    input_size: tuple[int, int, int]


def build_data(*, data_dir: str | None, limit: int | None, seed: int = 0, grey_to_rgb: bool = False) -> Data:
    """Fashion-MNIST as three splits (no validation split) plus the un-augmented training images.

    ``grey_to_rgb``: three identical channels, for a model trained on them (``norton demo``'s).
    """
    common = {"limit": limit, "val_size": 0, "seed": seed, "grey_to_rgb": grey_to_rgb, "pad_to_32": True}
    splits = norton.build_datasets("fashion-mnist", data_dir, **common)
    plain = norton.build_datasets("fashion-mnist", data_dir, augment=False, **common)
    assert isinstance(plain.train, TransformedSubset)  # what build_datasets makes
    return Data(splits=splits, plain_train=plain.train, input_size=splits.input_size)


def loaders_for(data: Data, seed: int) -> Loaders:
    """Loaders whose training order is seeded by ``seed`` (the order is fixed when the sampler is built)."""
    return norton.build_loaders(data.splits, batch_size=BATCH_SIZE, workers=0, seed=seed, eval_batch_size=500)


def calibration_batches(data: Data, *, images: int, seed: int, batch_size: int = BATCH_SIZE) -> list[tuple[Tensor, Tensor]]:
    """``images`` un-augmented training images drawn by ``seed``, as ``(x (B, 1, 32, 32), y (B,))`` batches."""
    count = min(images, len(data.plain_train))
    order = torch.randperm(len(data.plain_train), generator=torch.Generator().manual_seed(1000 + seed))[:count]
    pairs = [data.plain_train[int(i)] for i in order]
    x = torch.stack([image for image, _ in pairs])  # (n, 1, 32, 32)
    y = torch.tensor([label for _, label in pairs])  # (n,)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, count, batch_size)]


def baseline_dir(out: Path, model_name: str, epochs: int, seed: int, tag: str = "") -> Path:
    """The cache folder of one baseline: keyed by model, epochs and seed (and ``tag``: quick runs)."""
    return out / "baseline" / f"{model_name}-e{epochs}-s{seed}{tag}"


def fingerprint(model: nn.Module) -> str:
    """12 hex digits of a SHA-256 over ``model``'s state dict (names, dtypes, shapes and values).

    A fresh clone trains the baseline again (weights are not committed); rows measured on two
    baselines that differ in a single bit carry different fingerprints.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()[:12]


def trained_baseline(
    data: Data, out: Path, *, model_name: str, epochs: int, seed: int, device: str, tag: str = "", log: Any = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """The cached baseline of ``(model_name, epochs, seed)``, trained (or resumed) first if missing.

    Returns ``(model in eval mode, metadata)``; the metadata holds its test top-1 and training seconds.
    """
    folder = baseline_dir(out, model_name, epochs, seed, tag)
    path = folder / "baseline.pt"
    if path.is_file():
        metadata = norton.load_checkpoint(path)["metadata"]
        log(f"baseline: {path} (cached; test top-1 {metadata['test_top1']:.2f}%, "
            f"trained {metadata['epochs']} epochs in {metadata['train_seconds'] / 60:.1f} min)")
        return norton.load(path), dict(metadata)
    resume = (folder / "last.pt").is_file()
    log(f"baseline: training {model_name} for {epochs} epochs on {len(data.splits.train)} images "
        f"into {folder}{' (resuming)' if resume else ''}")
    torch.manual_seed(seed)
    model = norton.create_model(model_name, num_classes=data.splits.num_classes, in_channels=data.splits.in_channels)
    started = time.perf_counter()
    result = norton.fit(model, loaders_for(data, seed), epochs=epochs, **BASELINE_RECIPE, device=device,
                        output_dir=folder, resume=resume, seed=seed, progress=False)
    # A resumed run's earlier epochs count too: their seconds are in the history.
    seconds = sum(record["seconds"] for record in result.history) if result.history else time.perf_counter() - started
    assert result.test is not None  # the test loader always exists
    metadata = {"arch": model_name, "epochs": epochs, "seed": seed, "test_top1": result.test["top1"],
                "train_seconds": seconds, "train_images": len(data.splits.train), "recipe": BASELINE_RECIPE,
                "batch_size": BATCH_SIZE}
    norton.save(model, path, **metadata)
    log(f"baseline: test top-1 {result.test['top1']:.2f}% after {epochs} epochs, {seconds / 60:.1f} min")
    return model.eval(), metadata
