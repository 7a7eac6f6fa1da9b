"""``norton compress``: baseline (a checkpoint, or trained here) -> decompose -> fine-tune -> prune -> fine-tune -> report.

As in the paper::

    norton compress --arch resnet_56 --ckpt baseline.pt -r 4 -cpr "[0.]+[0.18]*29" --data_dir ~/data

or by a MACs budget for any model, every layer's width and rank chosen from data
(``auto_compress``; give ``-r`` to take NORTON's uniform path instead)::

    norton compress --arch torchvision.resnet18 --dataset imagenet --target-macs 0.5 ...

or by a latency budget (a fraction of the model's latency, or milliseconds; docs/latency.md)::

    norton compress --ckpt baseline.pt --target-latency 0.5 ...

with the uncompressed model teaching every fine-tuning stage (knowledge distillation)::

    norton compress ... --distill --distill-alpha 0.5 --distill-temperature 4
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from norton.cli import _options as options
from norton.compress_arguments import ORDERS, FineTune, parse_target_latency
from norton.errors import UserError
from norton.report import format_table
from norton.workflow import run_compression

CRITERIA_HELP = ("pruning criterion: pabs (the paper's), pabs-norm, csa, vbd, l1 or random "
                 "(default: pabs, or l1 with --order auto)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="the whole NORTON path: decompose, fine-tune, prune, fine-tune, report",
        description="Compress a trained model (--ckpt) or one trained here first (--arch with --baseline-epochs): "
        "decompose its convolutions at rank -r, fine-tune, prune filters (-cpr as in the paper, --ratio, or "
        "--target-macs), fine-tune, then write a report folder (summary.json, summary.txt, report.png, "
        "compressed.pt). Resumable with --resume.",
    )
    add_compression_options(parser)
    options.add_distillation_options(parser, teacher_file=False)
    options.add_model_options(parser)
    options.add_ckpt_option(parser, help="the trained baseline (norton file or training checkpoint); "
                                         "without it --arch is trained for --baseline-epochs first")
    options.add_data_options(parser, batch_size=128)
    options.add_run_options(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression")
    how = group.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=float, default=None, help="fraction of filters removed from every prunable layer")
    how.add_argument("--target-macs", "--target_macs", dest="target_macs", type=float, default=None,
                     help="fraction of the original (uncompressed) model's MACs to keep, in (0, 1], e.g. 0.33")
    how.add_argument("--target-latency", "--target_latency", dest="target_latency", default=None, metavar="X",
                     help="run auto_compress to a latency: a fraction of the model's latency in (0, 1), e.g. 0.5, "
                     "or milliseconds such as 12ms (optimize_for_inference's form, on the CPU; docs/latency.md)")
    group.add_argument("--criterion", default=None, help=CRITERIA_HELP)
    add_round_to_option(group)
    add_prune_ranks_option(group)
    group.add_argument("--order", default=None, choices=ORDERS,
                       help="decompose then prune (NORTON), the reverse, or auto: every layer's width and rank "
                       "chosen from data to meet --target-macs (default: auto when --target-macs is given "
                       "without -r/--ratio/-cpr, else decompose-prune)")
    group.add_argument("--baseline-epochs", dest="baseline_epochs", type=int, default=None,
                       help="train the baseline for this many epochs (>= 1; default 1) when no --ckpt is given")
    group.add_argument("--decompose-epochs", dest="decompose_epochs", type=int, default=1,
                       help="fine-tuning epochs after decomposition (default 1; 0 skips)")
    group.add_argument("--prune-epochs", dest="prune_epochs", type=int, default=1,
                       help="fine-tuning epochs after pruning, or after auto compression (default 1; 0 skips)")
    group.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the baseline training (default 0.1)")
    group.add_argument("--finetune-lr", dest="finetune_lr", type=float, default=0.01,
                       help="peak learning rate of the fine-tuning stages (default 0.01)")
    group.add_argument("--calibration-distill-steps", dest="calibration_distill_steps", type=int, default=0,
                       metavar="N", help="with auto compression: N steps training the compressed model to match the "
                       "original's outputs on the 512 calibration images (no labels) before fine-tuning; raises "
                       "top-1 right after compression, for --prune-epochs 0 (default 0)")
    group.add_argument("--resume", action="store_true", help="continue a killed run in --output")


def add_round_to_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--round-to", "--round_to", dest="round_to", type=int, default=None, metavar="N",
                        help="keep a multiple of N filters in every pruned layer (with --ratio/--target-macs), "
                        "e.g. 16: CPU kernels compute channels in blocks of 8 or 16")


def add_prune_ranks_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--prune-ranks", "--prune_ranks", dest="prune_ranks", action="store_true",
                        help="also prune the ranks of Tucker-2, layer-CP and SVD blocks (with --ratio/--target-macs), "
                        "so they shrink with their widths")


def run(args: argparse.Namespace) -> int:
    if args.arch is None and args.ckpt is None:
        raise UserError("give --ckpt (a trained baseline) or --arch (trained here for --baseline-epochs)")
    distill = options.finetune_distillation(args)
    budget: dict[str, Any] = {}
    if getattr(args, "target_latency", None) is not None:
        parse_target_latency(args.target_latency)  # a typo is refused here, before torch is imported
        budget["target_latency"] = args.target_latency
    summary = run_compression(
        model_file=args.ckpt, arch=args.arch, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
        val_size=args.val_size, download=args.download, batch_size=args.batch_size, workers=args.workers,
        rank=options.rank_option(args.rank), compress_rate=args.compress_rate, ratio=args.ratio,
        target_macs=args.target_macs, criterion=args.criterion, round_to=args.round_to, order=args.order,
        prune_ranks=args.prune_ranks,
        baseline_epochs=args.baseline_epochs, baseline_lr=args.lr,
        decompose_finetune=FineTune(epochs=args.decompose_epochs, lr=args.finetune_lr, **distill),
        prune_finetune=FineTune(epochs=args.prune_epochs, lr=args.finetune_lr, **distill),
        output_dir=args.output or default_output(args.arch, args.ckpt), resume=args.resume, device=args.device,
        seed=args.seed, progress=args.progress, title="norton compress", log=None if args.json else say,
        calibration_distill_steps=args.calibration_distill_steps, **budget,
    )
    print_summary(summary, as_json=args.json)
    return 0


def default_output(arch: str | None, ckpt: str | None) -> str:
    return f"runs/compress-{arch or Path(ckpt or 'model').stem}"


def say(message: str) -> None:
    print(message, flush=True)


def print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    """What every compression command prints at the end: the JSON summary, or the table and the files."""
    if as_json:
        options.print_json(summary)
        return
    files = summary["files"]
    print()
    print(format_table(summary["stages"]))
    print()
    print(f"report: {files['json']}, {files['table']}, {files['plot']}")
    print(f"compressed model: {summary['model']}  (load it with norton.load)")
    print(f"total time: {summary['seconds'] / 60:.1f} min")
