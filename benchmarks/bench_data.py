"""Benchmark: norton's uint8 tensor transforms vs torchvision's v2 transforms, per CIFAR training image.

Both sides run the paper's CIFAR training augmentation (RandomCrop(32, padding=4),
RandomHorizontalFlip, to float, Normalize) on the same uint8 ``(3, 32, 32)``
images, one image per call, as a DataLoader worker does. A third row times one
epoch of a 45,000-image CIFAR-sized training split through ``build_loaders``
(synthetic images, batch 256, no workers), to put the per-image cost in context.

    .venv/bin/python benchmarks/bench_data.py               # 1 thread, 2,000 images, 7 repeats
    .venv/bin/python benchmarks/bench_data.py --threads 2 --images 5000
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
from torchvision.transforms import v2

from norton.training.datasets import TensorImageDataset, build_datasets, synthetic_images
from norton.training.loaders import build_loaders
from norton.training.transforms import STATS, build_transforms


def median_seconds(fn, *, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall-clock and median process-CPU seconds of ``fn()`` (the machine may be shared)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-epoch", action="store_true", help="skip the one-epoch loader row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, _ = synthetic_images(args.images, seed=0)  # (N, 3, 32, 32) uint8
    mean, std = STATS["cifar10"]
    sides = {
        "norton tensor transforms": build_transforms("cifar10", train=True),
        "torchvision v2 transforms": v2.Compose([
            v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor(),
        ]),
    }
    rows = []
    for name, transform in sides.items():
        wall, cpu = median_seconds(lambda t=transform: [t(image) for image in images], repeats=args.repeats)
        rows.append((name, 1e6 * wall / args.images, 1e6 * cpu / args.images))

    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu ({machine})")
    print(f"{args.images} CIFAR-sized uint8 images, median of {args.repeats} runs\n")
    print(f"{'per training image':<28} {'wall us':>9} {'CPU us':>9}")
    for name, wall_us, cpu_us in rows:
        print(f"{name:<28} {wall_us:>9.1f} {cpu_us:>9.1f}")
    print(f"{'speed-up (torchvision / norton)':<28} {rows[1][1] / rows[0][1]:>8.2f}x {rows[1][2] / rows[0][2]:>8.2f}x")

    if not args.skip_epoch:
        splits = build_datasets("synthetic", val_size=0)
        big_images, big_labels = synthetic_images(45_000, seed=0)
        cifar_train = build_transforms("cifar10", train=True)
        splits = dataclasses.replace(splits, train=TensorImageDataset(big_images, big_labels, cifar_train))
        loader = build_loaders(splits, batch_size=256).train
        wall, cpu = median_seconds(lambda: sum(len(labels) for _, labels in loader), repeats=3, warmup=0)
        print(f"\none epoch of 45,000 images through build_loaders (batch 256, no workers): "
              f"{wall:.2f} s wall, {cpu:.2f} s CPU, {45_000 / wall:,.0f} images/s")


if __name__ == "__main__":
    main()
