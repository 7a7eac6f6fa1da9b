"""``norton prune``: remove filters of a trained (decomposed or plain) model, fine-tune, report.

    norton prune --ckpt runs/r56-decomposed/compressed.pt --target-macs 0.3 --criterion pabs --epochs 10
    norton prune --ckpt vgg16_r1.pt -cpr "[0.6]*6+[0.8]*7"      # the paper's per-layer rates (zoo models)
"""
from __future__ import annotations

import argparse

from norton.cli import _options as options
from norton.cli.compress import (
    CRITERIA_HELP,
    add_prune_ranks_option,
    add_round_to_option,
    default_output,
    print_summary,
    say,
)
from norton.compress_arguments import FineTune
from norton.workflow import run_compression


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune filters of a trained model and fine-tune it",
        description="Remove whole filters of the model in --ckpt (CPDBlocks and convolutions; residual, "
        "concatenation and depthwise couplings are kept consistent), chosen by --criterion, then fine-tune "
        "for --epochs. Say how much with exactly one of -cpr, --ratio, --target-macs.",
    )
    options.add_ckpt_option(parser, required=True, help="the trained model (norton file or training checkpoint)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("-cpr", "--compress_rate", "--compress-rate", dest="compress_rate", default=None, metavar="SPEC",
                     help="the paper's per-layer rates for a zoo model, e.g. '[0.6]*6+[0.8]*7'")
    how.add_argument("--ratio", type=float, default=None, help="fraction of filters removed from every prunable layer")
    how.add_argument("--target-macs", "--target_macs", dest="target_macs", type=float, default=None,
                     help="fraction of the original (uncompressed) model's MACs to keep, in (0, 1], e.g. 0.3")
    parser.add_argument("--criterion", default="pabs", help=CRITERIA_HELP)
    add_round_to_option(parser)
    add_prune_ranks_option(parser)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default 1; 0 skips)")
    parser.add_argument("--lr", dest="finetune_lr", type=float, default=0.01, help="peak fine-tuning learning rate")
    options.add_distillation_options(parser, teacher_file=False)
    options.add_data_options(parser, batch_size=128)
    options.add_run_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --output")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    distill = options.finetune_distillation(args)
    summary = run_compression(
        model_file=args.ckpt, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
        val_size=args.val_size, download=args.download, batch_size=args.batch_size, workers=args.workers,
        compress_rate=args.compress_rate, ratio=args.ratio, target_macs=args.target_macs,
        criterion=args.criterion, round_to=args.round_to, prune_ranks=args.prune_ranks,
        # Pruning only: a MACs target without a rank would otherwise mean auto_compress (norton compress's default).
        order="decompose-prune",
        prune_finetune=FineTune(epochs=args.epochs, lr=args.finetune_lr, **distill),
        output_dir=args.output or default_output(None, args.ckpt), resume=args.resume, device=args.device,
        seed=args.seed, progress=args.progress, title="norton prune", log=None if args.json else say,
    )
    print_summary(summary, as_json=args.json)
    return 0
