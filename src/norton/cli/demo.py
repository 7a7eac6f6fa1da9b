"""``norton demo``: the whole NORTON path on a built-in default, in minutes on a laptop CPU.

Trains a CIFAR-style ResNet-20 on Fashion-MNIST (Debian's ``dataset-fashion-mnist``
files, padded to 32x32 RGB), compresses it to a third of the baseline's MACs with
:func:`norton.auto_compress` (every layer's width and CP rank chosen from 512
unlabeled training images, then recovered on them), fine-tunes, and prints the
before/after table. ``-r 3`` takes NORTON's uniform path instead (decompose at
rank 3, fine-tune, prune with the paper's ``pabs``, fine-tune). Without
Fashion-MNIST it says so and uses the built-in synthetic dataset instead.
"""
from __future__ import annotations

import argparse
import sys

from norton.cli import _options as options
from norton.cli.compress import CRITERIA_HELP, add_round_to_option, print_summary, say
from norton.compress_arguments import FineTune
from norton.workflow import run_compression


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train, compress and report on Fashion-MNIST with built-in defaults",
        description="The main job on a built-in default: a ResNet-20 on Fashion-MNIST, trained briefly, "
        "compressed to about a third of its MACs (auto_compress, or NORTON's path with -r), fine-tuned, and compared before/after "
        "(top-1, MACs, params, CPU latency). Every default can be changed.",
    )
    parser.add_argument("--arch", default="resnet_20", help="zoo model (default resnet_20)")
    parser.add_argument("-r", "--rank", type=int, default=0,
                        help="CP rank of NORTON's uniform path (default 0: auto_compress chooses every layer's rank)")
    parser.add_argument("--target-macs", "--target_macs", dest="target_macs", type=float, default=0.33,
                        help="fraction of the original model's MACs to keep (default 0.33)")
    parser.add_argument("--criterion", default=None, help=CRITERIA_HELP)
    add_round_to_option(parser)
    parser.add_argument("--limit", type=int, default=20000,
                        help="training images used (default 20000 of 58000); the 10000 test images are all used")
    parser.add_argument("--val_size", "--val-size", dest="val_size", type=int, default=2000,
                        help="training images held out for model selection (default 2000)")
    parser.add_argument("--baseline-epochs", dest="baseline_epochs", type=int, default=3, help="default 3")
    parser.add_argument("--decompose-epochs", dest="decompose_epochs", type=int, default=1, help="default 1 (NORTON's path only)")
    parser.add_argument("--prune-epochs", dest="prune_epochs", type=int, default=2,
                        help="fine-tuning epochs after pruning or auto compression (default 2)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64, help="default 64")
    parser.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                        help="Fashion-MNIST folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    options.add_distillation_options(parser, teacher_file=False)
    parser.add_argument("--output", "-o", default="runs/demo", help="report folder (default runs/demo)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue a killed demo in --output")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from norton.training.readers import find_fashion_mnist

    distill = options.finetune_distillation(args)
    # An explicit --data_dir is used or refused (naming the missing file); only without one
    # may the demo fall back to its built-in data.
    if args.data_dir is not None or find_fashion_mnist(None) is not None:
        dataset = "fashion-mnist"
    else:
        print("norton demo: Fashion-MNIST not found (install Debian's dataset-fashion-mnist or pass --data_dir); "
              "using the built-in synthetic dataset instead", file=sys.stderr)
        dataset = "synthetic"
    summary = run_compression(
        dataset=dataset, data_dir=args.data_dir, val_size=args.val_size, train_limit=args.limit, arch=args.arch,
        batch_size=args.batch_size, workers=2, rank=options.rank_option(args.rank), target_macs=args.target_macs,
        criterion=args.criterion, round_to=args.round_to, baseline_epochs=args.baseline_epochs, baseline_lr=0.1,
        decompose_finetune=FineTune(epochs=args.decompose_epochs, lr=0.01, **distill),
        prune_finetune=FineTune(epochs=args.prune_epochs, lr=0.01, **distill),
        output_dir=args.output, resume=args.resume, device=args.device, seed=args.seed, progress=args.progress,
        title="norton demo", log=None if args.json else say,
    )
    print_summary(summary, as_json=args.json)
    return 0
