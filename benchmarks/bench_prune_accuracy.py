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

``--calibration N`` adds, per criterion, the same prunes followed by data-aware recovery
on ``N`` un-augmented training images (labels unused; none of them in the validation
split): BatchNorm re-estimation only (``+bn``), the least-squares refit of the pruned
consumers only (``+refit``), and both (``+refit+bn``, what ``prune(calibration=...)`` does).

    make demo && .venv/bin/python benchmarks/bench_prune_accuracy.py --layer layer3.1.conv1
    .venv/bin/python benchmarks/bench_prune_accuracy.py --ckpt other.pt --target-macs 0.9 0.5
    .venv/bin/python benchmarks/bench_prune_accuracy.py --criteria pabs --calibration 512
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.data import DataLoader, Subset

from norton.complexity import count_complexity, original_complexity
from norton.deploy.timing import environment
from norton.pruning.engine import prune
from norton.recovery import recalibrate_batchnorm, refit_pruned_consumers
from norton.serialization import load_model_file
from norton.training.datasets import build_datasets
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
    parser.add_argument("--split", choices=["val", "test"], default="val", help="the split scored (default val)")
    parser.add_argument("--eval-images", type=int, default=None, metavar="N", help="score the first N images only")
    parser.add_argument("--calibration", type=int, default=0, metavar="N",
                        help="also recover on N training images after each prune (0: no)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, trained_with = load_model_file(args.ckpt)  # a norton file or a training checkpoint
    model.eval()
    dataset = trained_with.get("dataset") or "fashion-mnist"
    splits = build_datasets(dataset, None, val_size=args.val_size, seed=0)
    scored = splits.val if args.split == "val" else splits.test
    if args.eval_images:
        scored = Subset(scored, range(min(args.eval_images, len(scored))))
    loader = DataLoader(scored, batch_size=500)
    size = tuple(splits.input_size)
    example = torch.zeros(1, *size)
    env = environment("cpu")
    print(f"torch {env['torch']}, {env['threads']} threads, device {env['device']}; {args.ckpt} on {dataset} "
          f"{args.split} split ({len(scored)} images), {count_complexity(model, size).macs / 1e6:.2f}M MACs")
    # prune()'s target_macs is a fraction of the original (undecomposed) model's MACs
    of_original = count_complexity(model, size).macs / original_complexity(model, size).macs
    print(f"unpruned: top-1 {evaluate(model, loader, device='cpu', progress=False)['top1']:.2f}%")
    inputs = calibration_images(splits, args.calibration) if args.calibration else []
    variants = ["", "+bn", "+refit", "+refit+bn"] if inputs else [""]
    print(f"{'criterion':<16}" + "".join(f"{f'MACs x{t:g}':>14}" for t in args.target_macs) + f"{'recovery s':>12}")
    for criterion in args.criteria:
        for variant in variants:
            cells, seconds = "", 0.0
            for target in args.target_macs:
                pruned = prune(copy.deepcopy(model), example, target_macs=target * of_original, criterion=criterion)
                start = time.perf_counter()
                if "refit" in variant:
                    refit_pruned_consumers(model, pruned, inputs)
                if "bn" in variant:
                    recalibrate_batchnorm(pruned, inputs)
                seconds += time.perf_counter() - start
                cells += f"{evaluate(pruned.eval(), loader, device='cpu', progress=False)['top1']:>13.2f}%"
            timing = f"{seconds / len(args.target_macs):>12.1f}" if variant else ""
            print(f"{criterion + variant:<16}{cells}{timing}", flush=True)
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
        top1 = evaluate(pruned, loader, device="cpu", progress=False)["top1"]
        print(f"{criterion:<10}{top1:>8.2f}%{norms[removed].mean():>14.3f}{norms[~removed].mean():>11.3f}", flush=True)


def calibration_images(splits, count: int) -> list[torch.Tensor]:
    """``count`` training images with the evaluation transforms (no augmentation), in batches of 128."""
    plain = build_datasets(splits.name, None, val_size=len(splits.val), seed=0, augment=False).train
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(0))[:count]
    images = torch.stack([plain[int(i)][0] for i in order])  # (count, C, H, W); labels not read
    return list(images.split(128))


if __name__ == "__main__":
    main()
