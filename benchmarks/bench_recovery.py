"""Benchmark: data-aware recovery (``refit_pruned_consumers``) on the zoo's CIFAR ResNets.

Each model (random weights, BatchNorm statistics from one calibration batch) is pruned
with ``norton.prune(..., ratio=0.5)``, then refitted on random 3x32x32 images; the
median of ``--repeats`` runs is printed next to one forward of the unpruned model over
the same images (how fast the machine is at the moment: on shared cores this moves a lot).

    .venv/bin/python benchmarks/bench_recovery.py                        # resnet_20 and resnet_56, 512 images, 2 threads
    .venv/bin/python benchmarks/bench_recovery.py --models resnet_56 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import norton
from norton.recovery import recalibrate_batchnorm, refit_pruned_consumers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet_20", "resnet_56"])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="calibration batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = list(x.split(args.batch))
    for name in args.models:
        torch.manual_seed(0)
        original = recalibrate_batchnorm(norton.create_model(name), inputs[:1]).eval()
        pruned = norton.prune(copy.deepcopy(original), torch.zeros(1, 3, 32, 32), ratio=0.5)
        refit, forward = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                for batch in inputs:
                    original(batch)
            forward.append(time.perf_counter() - start)
            model = copy.deepcopy(pruned)
            start = time.perf_counter()
            layers = refit_pruned_consumers(original, model, inputs)
            refit.append(time.perf_counter() - start)
        print(f"{name}: {len(layers)} layers refitted on {args.images} images, {args.threads} threads: "
              f"{statistics.median(refit):.2f} s (median of {[round(t, 2) for t in refit]}); "
              f"one forward of the unpruned model {statistics.median(forward):.2f} s", flush=True)


if __name__ == "__main__":
    main()
