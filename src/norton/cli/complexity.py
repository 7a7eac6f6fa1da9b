"""``norton complexity``: MACs and parameters of a zoo model, and their reduction against the uncompressed one.

The reference's ``complexity.py`` as a command: build ``--arch`` with ``-r`` and
``-cpr``, count it and its uncompressed twin (rank 0, no compress rate) under
one convention, print both and the reductions in percent (``--json`` for machines).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from norton.cli import _options as options
from norton.complexity import ALIASES, CONVENTIONS, Complexity, count_complexity
from norton.compress_rate import format_compress_rate, parse_compress_rate
from norton.limits import check_image_side
from norton.models import create_model, get_model_entry

INPUT_SIZES = {"cifar10": 32, "imagenet": 224}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "complexity",
        help="count MACs and parameters of a (compressed) zoo model",
        description="Count MACs and parameters of --arch built with -r/-cpr, and their reduction "
        "against the uncompressed architecture.",
    )
    parser.add_argument("--arch", required=True, help="model name (see docs/models.md) or torchvision.<name>")
    parser.add_argument("-r", "--rank", type=int, default=0, help="CP rank of the decomposed convs (0: none)")
    parser.add_argument(
        "-cpr", "--compress-rate", "--compress_rate", dest="compress_rate", default=None,
        help="per-layer compress rates, e.g. '[0.]+[0.1]*2+[0.4]*5+[0.75]*12' (default: none)",
    )
    parser.add_argument(
        "--dataset", choices=sorted(INPUT_SIZES), default=None,
        help="sets the input size (32 or 224); default: the model's own dataset",
    )
    parser.add_argument("--input-size", type=int, default=None, help="input side in pixels (overrides --dataset)")
    parser.add_argument(
        "--convention", choices=[*CONVENTIONS, *ALIASES], default="reference",
        help="what to count (default: reference, the paper's complexity.py); see docs/complexity.md",
    )
    parser.add_argument("--per-layer", action="store_true", help="also list every counted layer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Every number is bounded before a model is built: -r 10000000 would allocate terabytes.
    rank = options.rank_option(args.rank) or 0
    if args.input_size is not None:
        check_image_side(args.input_size)
    rates = None if args.compress_rate is None else parse_compress_rate(args.compress_rate)
    model = create_model(args.arch, compress_rate=rates, rank=rank)
    baseline = create_model(args.arch)
    side = args.input_size or INPUT_SIZES[args.dataset or _default_dataset(args.arch)]
    input_size = (3, side, side)
    counted = count_complexity(model, input_size, convention=args.convention, per_layer=args.per_layer)
    reference = count_complexity(baseline, input_size, convention=args.convention)
    report = _report(args, rates, counted, reference)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report, counted)
    return 0


def _default_dataset(arch: str) -> str:
    return "imagenet" if arch.startswith("torchvision.") else get_model_entry(arch).dataset


def _reduction(value: int, baseline: int) -> float:
    return 100.0 * (1.0 - value / baseline) if baseline else 0.0


def _report(
    args: argparse.Namespace, rates: list[float] | None, counted: Complexity, baseline: Complexity
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "arch": args.arch,
        "rank": args.rank,
        "compress_rate": rates,
        "input_size": list(counted.input_size),
        "convention": counted.convention,
        "macs": counted.macs,
        "params": counted.params,
        "baseline_macs": baseline.macs,
        "baseline_params": baseline.params,
        "macs_reduction_percent": round(_reduction(counted.macs, baseline.macs), 4),
        "params_reduction_percent": round(_reduction(counted.params, baseline.params), 4),
    }
    if args.per_layer:
        report["layers"] = [vars(row) for row in counted.layers]
    return report


def _print_table(report: dict[str, Any], counted: Complexity) -> None:
    rates = report["compress_rate"]
    spec = format_compress_rate(rates) if rates else "none"
    _, channels, height, width = report["input_size"]
    print(f"{report['arch']}: rank {report['rank']}, compress rate {spec}")
    print(f"input {channels}x{height}x{width}, convention {report['convention']}")
    if counted.layers:
        print()
        print(f"{'layer':<40} {'type':<18} {'MACs':>15} {'params':>12}")
        for row in counted.layers:
            print(f"{row.name:<40} {row.type:<18} {row.macs:>15,} {row.params:>12,}")
    print()
    print(f"{'':<8} {'compressed':>15} {'uncompressed':>15} {'reduction':>10}")
    for label, key in (("MACs", "macs"), ("params", "params")):
        print(
            f"{label:<8} {report[key]:>15,} {report['baseline_' + key]:>15,} "
            f"{report[key + '_reduction_percent']:>9.2f}%"
        )
