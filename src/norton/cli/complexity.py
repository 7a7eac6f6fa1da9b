"""``norton complexity``: MACs and parameters of a zoo model, and their reduction against the uncompressed one.

The reference's ``complexity.py`` as a command: build ``--arch`` with ``-r`` and
``-cpr``, count it and its uncompressed twin (rank 0, no compress rate) under
one convention, print both and the reductions in percent (``--json`` for machines).
A detector (``fasterrcnn_resnet50_fpn``, ...) is counted part by part at 800x800 with a
fixed number of RoIs (:mod:`norton.detection.complexity`); its ``-r``/``-cpr`` build the
reference's compressed ResNet-50 body (``resnet_50``), as ``fasterrcnn_CPresnet50_fpn`` did.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from norton.cli import _options as options
from norton.complexity import ALIASES, CONVENTIONS, Complexity, count_complexity
from norton.compress_rate import format_compress_rate, parse_compress_rate
from norton.detection.complexity import MAX_ROIS, PROTOCOLS
from norton.errors import UserError
from norton.limits import check_image_side
from norton.models import create_model, get_model_entry
from norton.models.detectors import DETECTION_DATASET

INPUT_SIZES = {"cifar10": 32, "imagenet": 224, "coco": 800}
DEFAULT_MAX_SIZE = 1333  # torchvision's GeneralizedRCNNTransform max_size
DETECTOR_BODY = "resnet_50"  # the reference's compressible ResNet-50 (-r/-cpr)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "complexity",
        help="count MACs and parameters of a (compressed) zoo model",
        description="Count MACs and parameters of --arch built with -r/-cpr, and their reduction "
        "against the uncompressed architecture.",
    )
    parser.add_argument("--arch", "--model", dest="arch", required=True,
                        help="model name (see docs/models.md) or torchvision.<name>")
    parser.add_argument("-r", "--rank", type=int, default=0, help="CP rank of the decomposed convs (0: none)")
    parser.add_argument(
        "-cpr", "--compress-rate", "--compress_rate", dest="compress_rate", default=None,
        help="per-layer compress rates, e.g. '[0.]+[0.1]*2+[0.4]*5+[0.75]*12' (default: none)",
    )
    parser.add_argument(
        "--dataset", choices=sorted(INPUT_SIZES), default=None,
        help="sets the input size (32, 224 or 800); default: the model's own dataset",
    )
    parser.add_argument("--input-size", type=int, default=None,
                        help="input side in pixels (overrides --dataset; a detector is built with min_size=it)")
    parser.add_argument(
        "--convention", choices=[*CONVENTIONS, *ALIASES], default="reference",
        help="what to count (default: reference, the paper's complexity.py); see docs/complexity.md",
    )
    parser.add_argument("--per-layer", action="store_true", help="also list every counted layer (detectors: part)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                        help="detectors: RoI counts (paper: 1000 proposals, 1 detection; max: 1000, 100)")
    parser.add_argument("--proposals", type=int, default=None, help="detectors: RoIs through the box head")
    parser.add_argument("--detections", type=int, default=None,
                        help="detectors: RoIs through the mask / keypoint head")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Every number is bounded before a model is built: -r 10000000 would allocate terabytes.
    rank = options.rank_option(args.rank) or 0
    if args.input_size is not None:
        check_image_side(args.input_size)
    rates = None if args.compress_rate is None else parse_compress_rate(args.compress_rate)
    if _is_detector_name(args.arch):
        return _run_detector(args, rates, rank)
    if args.proposals is not None or args.detections is not None:
        raise UserError("--proposals and --detections are for detectors (fasterrcnn_resnet50_fpn, ...)")
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


def _is_detector_name(arch: str) -> bool:
    return not arch.startswith("torchvision.") and get_model_entry(arch).dataset == DETECTION_DATASET


def _run_detector(args: argparse.Namespace, rates: list[float] | None, rank: int) -> int:
    """The detector with the reference's compressed body, and the one with a dense body, counted part by part."""
    from norton.detection.complexity import detector_complexity, format_complexity
    from norton.limits import check_int

    for name in ("proposals", "detections"):
        if getattr(args, name) is not None:
            check_int(getattr(args, name), f"--{name}", minimum=0, maximum=MAX_ROIS)
    compressed = rates is not None or rank > 0
    body = create_model(DETECTOR_BODY, compress_rate=rates, rank=rank) if compressed else None
    side = args.input_size or INPUT_SIZES[DETECTION_DATASET]
    # the transform resizes to min_size: an S x S image is counted at S x S, as 800 x 800 is by default
    min_size, max_size = side, max(side, DEFAULT_MAX_SIZE)
    model = create_model(args.arch, backbone=body, min_size=min_size, max_size=max_size)
    options = {"protocol": args.protocol, "proposals": args.proposals, "detections": args.detections,
               "convention": args.convention}
    counted = detector_complexity(model, side, **options)
    baseline = detector_complexity(create_model(args.arch, min_size=min_size, max_size=max_size), side, **options) if compressed else counted
    report: dict[str, Any] = {
        "arch": args.arch, "rank": args.rank, "compress_rate": rates, "input_size": [1, 3, side, side],
        "image_size": list(counted.image_size), "protocol": counted.protocol, "proposals": counted.proposals,
        "detections": counted.detections, "convention": counted.convention,
        "macs": counted.macs, "params": counted.params,
        "baseline_macs": baseline.macs, "baseline_params": baseline.params,
        "macs_reduction_percent": round(_reduction(counted.macs, baseline.macs), 4),
        "params_reduction_percent": round(_reduction(counted.params, baseline.params), 4),
    }
    if args.per_layer:
        report["parts"] = [vars(part) for part in counted.parts]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    spec = format_compress_rate(rates) if rates else "none"
    print(f"{args.arch}: body {DETECTOR_BODY if compressed else 'dense'}, rank {args.rank}, compress rate {spec}")
    print(format_complexity(counted) if args.per_layer else
          f"image {counted.image_size[0]}x{counted.image_size[1]}, convention {counted.convention}, protocol "
          f"{counted.protocol}: {counted.proposals} proposals, {counted.detections} detections")
    _print_totals(report)
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
    _print_totals(report)


def _print_totals(report: dict[str, Any]) -> None:
    print()
    print(f"{'':<8} {'compressed':>15} {'uncompressed':>15} {'reduction':>10}")
    for label, key in (("MACs", "macs"), ("params", "params")):
        print(
            f"{label:<8} {report[key]:>15,} {report['baseline_' + key]:>15,} "
            f"{report[key + '_reduction_percent']:>9.2f}%"
        )
