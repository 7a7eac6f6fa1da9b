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
from norton.io import json_text
from norton.limits import check_loader_options, check_split_options
from norton.serialization import load_model_file
from norton.training.datasets import build_datasets
from norton.training.distributed import resolve_device
from norton.training.loaders import build_loaders
from norton.training.loop import evaluate
from norton.workflow import check_model_fits, default_dataset


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


def _given_or(value: Any, trained_with: dict[str, Any], key: str, fallback: Any = None) -> Any:
    """An option's value, or (not given) what the model was trained with."""
    return value if value is not None else trained_with.get(key, fallback)


def run(args: argparse.Namespace) -> int:
    check_split_options(limit=args.limit, val_size=args.val_size)
    check_loader_options(batch_size=args.batch_size, workers=args.workers)
    device = resolve_device(args.device)
    model, trained_with = load_model_file(args.ckpt, arch=args.arch, rank=args.rank, compress_rate=args.compress_rate)
    # Options not given default to the checkpoint's training run: the same data, the same validation images.
    arch = args.arch or (getattr(model, "norton_architecture", None) or {}).get("name")
    dataset = _given_or(args.dataset, trained_with, "dataset") or default_dataset(arch)
    seed = _given_or(args.seed, trained_with, "seed", 0)
    splits = build_datasets(dataset, _given_or(args.data_dir, trained_with, "data_dir"), limit=args.limit,
                            val_size=_given_or(args.val_size, trained_with, "val_size"), seed=seed,
                            download=args.download)
    model.to(device)
    check_model_fits(model, splits)
    loaders = build_loaders(splits, batch_size=args.batch_size, workers=args.workers, seed=seed,
                            pin_memory=device.type == "cuda")
    loader = loaders.test if args.split == "test" else loaders.val
    if loader is None:
        raise UserError("there is no validation split (val_size 0): use --split test or --val_size N")
    metrics = evaluate(model, loader, device=device, progress=True, desc=args.split)
    report: dict[str, Any] = {"ckpt": str(args.ckpt), "arch": arch, "dataset": dataset, "split": args.split,
                              **metrics}
    if args.json:
        print(json_text(report, indent=2, default=str))
    else:
        print(f"{arch or 'model'} on {dataset} {args.split} ({metrics['samples']} images):")
        print(f" * Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f}")
    return 0
