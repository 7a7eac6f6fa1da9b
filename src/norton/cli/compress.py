"""``norton compress``: baseline (a checkpoint, or trained here) -> decompose -> fine-tune -> prune -> fine-tune -> report.

As in the paper::

    norton compress --arch resnet_56 --ckpt baseline.pt -r 4 -cpr "[0.]+[0.18]*29" --data_dir ~/data

or by a MACs budget for any model::

    norton compress --arch torchvision.resnet18 --dataset imagenet -r 8 --target-macs 0.5 ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from norton.cli import _options as options
from norton.errors import UserError
from norton.training.data import DataSplits, build_loaders

CRITERIA_HELP = "pruning criterion: pabs (the paper's), csa, vbd, l1 or random (default pabs)"


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
                     help="fraction of the baseline's MACs to keep, e.g. 0.33")
    group.add_argument("--criterion", default="pabs", help=CRITERIA_HELP)
    add_round_to_option(group)
    group.add_argument("--order", default="decompose-prune", choices=("decompose-prune", "prune-decompose"),
                       help="decompose then prune (NORTON, default) or the reverse")
    group.add_argument("--baseline-epochs", dest="baseline_epochs", type=int, default=None,
                       help="train the baseline for this many epochs when no --ckpt is given")
    group.add_argument("--decompose-epochs", dest="decompose_epochs", type=int, default=1,
                       help="fine-tuning epochs after decomposition (default 1; 0 skips)")
    group.add_argument("--prune-epochs", dest="prune_epochs", type=int, default=1,
                       help="fine-tuning epochs after pruning (default 1; 0 skips)")
    group.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the baseline training (default 0.1)")
    group.add_argument("--finetune-lr", dest="finetune_lr", type=float, default=0.01,
                       help="peak learning rate of the fine-tuning stages (default 0.01)")
    group.add_argument("--resume", action="store_true", help="continue a killed run in --output")


def add_round_to_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--round-to", "--round_to", dest="round_to", type=int, default=None, metavar="N",
                        help="keep a multiple of N filters in every pruned layer (with --ratio/--target-macs), "
                        "e.g. 16: CPU kernels compute channels in blocks of 8 or 16")


def run(args: argparse.Namespace) -> int:
    if args.arch is None and args.ckpt is None:
        raise UserError("give --ckpt (a trained baseline) or --arch (trained here for --baseline-epochs)")
    summary = run_compression(args)
    if args.json:
        options.print_json(summary)
    return 0


def run_compression(args: argparse.Namespace, *, splits: DataSplits | None = None, title: str = "norton compress") -> dict[str, Any]:
    """Everything ``compress`` and ``demo`` share; returns the JSON summary and prints the table."""
    from norton.pipeline import FineTune, compress
    from norton.report import format_table, write_report
    from norton.serialization import save
    from norton.training.loop import fit, resolve_device, seed_everything

    started = time.perf_counter()
    _check_args(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    output = Path(args.output or f"runs/compress-{args.arch or Path(args.ckpt).stem}")
    say = (lambda message: None) if args.json else (lambda message: print(message, flush=True))

    trained_with: dict[str, Any] = {}
    model = None
    if args.ckpt is not None:
        model, trained_with = options.load_model_file(args.ckpt)
    arch = args.arch or (getattr(model, "norton_architecture", None) or {}).get("name", "model")
    dataset = args.dataset or trained_with.get("dataset") or options.default_dataset(arch)
    if splits is None:
        splits = options.build_splits(args, dataset)
    loaders = build_loaders(splits, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                            pin_memory=device.type == "cuda")
    if model is None:
        from norton.models import create_model

        model = create_model(args.arch, compress_rate=None, rank=0, num_classes=splits.num_classes,
                             in_channels=splits.in_channels)
        epochs = args.baseline_epochs or 1
        say(f"training the baseline {arch} on {splits.name} for {epochs} epoch(s) ...")
        fit(model, loaders, epochs=epochs, lr=args.lr, device=device, output_dir=output / "baseline",
            resume=args.resume and (output / "baseline" / "last.pt").exists(), seed=args.seed,
            progress=args.progress, verbose=not args.json, args={"stage": "baseline", "arch": arch, "dataset": splits.name})
        model.to("cpu")
    options.check_model_fits(model, splits)

    result = compress(
        model, loaders, input_size=splits.input_size, rank=args.rank or None, compress_rate=args.compress_rate,
        ratio=args.ratio, target_macs=args.target_macs, criterion=args.criterion,
        round_to=args.round_to, order=args.order,
        decompose_finetune=FineTune(epochs=args.decompose_epochs, lr=args.finetune_lr),
        prune_finetune=FineTune(epochs=args.prune_epochs, lr=args.finetune_lr),
        output_dir=output, resume=args.resume, device=device, seed=args.seed, progress=args.progress, log=say,
    )
    say("measuring CPU latency (batch 1 and 32) of the baseline and the compressed model ...")
    latency = _latency(model, result.model, splits.input_size)
    for stage, name in ((result.stages[0], "baseline"), (result.stages[-1], "compressed")):
        stage["latency_ms"], stage["latency_ms_batch32"] = latency[1][name], latency[32][name]
    final_path = save(result.model, output / "compressed.pt", dataset=splits.name, stages=result.stages)
    summary = {
        "command": title, "arch": arch, "dataset": splits.name, "rank": args.rank,
        "compress_rate": args.compress_rate, "ratio": args.ratio, "target_macs": args.target_macs,
        "criterion": args.criterion, "round_to": args.round_to, "order": args.order, "output": str(output),
        "model": str(final_path),
        "seconds": time.perf_counter() - started, "stages": result.stages,
    }
    paths = write_report(output, result.stages, channels=result.channels, extra={k: v for k, v in summary.items() if k != "stages"})
    if not args.json:
        print()
        print(format_table(result.stages))
        print()
        print(f"report: {paths['json']}, {paths['table']}, {paths['plot']}")
        print(f"compressed model: {final_path}  (load it with norton.load)")
        print(f"total time: {summary['seconds'] / 60:.1f} min")
    return summary


def _check_args(args: argparse.Namespace) -> None:
    if args.rank is not None and args.rank < 0:
        raise UserError(f"-r/--rank must be 0 (no decomposition) or a positive integer, got {args.rank}")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise UserError(f"--ratio is the fraction of filters removed and must lie in [0, 1), got {args.ratio}")
    if args.target_macs is not None and not 0 < args.target_macs < 1:
        raise UserError(f"--target-macs is the fraction of MACs to keep and must lie in (0, 1), got {args.target_macs}")
    if args.compress_rate is not None and (args.ratio is not None or args.target_macs is not None):
        raise UserError("say how much to prune in one way: -cpr, --ratio or --target-macs")
    if args.round_to is not None and args.round_to < 1:
        raise UserError(f"--round-to must be a positive number of filters, got {args.round_to}")
    if args.round_to is not None and args.compress_rate is not None:
        raise UserError("--round-to applies to --ratio and --target-macs; -cpr fixes every width itself")
    for name in ("decompose_epochs", "prune_epochs"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    from norton.pruning.criteria import get_criterion

    get_criterion(args.criterion)


def _latency(baseline: torch.nn.Module, compressed: torch.nn.Module, input_size) -> dict[int, dict[str, float]]:
    """Median CPU latency (ms) of both models, each in its fastest inference form, at batch 1 and 32."""
    from norton.deploy.timing import compare_models

    timings = compare_models({"baseline": baseline, "compressed": compressed}, input_size, batch_sizes=(1, 32),
                             device="cpu", optimize=True, repeats=20, memory=False)
    return {batch: {name: t.latency.median_ms for name, t in row.items()} for batch, row in timings.items()}
