"""Benchmark: validation top-1 right after pruning (no fine-tuning), per criterion and amount.

How much a prune costs before fine-tuning repairs it: the model in ``--ckpt`` (by
default the decomposed ResNet-20 that ``make demo`` leaves in
``runs/demo/decomposed/final.pt``) is pruned by each criterion to each
``--target-macs`` fraction of *its own* MACs (passed to ``prune`` as the
fraction of the original model's MACs it amounts to), and scored on the validation split it was
selected on (rebuilt from the checkpoint's dataset and seed, as ``norton evaluate
--split val`` does).

``--layer NAME`` adds a second table: only that layer pruned by ``--layer-ratio``,
with the mean norm of the filters each criterion removed and kept.

    make demo && .venv/bin/python benchmarks/bench_prune_accuracy.py --layer layer3.1.conv1
    .venv/bin/python benchmarks/bench_prune_accuracy.py --ckpt other.pt --target-macs 0.9 0.5
"""
from __future__ import annotations

import argparse
import copy

import torch

from norton.complexity import count_complexity, original_complexity
from norton.deploy.timing import environment
from norton.pruning.engine import prune
from norton.serialization import load_checkpoint, model_from_state
from norton.training.datasets import build_datasets
from norton.training.loaders import build_loaders
from norton.training.loop import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/decomposed/final.pt")
    parser.add_argument("--criteria", nargs="+", default=["pabs", "csa", "vbd", "l1", "random"])
    parser.add_argument("--target-macs", type=float, nargs="+", default=[0.9, 0.69])
    parser.add_argument("--layer", default=None, help="also prune only this layer, by --layer-ratio")
    parser.add_argument("--layer-ratio", type=float, default=0.25)
    parser.add_argument("--val-size", type=int, default=2000, help="as the demo holds out (default 2000)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.ckpt)
    model = model_from_state(checkpoint).eval()
    dataset = checkpoint["metadata"].get("dataset", "fashion-mnist")
    splits = build_datasets(dataset, None, val_size=args.val_size, seed=0)
    loaders = build_loaders(splits, batch_size=500, workers=0, seed=0)
    size = tuple(splits.input_size)
    example = torch.zeros(1, *size)
    env = environment("cpu")
    print(f"torch {env['torch']}, {env['threads']} threads, device {env['device']}; {args.ckpt} on {dataset} "
          f"validation ({len(splits.val)} images), {count_complexity(model, size).macs / 1e6:.2f}M MACs")
    # prune()'s target_macs is a fraction of the original (undecomposed) model's MACs
    of_original = count_complexity(model, size).macs / original_complexity(model, size).macs
    print(f"unpruned: top-1 {evaluate(model, loaders.val, device='cpu', progress=False)['top1']:.2f}%")
    print(f"{'criterion':<10}" + "".join(f"{f'MACs x{t:g}':>14}" for t in args.target_macs))
    for criterion in args.criteria:
        cells = ""
        for target in args.target_macs:
            pruned = copy.deepcopy(model)
            prune(pruned, example, target_macs=target * of_original, criterion=criterion).eval()
            cells += f"{evaluate(pruned, loaders.val, device='cpu', progress=False)['top1']:>13.2f}%"
        print(f"{criterion:<10}{cells}", flush=True)
    if args.layer is None:
        return
    layer = model.get_submodule(args.layer)
    weight = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight
    norms = weight.detach().flatten(1).norm(dim=1)  # (N,)
    print(f"\nonly {args.layer} pruned by ratio {args.layer_ratio} ({norms.numel()} filters, mean norm {norms.mean():.3f})")
    print(f"{'criterion':<10}{'top-1':>9}{'removed norm':>14}{'kept norm':>11}")
    for criterion in args.criteria:
        pruned = prune(copy.deepcopy(model), example, ratio={args.layer: args.layer_ratio}, criterion=criterion).eval()
        removed = torch.zeros(norms.numel(), dtype=torch.bool)
        removed[pruned.norton_plan[-1]["removed"][args.layer]] = True
        top1 = evaluate(pruned, loaders.val, device="cpu", progress=False)["top1"]
        print(f"{criterion:<10}{top1:>8.2f}%{norms[removed].mean():>14.3f}{norms[~removed].mean():>11.3f}", flush=True)


if __name__ == "__main__":
    main()
