"""``norton train``: train a zoo model (or fine-tune a model file) with checkpoints, resume and DDP.

One process::

    norton train --arch resnet_56 --dataset cifar10 --data_dir ~/data --output runs/r56

Several GPUs (one process each)::

    torchrun --nproc_per_node=4 -m norton.cli.main train --arch resnet_50 --dataset imagenet ...
"""
from __future__ import annotations

import argparse

from norton.cli import _options as options
from norton.errors import UserError
from norton.models import create_model
from norton.training.data import build_loaders
from norton.training.loop import (
    DistributedContext,
    check_output_dir,
    check_recipe,
    cleanup_distributed,
    fit,
    init_distributed,
    seed_everything,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (baseline), or fine-tune a model file",
        description="Train --arch (with -r/-cpr) from scratch, or fine-tune the model in --ckpt, on --dataset. "
        "Picks the best epoch on a validation split held out from the training set, then reports the "
        "test accuracy of that epoch. Writes metrics.jsonl, last.pt, best.pt and result.json to --output.",
    )
    options.add_model_options(parser)
    options.add_ckpt_option(parser, help="fine-tune this model file instead of training a fresh --arch: a norton "
                                         "file, a training checkpoint, or with --arch/-r/-cpr the authors' "
                                         "released checkpoint; uses the fine-tuning recipe")
    options.add_data_options(parser)
    options.add_training_options(parser)
    options.add_run_options(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.arch is None and args.ckpt is None:
        raise UserError("give --arch (a model to train from scratch) or --ckpt (a model file to fine-tune)")
    context = init_distributed(args.device)
    try:
        return _train(args, context)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, context: DistributedContext) -> int:
    seed_everything(args.seed)  # the same initial weights on every rank
    trained_with: dict = {}
    if args.ckpt is not None:
        model, trained_with = options.load_model_file(args.ckpt, arch=args.arch, rank=args.rank,
                                                      compress_rate=args.compress_rate)
        arch = (getattr(model, "norton_architecture", None) or {}).get("name")
        stage = "finetune"
    else:
        model, arch, stage = None, args.arch, "train"
    dataset = args.dataset or trained_with.get("dataset") or options.default_dataset(arch)
    arch = arch or "model"
    recipe = options.training_recipe(args, dataset, stage=stage)
    output = args.output or f"runs/{arch}-{dataset}"
    check_recipe(**recipe)  # mistakes surface before minutes of data loading
    check_output_dir(output, resume=args.resume)
    splits = options.build_splits(args, dataset)
    if model is None:
        model = create_model(args.arch, compress_rate=args.compress_rate, rank=args.rank,
                             num_classes=splits.num_classes, in_channels=splits.in_channels)
    options.check_model_fits(model, splits)
    loaders = build_loaders(splits, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                            pin_memory=context.device.type == "cuda")
    record = {**options.plain_args(args), "dataset": dataset, "arch": arch, "stage": stage}
    result = fit(model, loaders, **recipe, device=context.device, output_dir=output, resume=args.resume,
                 seed=args.seed, progress=args.progress, args=record)
    if not context.is_main:
        return 0
    summary = {"arch": arch, "dataset": dataset, "stage": stage, "recipe": recipe,
               "best_checkpoint": f"{output}/best.pt", **result.to_dict()}
    if args.json:
        options.print_json(summary)
        return 0
    best = "" if result.best_val_top1 is None else f", validation Acc@1 {result.best_val_top1:.3f}"
    print(f"{arch} on {dataset}: {result.epochs} epochs in {result.seconds:.0f}s; best epoch {result.best_epoch}{best}")
    if result.test is not None:
        print(f"test ({result.test['samples']} images, best epoch): * Acc@1 {result.test['top1']:.3f} "
              f"Acc@5 {result.test['top5']:.3f}")
    print(f"saved {output}/best.pt, {output}/last.pt, {output}/metrics.jsonl")
    return 0
