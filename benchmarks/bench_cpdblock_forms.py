"""Benchmark: one layer, dense 3x3 conv vs the equivalent forms of a rank-R CPDBlock.

Inference (forward, ``torch.no_grad``), each in NCHW and channels-last:
``dense`` (the original ``nn.Conv2d``), ``cpd`` (pointwise -> k x 1 -> 1 x k -> rank
sum), ``merged`` (pointwise -> one depthwise k x k -> rank sum), ``grouped``
(pointwise -> ``Conv2d(N*R, N, k, groups=N)``, the rank sum folded in).
Training (forward + backward, NCHW): the dense conv against the CPDBlock training
forms of :mod:`norton.deploy.forms` (``dense`` = the kernel rebuilt from the factors
every step by one batched matmul, then one conv).

Training step (``--no-step`` skips it): one SGD step (forward, cross-entropy,
backward, update) of a CIFAR ResNet-20, dense vs its 3x3 convs as rank-R CPDBlocks
computed as written (``cpd``) vs the same model after
:func:`norton.deploy.optimize.optimize_for_training` (per-layer fastest form); and the
same for the README's pruned ResNet-56 and its `--round-to 16` twin (bench_latency.py) against
the dense ResNet-56.

Every row times its candidates interleaved (see :func:`norton.deploy.timing.compare_callables`)
and reports medians in ms and the ratio to the dense conv (> 1: faster than dense).

    .venv/bin/python benchmarks/bench_cpdblock_forms.py                 # 2 threads, default table
    .venv/bin/python benchmarks/bench_cpdblock_forms.py --repeats 30 --threads 1
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.forms import INFERENCE_FORMS, TRAINING_FORMS, build_form, set_training_form
from norton.deploy.optimize import optimize_for_training
from norton.deploy.timing import compare_callables, environment

# (label, channels, side, batch, ranks)
LAYERS = [
    ("ImageNet stage 1", 64, 56, 1, (1, 2, 4, 8)),
    ("ImageNet stage 1", 64, 56, 8, (1, 4)),
    ("CIFAR stage 1", 16, 32, 32, (1, 4, 7)),
    ("CIFAR stage 2", 32, 16, 32, (1, 4, 7)),
    ("CIFAR stage 3", 64, 8, 32, (1, 4, 7)),
    ("VGG-CIFAR wide", 512, 4, 32, (1, 4)),
]

# Models of the training-step table, each against its dense architecture: "arch/rank"
# decomposes every 3x3 conv; the others are bench_latency.py's configurations.
STEP_MODELS = ["resnet_20/1", "resnet_20/4", "resnet_56", "resnet_56/round16"]


def inference_row(channels: int, side: int, batch: int, rank: int, fmt: torch.memory_format, args) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    block = CPDBlock(channels, channels, rank, 3, padding=1, bias=False).eval()
    x = torch.randn(batch, channels, side, side).to(memory_format=fmt)
    modules = {"dense": conv} | {f"{form}": build_form(block, form) for form in INFERENCE_FORMS if form != "dense"}
    for module in modules.values():
        module.to(memory_format=fmt)

    def runner(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    stats = compare_callables({k: runner(m) for k, m in modules.items()}, warmup=args.warmup, repeats=args.repeats)
    return {k: s.median_ms for k, s in stats.items()}


def training_row(channels: int, side: int, batch: int, rank: int, args) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    block = CPDBlock(channels, channels, rank, 3, padding=1, bias=False)
    x = torch.randn(batch, channels, side, side, requires_grad=True)
    grad = torch.randn(batch, channels, side, side)

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(grad)
        return run

    runners = {"dense conv": step(conv)}
    for form in TRAINING_FORMS:
        variant = copy.deepcopy(block)
        set_training_form(variant, form)
        runners[f"{form}"] = step(variant)
    stats = compare_callables(runners, warmup=args.warmup, repeats=args.repeats)
    return {k: s.median_ms for k, s in stats.items()}


def step_models(name: str) -> tuple[nn.Module, nn.Module, str]:
    """``(dense, compressed, how)`` for one entry of ``STEP_MODELS``."""
    from norton.models import create_model

    arch, _, variant = name.partition("/")
    if variant.isdigit():
        return create_model(arch), create_model(arch, rank=int(variant)), f"rank {variant}"
    import bench_latency  # this folder is on sys.path when a script here runs

    return bench_latency.build(name, argparse.Namespace(als_iterations=5))


def training_step_row(name: str, batch: int, args) -> tuple[dict, dict, str]:
    """SGD step times: the dense model, the CPDBlock model as written, and after optimize_for_training."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))
    dense, decomposed, how = step_models(name)
    dense, decomposed = dense.train(), decomposed.train()
    tuned = copy.deepcopy(decomposed)
    chosen = optimize_for_training(tuned, x)

    def step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        return run

    runners = {"dense": step(dense), "cpd": step(decomposed), "tuned": step(tuned)}
    stats = compare_callables(runners, warmup=args.warmup, repeats=max(3, args.repeats // 3))
    from collections import Counter

    return {k: s.median_ms for k, s in stats.items()}, dict(Counter(chosen.values())), how


def print_table(title: str, rows: list[tuple[str, dict]], baseline: str) -> None:
    names = list(rows[0][1])
    print(f"\n{title} (median ms; in brackets: {baseline} time / form time)")
    print(f"{'layer':<44}" + "".join(f"{n:>18}" for n in names) + f"{'fastest':>12}")
    for label, times in rows:
        cells = "".join(f"{times[n]:>9.3f} ({times[baseline] / times[n]:>4.2f}x)" for n in names)
        print(f"{label:<44}{cells}{min(times, key=times.get):>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-training", action="store_true", help="skip the forward+backward table")
    parser.add_argument("--no-step", action="store_true", help="skip the ResNet-20 training-step table")
    parser.add_argument("--step-batch", type=int, default=64, help="batch size of the training step (default 64)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"torch {env['torch']}, {env['threads']} threads, device {env['device']} ({env['device_name']}, "
          f"{env['cpu_count']} logical CPUs); 3x3 convs, stride 1, padding 1, N = C_in")
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
        rows = []
        for label, channels, side, batch, ranks in LAYERS:
            for rank in ranks:
                name = f"{label}: {channels}ch {side}x{side} B={batch} R={rank}"
                rows.append((name, inference_row(channels, side, batch, rank, fmt, args)))
        print_table(f"Inference, forward only, {fmt_name}", rows, "dense")
    if not args.no_training:
        rows = []
        for label, channels, side, batch, ranks in LAYERS:
            for rank in ranks:
                name = f"{label}: {channels}ch {side}x{side} B={batch} R={rank}"
                rows.append((name, training_row(channels, side, batch, rank, args)))
        print_table("Training, forward + backward, NCHW", rows, "dense conv")
    if not args.no_step:
        print(f"\nTraining step, batch {args.step_batch}, SGD (median ms; dense time / time)")
        for name in STEP_MODELS:
            times, forms, how = training_step_row(name, args.step_batch, args)
            cells = "  ".join(f"{k} {v:.1f} ({times['dense'] / v:.2f}x)" for k, v in times.items())
            print(f"  {name} ({how}): {cells}   tuned forms: {forms}")


if __name__ == "__main__":
    main()
