"""``norton train``: train a zoo model (or fine-tune a model file) with checkpoints, resume and DDP.

One process::

    norton train --arch resnet_56 --dataset cifar10 --data_dir ~/data --output runs/r56

Several GPUs (one process each)::

    torchrun --nproc_per_node=4 -m norton.cli.main train --arch resnet_50 --dataset imagenet ...

Fine-tuning a compressed model with its uncompressed original as teacher (knowledge distillation)::

    norton train --ckpt compressed.pt --teacher baseline.pt --distill-alpha 0.5 --distill-temperature 4
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from norton.cli import _options as options
from norton.errors import UserError
from norton.io import json_text
from norton.limits import check_loader_options, check_split_options
from norton.models import create_model
from norton.serialization import load_model_file
from norton.training.checkpoint import check_output_dir
from norton.training.datasets import build_datasets
from norton.training.distillation import check_teacher
from norton.training.distributed import DistributedContext, cleanup_distributed, init_distributed, seed_everything
from norton.training.loaders import build_loaders
from norton.training.loop import fit
from norton.training.recipes import TrainingRecipe, recipe_for
from norton.workflow import check_model_fits, default_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (baseline), or fine-tune a model file",
        description="Train --arch (with -r/-cpr) from scratch, or fine-tune the model in --ckpt, on --dataset. "
        "Picks the best epoch on a validation split held out from the training set, then reports the "
        "test accuracy of that epoch. Writes metrics.jsonl, last.pt, best.pt and result.json to --output. "
        "A run whose loss turns NaN or infinite stops with an error (lower --lr).",
    )
    options.add_model_options(parser)
    options.add_ckpt_option(parser, help="fine-tune this model file instead of training a fresh --arch: a norton "
                                         "file, a training checkpoint, or with --arch/-r/-cpr the authors' "
                                         "released checkpoint; uses the fine-tuning recipe")
    options.add_data_options(parser)
    options.add_training_options(parser)
    options.add_distillation_options(parser, teacher_file=True)
    options.add_run_options(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def _recipe(args: argparse.Namespace, dataset: str, stage: str) -> TrainingRecipe:
    """The dataset's recipe for ``stage`` with the options given (``None``: not given)."""
    return recipe_for(dataset, stage=stage, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, amp=args.amp, distill_alpha=args.distill_alpha,
                      distill_temperature=args.distill_temperature)


def run(args: argparse.Namespace) -> int:
    if args.arch is None and args.ckpt is None:
        raise UserError("give --arch (a model to train from scratch) or --ckpt (a model file to fine-tune)")
    stage = "finetune" if args.ckpt is not None else "train"
    # Typos (--lr nan, --epochs 0, --batch_size 0, ...) fail here, before any file or data is read;
    # the dataset's own recipe is checked again once the dataset is known.
    options.distillation_options(args, switch="--teacher FILE", on=args.teacher is not None)
    _recipe(args, args.dataset or "cifar10", stage)
    check_split_options(limit=args.limit, val_size=args.val_size)
    check_loader_options(batch_size=args.batch_size, workers=args.workers)
    context = init_distributed(args.device)
    try:
        return _train(args, context, stage)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, context: DistributedContext, stage: str) -> int:
    seed_everything(args.seed)  # the same initial weights on every rank
    model: nn.Module | None = None
    trained_with: dict[str, Any] = {}
    arch = args.arch
    if args.ckpt is not None:
        model, trained_with = load_model_file(args.ckpt, arch=args.arch, rank=args.rank,
                                              compress_rate=args.compress_rate)
        arch = (getattr(model, "norton_architecture", None) or {}).get("name")
    teacher = None if args.teacher is None else load_model_file(args.teacher)[0]
    dataset = args.dataset or trained_with.get("dataset") or default_dataset(arch)
    arch = arch or "model"
    recipe = _recipe(args, dataset, stage)
    output = args.output or f"runs/{arch}-{dataset}"
    check_output_dir(output, resume=args.resume)  # before minutes of data loading
    splits = build_datasets(dataset, args.data_dir, limit=args.limit, val_size=args.val_size, seed=args.seed,
                            download=args.download)
    if model is None:
        model = create_model(args.arch, compress_rate=args.compress_rate, rank=args.rank,
                             num_classes=splits.num_classes, in_channels=splits.in_channels)
    check_model_fits(model, splits)
    if teacher is not None:  # one batch through both, before any training
        check_teacher(teacher, model, torch.zeros(2, *splits.input_size))
    loaders = build_loaders(splits, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                            pin_memory=context.device.type == "cuda")
    record = {**options.plain_args(args), "dataset": dataset, "arch": arch, "stage": stage}
    result = fit(model, loaders, recipe, teacher=teacher, device=context.device, output_dir=output,
                 resume=args.resume, seed=args.seed, progress=args.progress, args=record)
    if not context.is_main:
        return 0
    summary = {"arch": arch, "dataset": dataset, "stage": stage, "recipe": recipe.to_dict(), "teacher": args.teacher,
               "best_checkpoint": f"{output}/best.pt", **result.to_dict()}
    if args.json:
        print(json_text(summary, indent=2, default=str))
        return 0
    best = "" if result.best_val_top1 is None else f", validation Acc@1 {result.best_val_top1:.3f}"
    print(f"{arch} on {dataset}: {result.epochs} epochs in {result.seconds:.0f}s; best epoch {result.best_epoch}{best}")
    if result.test is not None:
        print(f"test ({result.test['samples']} images, best epoch): * Acc@1 {result.test['top1']:.3f} "
              f"Acc@5 {result.test['top5']:.3f}")
    print(f"saved {output}/best.pt, {output}/last.pt, {output}/metrics.jsonl")
    return 0
