"""auto_compress: top-1 right after compression (no fine-tuning) and how long it takes.

Two tables, each beside the command that prints it (docs/auto_compress.md):

* **accuracy**: a trained Fashion-MNIST model (``--ckpt``, default the demo's baseline
  ``runs/demo/baseline/best.pt``, written by ``make demo``) compressed to each budget by
  ``auto_compress`` (with and without recovery) and by uniform pruning (``l1`` and the
  paper's ``pabs``), scored on the first ``--test-images`` test images; calibration is
  512 training images, labels unused;
* **methods** (``--methods-table``): ResNet-20 on grey Fashion-MNIST (``in_channels=1``,
  ``--methods-ckpt``, trained for ``--train-epochs`` with ``norton.fit`` when missing)
  compressed by ``auto_compress`` offering each ``--methods`` set (comma-separated names),
  top-1 on the ``--test-images`` test images, no fine-tuning;
* **time**: ``auto_compress`` of ``--time-model`` (default the zoo's ResNet-56) at CIFAR
  size with 512 random calibration images, median of ``--repeats`` runs after a warm-up.

    python benchmarks/bench_auto.py --budgets 0.5 0.3 0.2 0.1
    python benchmarks/bench_auto.py --skip-accuracy --repeats 3
    python benchmarks/bench_auto.py --methods-table --budgets 0.5 0.3 --methods cp-filter cp-filter,tucker2,cp-layer,svd
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import platform
import statistics
import time
from typing import Any

import torch

import norton


def _calibration_and_test(splits: Any, test_images: int) -> tuple[list[torch.Tensor], list, torch.Tensor]:
    """512 training images as calibration batches, ``test_images`` test batches, and a 1-image example."""
    calibration = [x for x, _ in _subset(splits.train, 512, 128)]
    return calibration, _subset(splits.test, test_images, 500), torch.zeros(1, *calibration[0].shape[1:])


def _subset(dataset, count: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = zip(*(dataset[i] for i in range(min(count, len(dataset)))), strict=True)
    return list(zip(torch.stack(images).split(batch), torch.tensor(labels).split(batch), strict=True))


@torch.no_grad()
def top1(model: torch.nn.Module, batches) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return 100.0 * correct / sum(len(y) for _, y in batches)


def accuracy_table(args: argparse.Namespace) -> None:
    from norton.serialization import load_model_file
    from norton.training.datasets import build_datasets

    model = load_model_file(args.ckpt)[0].eval()
    calibration, test, x = _calibration_and_test(build_datasets("fashion-mnist", augment=False), args.test_images)
    print(f"baseline top-1 {top1(model, test):.2f}% on {sum(len(y) for _, y in test)} test images")
    print("| MACs kept | auto_compress | auto, no recovery | uniform l1 | uniform pabs | auto seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for budget in args.budgets:
        started = time.perf_counter()
        auto = norton.auto_compress(model, x, target_macs=budget, calibration=calibration, progress=False)
        seconds = time.perf_counter() - started
        plain = norton.auto_compress(model, x, target_macs=budget, calibration=calibration, progress=False,
                                     recover=False)
        uniform = {}
        for criterion in ("l1", "pabs"):
            pruned = copy.deepcopy(model)
            norton.prune(pruned, x, target_macs=budget, criterion=criterion)
            uniform[criterion] = top1(pruned, test)
        print(f"| {budget:g} | {top1(auto, test):.2f} | {top1(plain, test):.2f} | {uniform['l1']:.2f} | "
              f"{uniform['pabs']:.2f} | {seconds:.1f} |", flush=True)


def _grey_baseline(path: str, epochs: int):
    """ResNet-20 (1 input channel) trained on Fashion-MNIST for ``epochs``, cached at ``path``."""
    from norton.serialization import load_model_file
    from norton.training.datasets import build_datasets
    from norton.training.loaders import build_loaders

    if os.path.exists(path):
        return load_model_file(path)[0].eval()
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10, in_channels=1)
    splits = build_datasets("fashion-mnist", grey_to_rgb=False)
    loaders = build_loaders(splits, batch_size=128, eval_batch_size=500)
    result = norton.fit(model, loaders, epochs=epochs, lr=0.1, weight_decay=5e-4, progress=False)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    norton.save(model, path, epochs=epochs, test_top1=float(result.test["top1"]))
    return model.eval()


def methods_table(args: argparse.Namespace) -> None:
    from norton.training.datasets import build_datasets

    model = _grey_baseline(args.methods_ckpt, args.train_epochs)
    calibration, test, x = _calibration_and_test(
        build_datasets("fashion-mnist", augment=False, grey_to_rgb=False), args.test_images)
    print(f"grey ResNet-20 baseline top-1 {top1(model, test):.2f}% on {sum(len(y) for _, y in test)} test images")
    print("| MACs kept | methods offered | top-1 | top-1, no recovery | layers per method | seconds |")
    print("|---:|---|---:|---:|---|---:|")
    for budget in args.budgets:
        for names in args.methods:
            methods = tuple(names.split(","))
            started = time.perf_counter()
            auto = norton.auto_compress(model, x, target_macs=budget, calibration=calibration, progress=False,
                                        methods=methods)
            seconds = time.perf_counter() - started
            plain = norton.auto_compress(model, x, target_macs=budget, calibration=calibration, progress=False,
                                         methods=methods, recover=False)
            chosen = collections.Counter(auto.norton_auto_report.methods.values())
            used = ", ".join(f"{m} {n}" for m, n in sorted(chosen.items())) or "none (pruning only)"
            print(f"| {budget:g} | {names} | {top1(auto, test):.2f} | {top1(plain, test):.2f} | {used} | "
                  f"{seconds:.1f} |", flush=True)


def time_table(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = norton.create_model(args.time_model, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    calibration = [torch.randn(128, 3, 32, 32) for _ in range(4)]
    norton.auto_compress(model, x, target_macs=0.5, calibration=calibration[:1], progress=False)  # warm-up
    for recover in (True, False):
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            norton.auto_compress(model, x, target_macs=0.5, calibration=calibration, progress=False, recover=recover)
            seconds.append(time.perf_counter() - started)
        print(f"| {args.time_model} | 512 | {'yes' if recover else 'no'} | {statistics.median(seconds):.1f} |"
              f" {min(seconds):.1f}-{max(seconds):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/demo/baseline/best.pt")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--time-model", default="resnet_56")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--methods-table", action="store_true", help="only the methods table")
    parser.add_argument("--methods", nargs="+", default=["cp-filter", "cp-filter,tucker2,cp-layer,svd"])
    parser.add_argument("--methods-ckpt", default="runs/bench_auto/resnet20_fmnist_grey.pt")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores")
    if args.methods_table:
        methods_table(args)
        return
    if not args.skip_accuracy:
        accuracy_table(args)
    if not args.skip_time:
        print("| model | calibration images | recovery | median s | range s |")
        print("|---|---:|---|---:|---:|")
        time_table(args)


if __name__ == "__main__":
    main()
