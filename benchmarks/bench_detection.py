"""Benchmark: latency and FPS of a baseline detector vs one on a compressed ResNet-50 body.

Both are ``create_detector(--model)`` with random weights (timing does not depend on them):
the baseline's body is the dense ResNet-50, the compressed one's is the reference's
``resnet_50 -r RANK -cpr RATES`` (default ``-r 1 -cpr [0.]+[0.1]*2+[0.4]*5+[0.75]*12``: the
README's 93.39G, -31% MACs row). Both are built with ``rpn_nms_thresh=1.0`` so each box
head runs on exactly ``rpn_post_nms_top_n_test`` proposals per image (random weights would
otherwise give each model a different count and time different work), and both with the
same ``min_size = max_size = --size`` (the image is not resized).

``--optimize`` runs each body through :func:`norton.optimize_for_inference` first (BN folded,
fastest CPDBlock forms at that batch size), the baseline's too. For each batch size both
models are timed interleaved in one process (warm-up, then ``--repeats`` rounds, medians);
``speedup`` = baseline time / compressed time; ``MACs ratio`` from
:func:`norton.detection.complexity.detector_complexity` (paper protocol, ``--size`` image);
``gain/MACs`` = (speedup - 1) / (MACs ratio - 1): 1.0 when time falls as much as MACs,
the issue's goal is >= 0.7.

    .venv/bin/python benchmarks/bench_detection.py                            # 800x800, batch 1 and 4
    .venv/bin/python benchmarks/bench_detection.py --quick                    # 64x64, 50 proposals: CI smoke
    .venv/bin/python benchmarks/bench_detection.py --batch-sizes 1 --repeats 3 --optimize --json out.json
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_RATES = "[0.]+[0.1]*2+[0.4]*5+[0.75]*12"
QUICK = {"size": 64, "proposals": 50, "batch_sizes": [1, 2], "warmup": 1, "repeats": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_resnet50_fpn",
                        help="fasterrcnn/maskrcnn/keypointrcnn_resnet50_fpn")
    parser.add_argument("-r", "--rank", type=int, default=1)
    parser.add_argument("-cpr", "--compress-rate", default=DEFAULT_RATES)
    parser.add_argument("--size", type=int, default=800, help="image side (min_size = max_size = it)")
    parser.add_argument("--proposals", type=int, default=1000, help="rpn_post_nms_top_n_test of both")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--optimize", action="store_true", help="norton.optimize_for_inference on both bodies")
    parser.add_argument("--quick", action="store_true", help="64x64, 50 proposals, batch 1 and 2, 3 repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(baseline, compressed)`` detectors in eval mode on ``device``."""
    from norton.detection.models import create_detector
    from norton.models import create_model

    body = create_model("resnet_50", compress_rate=args.compress_rate, rank=args.rank)  # checks -r/-cpr first
    dense = create_model("resnet_50")
    if args.optimize:
        from norton.deploy.optimize import optimize_for_inference

        example = torch.rand(1, 3, args.size, args.size, device=device)
        # measure=False: forms chosen by the MACs rule (per-layer timing takes minutes on a loaded CPU)
        dense, body = (optimize_for_inference(copy.deepcopy(m).to(device), example, device=device, measure=False)
                       for m in (dense, body))
    options = {"min_size": args.size, "max_size": args.size, "rpn_nms_thresh": 1.0,
               "rpn_post_nms_top_n_test": args.proposals}
    baseline = create_detector(args.model, backbone=dense, **options)
    compressed = create_detector(args.model, backbone=body, **options)
    return baseline.to(device).eval(), compressed.to(device).eval()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from norton.deploy.timing import compare_callables, environment
    from norton.detection.complexity import detector_complexity

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"torch {env['torch']}, {env['threads']} threads, device {env['device']} ({env['device_name']}), "
          f"{env['cpu_count']} CPUs", flush=True)
    baseline, compressed = build(args, device)
    macs = {name: detector_complexity(model, args.size, proposals=args.proposals).macs
            for name, model in (("baseline", baseline), ("compressed", compressed))}
    ratio = macs["baseline"] / macs["compressed"]
    print(f"{args.model} {args.size}x{args.size}, {args.proposals} proposals: MACs {macs['baseline'] / 1e9:.2f}G -> "
          f"{macs['compressed'] / 1e9:.2f}G ({100 * (1 - 1 / ratio):.1f}% less, {ratio:.2f}x); "
          f"body -r {args.rank} -cpr {args.compress_rate}{', optimized' if args.optimize else ''}", flush=True)
    print(f"{'batch':>5} {'baseline ms':>12} {'compressed ms':>14} {'baseline FPS':>13} {'compressed FPS':>15} "
          f"{'speedup':>8} {'gain/MACs':>10}", flush=True)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        images = [torch.rand(3, args.size, args.size, generator=generator).to(device) for _ in range(batch)]
        with torch.no_grad():
            calls = {"baseline": lambda inputs=images: baseline(inputs), "compressed": lambda inputs=images: compressed(inputs)}
            stats = compare_callables(calls, warmup=args.warmup, repeats=args.repeats, device=device)
        base_ms, comp_ms = stats["baseline"].median_ms, stats["compressed"].median_ms
        speedup = base_ms / comp_ms
        row = {"model": args.model, "size": args.size, "proposals": args.proposals, "batch": batch,
               "device": str(device), "threads": env["threads"], "torch": env["torch"], "optimized": args.optimize,
               "baseline_ms": base_ms, "compressed_ms": comp_ms,
               "baseline_fps": 1e3 * batch / base_ms, "compressed_fps": 1e3 * batch / comp_ms,
               "speedup": speedup, "macs_ratio": ratio, "gain_over_macs": (speedup - 1) / (ratio - 1),
               "baseline_iqr_ms": stats["baseline"].iqr_ms, "compressed_iqr_ms": stats["compressed"].iqr_ms,
               "runs": stats["baseline"].runs}
        rows.append(row)
        print(f"{batch:>5} {base_ms:>12.1f} {comp_ms:>14.1f} {row['baseline_fps']:>13.2f} "
              f"{row['compressed_fps']:>15.2f} {speedup:>7.2f}x {row['gain_over_macs']:>10.2f}", flush=True)
    if args.json is not None:
        from norton.io import write_json

        write_json(rows, args.json)
    return rows


def main(argv: list[str] | None = None) -> int:
    from norton.errors import UserError

    try:
        run(parse_args(argv))
    except UserError as error:
        print(f"bench_detection: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
