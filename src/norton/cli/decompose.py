"""``norton decompose``: decompose a trained model's layers at rank -r, fine-tune, report.

    norton decompose --ckpt runs/r56/best.pt -r 4 --epochs 10 --data_dir ~/data
    norton decompose --ckpt runs/r56/best.pt --method tucker2 -r vbmf
"""
from __future__ import annotations

import argparse

from norton.cli import _options as options
from norton.cli.compress import default_output, print_summary, say
from norton.compress_arguments import FineTune
from norton.workflow import run_compression


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decompose",
        help="decompose a trained model (--method, rank -r) and fine-tune it",
        description="Replace every eligible layer of the model in --ckpt by a block of --method at rank -r "
        "(cp-filter: CPDBlocks by batched CP-ALS; tucker2, cp-layer, svd: see docs/decompositions.md), "
        "fine-tune for --epochs, and write the model and a report to --output.",
    )
    options.add_ckpt_option(parser, required=True, help="the trained model (norton file or training checkpoint)")
    options.add_decomposition_options(parser)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default 1; 0 skips)")
    parser.add_argument("--lr", dest="finetune_lr", type=float, default=0.01, help="peak fine-tuning learning rate")
    options.add_distillation_options(parser, teacher_file=False)
    options.add_data_options(parser, batch_size=128)
    options.add_run_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --output")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options.check_rank_spec_option(args.rank)
    distill = options.finetune_distillation(args)
    # cp-filter runs exactly as before; another method is handed to the library by name
    method = {} if args.method == "cp-filter" else {"decompose_method": args.method}
    summary = run_compression(
        model_file=args.ckpt, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
        val_size=args.val_size, download=args.download, batch_size=args.batch_size, workers=args.workers,
        rank=args.rank, decompose_finetune=FineTune(epochs=args.epochs, lr=args.finetune_lr, **distill),
        output_dir=args.output or default_output(None, args.ckpt), resume=args.resume, device=args.device,
        seed=args.seed, progress=args.progress, title="norton decompose", log=None if args.json else say, **method,
    )
    print_summary(summary, as_json=args.json)
    return 0
