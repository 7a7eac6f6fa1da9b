"""``norton decompose``: decompose a trained model's convolutions at rank -r, fine-tune, report.

    norton decompose --ckpt runs/r56/best.pt -r 4 --epochs 10 --data_dir ~/data
"""
from __future__ import annotations

import argparse

from norton.cli import _options as options
from norton.cli.compress import run_compression
from norton.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decompose",
        help="decompose a trained model (CPDBlocks of rank -r) and fine-tune it",
        description="Replace every eligible convolution of the model in --ckpt by a rank -r CPDBlock "
        "(batched CP-ALS), fine-tune for --epochs, and write the model and a report to --output.",
    )
    options.add_ckpt_option(parser, required=True, help="the trained model (norton file or training checkpoint)")
    parser.add_argument("-r", "--rank", type=int, required=True, help="CP rank of every decomposed convolution")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default 1; 0 skips)")
    parser.add_argument("--lr", dest="finetune_lr", type=float, default=0.01, help="peak fine-tuning learning rate")
    options.add_data_options(parser, batch_size=128)
    options.add_run_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --output")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.rank < 1:
        raise UserError(f"-r/--rank must be a positive integer, got {args.rank}")
    args.arch, args.compress_rate, args.ratio, args.target_macs, args.round_to = None, None, None, None, None
    args.criterion, args.order, args.baseline_epochs, args.lr = "pabs", "decompose-prune", None, None
    args.decompose_epochs, args.prune_epochs = args.epochs, 0
    summary = run_compression(args, title="norton decompose")
    if args.json:
        options.print_json(summary)
    return 0
