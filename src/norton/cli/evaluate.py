"""``norton evaluate``: top-1/top-5 accuracy of a checkpoint, printed like the reference's evaluate.py.

    norton evaluate --ckpt runs/r56/best.pt
    norton evaluate --arch vgg_16_bn --ckpt "vgg_16_bn_[0.6]*6+[0.8]*7_1_90.32.pt" -r 1 -cpr "[0.6]*6+[0.8]*7"
     * Acc@1 90.320 Acc@5 99.450
"""
from __future__ import annotations

import argparse
from typing import Any

from norton.cli import _options as options
from norton.errors import UserError
from norton.training.data import build_loaders
from norton.training.loop import evaluate, resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 accuracy of a checkpoint",
        description="Evaluate a model file on the test split (or --split val). Reads norton files, training "
        "checkpoints (best.pt, last.pt) and, with --arch/-r/-cpr, the authors' released checkpoints. "
        "A training checkpoint's dataset, --data_dir, --val_size and --seed are the defaults.",
    )
    options.add_ckpt_option(parser, required=True)
    options.add_model_options(parser)
    options.add_data_options(parser)
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test (default) or the validation images held out from the training set")
    options.add_run_options(parser, output=False)
    parser.set_defaults(func=run, seed=None)  # None: the training checkpoint's seed (its validation images)


def run(args: argparse.Namespace) -> int:
    model, trained_with = options.load_model_file(args.ckpt, arch=args.arch, rank=args.rank,
                                                  compress_rate=args.compress_rate)
    # Options not given default to the checkpoint's training run: the same data, the same validation images.
    for key, fallback in (("dataset", None), ("data_dir", None), ("val_size", None), ("seed", 0)):
        if getattr(args, key) is None:
            setattr(args, key, trained_with.get(key, fallback))
    arch = args.arch or (getattr(model, "norton_architecture", None) or {}).get("name")
    dataset = args.dataset or options.default_dataset(arch)
    splits = options.build_splits(args, dataset)
    device = resolve_device(args.device)
    model.to(device)
    options.check_model_fits(model, splits)
    loaders = build_loaders(splits, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                            pin_memory=device.type == "cuda")
    loader = loaders.test if args.split == "test" else loaders.val
    if loader is None:
        raise UserError("there is no validation split (val_size 0): use --split test or --val_size N")
    metrics = evaluate(model, loader, device=device, progress=True, desc=args.split)
    report: dict[str, Any] = {"ckpt": str(args.ckpt), "arch": arch, "dataset": dataset, "split": args.split,
                              **metrics}
    if args.json:
        options.print_json(report)
    else:
        print(f"{arch or 'model'} on {dataset} {args.split} ({metrics['samples']} images):")
        print(f" * Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f}")
    return 0
