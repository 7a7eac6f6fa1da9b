"""``norton benchmark``: latency, throughput and peak memory, baseline vs compressed, side by side.

    norton benchmark --arch resnet_56 -r 7 -cpr "[0.]+[0.12]*2+[0.4]*27" --batch-size 1 32 --optimize
    norton benchmark --ckpt runs/r56/compressed.pt --baseline runs/r56/best.pt --runtime onnxruntime --json

The compressed model is ``--ckpt`` (or, without it, ``--arch/-r/-cpr`` with random
weights). The baseline is ``--baseline PATH``, else the uncompressed ``--arch``
(or the architecture recorded in the checkpoint); ``--no-baseline`` times only the
compressed model. Both are timed interleaved in one process (warm-up, then
``--repeats`` rounds; median and interquartile range), so their ratio is fair even
on a busy machine. The MACs ratio (baseline / compressed, conv+linear convention)
is printed next to the realized speedup.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from norton.cli import _options as options
from norton.cli.export import add_model_source_options, input_shape, load_model
from norton.errors import UserError
from norton.limits import check_image_side
from norton.serialization import load_model_file

MIB = 2**20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="time a compressed model against its baseline (latency, throughput, memory)",
        description="Time a compressed model and its baseline side by side: median latency with its spread, "
        "throughput, peak memory, the MACs ratio and the realized speedup, per batch size.",
    )
    add_model_source_options(parser)
    parser.add_argument("--baseline", default=None, metavar="PATH",
                        help="baseline model file (default: the uncompressed --arch, or the checkpoint's architecture)")
    parser.add_argument("--no-baseline", action="store_true", help="time the compressed model only")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_sizes", type=int, nargs="+", default=[1],
                        metavar="N", help="batch sizes to time (default 1), e.g. --batch-size 1 32")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--runtime", default="torch", metavar="{torch,onnxruntime}",
                        help="torch eager (default) or onnxruntime (CPU; the model is exported and checked first)")
    parser.add_argument("--optimize", action="store_true",
                        help="run norton.optimize_for_inference on both models at each batch size first")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of each model (default 30)")
    parser.add_argument("--max-time", "--max_time", dest="max_time", type=float, default=None, metavar="SECONDS",
                        help="stop timing a batch size after this many seconds (at least 3 runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(func=run)


def load_baseline(args: argparse.Namespace, compressed: nn.Module) -> nn.Module | None:
    if args.no_baseline:
        return None
    if args.baseline is not None:
        model, _ = load_model_file(args.baseline)
        return model
    architecture = getattr(compressed, "norton_architecture", None) or {}
    name = args.arch or architecture.get("name")
    if name is None:
        raise UserError("no baseline: give --baseline PATH or --arch NAME, or --no-baseline")
    from norton.models import create_model

    kwargs = architecture.get("kwargs") or {}
    extra = {key: kwargs[key] for key in ("num_classes", "in_channels") if key in kwargs}
    if name.startswith("torchvision."):
        extra.pop("in_channels", None)
    return create_model(name, **extra)


def run(args: argparse.Namespace) -> int:
    from norton.complexity import count_complexity
    from norton.deploy.benchmark import RUNTIMES, compare_models
    from norton.deploy.timing import environment
    from norton.training.distributed import resolve_device

    if args.runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime {args.runtime!r}: use torch or onnxruntime")
    if args.warmup < 0 or args.repeats < 1:
        raise UserError(f"need --warmup >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    if args.input_size is not None:
        check_image_side(args.input_size, "--input-size")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    compressed = load_model(args).eval()
    baseline = load_baseline(args, compressed)
    shape = input_shape(compressed, args.input_size)
    models = {"compressed": compressed} if baseline is None else {"baseline": baseline.eval(), "compressed": compressed}
    macs = {name: count_complexity(model, shape).macs for name, model in models.items()}
    results = compare_models(
        models, shape, batch_sizes=args.batch_sizes, device=device, runtime=args.runtime, optimize=args.optimize,
        warmup=args.warmup, repeats=args.repeats, max_time_s=args.max_time,
    )
    report = _report(args, shape, macs, results, environment(device))
    if args.json:
        options.print_json(report)
    else:
        _print_table(report)
    return 0


def _report(args: argparse.Namespace, shape, macs: dict[str, int], results, env: dict[str, Any]) -> dict[str, Any]:
    macs_ratio = macs["baseline"] / macs["compressed"] if "baseline" in macs and macs["compressed"] else None
    rows = []
    for batch, timings in results.items():
        row: dict[str, Any] = {"batch_size": batch, **{name: t.as_dict() for name, t in timings.items()}}
        if "baseline" in timings:
            speedup = timings["baseline"].latency.median_ms / timings["compressed"].latency.median_ms
            row["speedup"] = speedup
            row["speedup_over_macs_ratio"] = speedup / macs_ratio if macs_ratio else None
        rows.append(row)
    return {
        "environment": env, "runtime": args.runtime, "optimized": bool(args.optimize),
        "input_shape": list(shape), "macs": {**macs, "ratio": macs_ratio}, "results": rows,
    }


def _print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    how = "optimized per batch size" if report["optimized"] else "as loaded"
    print(f"torch {env['torch']}, {env['threads']} threads, {env['device']} ({env['device_name']}), "
          f"runtime {report['runtime']}, models {how}, input {tuple(report['input_shape'])}")
    macs = report["macs"]
    line = ", ".join(f"{name} {macs[name] / 1e6:.2f}M" for name in ("baseline", "compressed") if name in macs)
    ratio = f" -> MACs ratio {macs['ratio']:.2f}x" if macs.get("ratio") else ""
    print(f"MACs per image: {line}{ratio}")
    print(f"{'batch':>5}  {'model':<10} {'median ms':>10} {'IQR ms':>8} {'min-max ms':>17} {'images/s':>10} {'peak MiB':>9}")
    for row in report["results"]:
        for name in ("baseline", "compressed"):
            if name not in row:
                continue
            t = row[name]
            lat = t["latency"]
            memory = "-" if t["peak_memory_bytes"] is None else f"{t['peak_memory_bytes'] / MIB:.1f}"
            spread = f"{lat['min_ms']:.2f}-{lat['max_ms']:.2f}"
            print(f"{row['batch_size']:>5}  {name:<10} {lat['median_ms']:>10.2f} {lat['iqr_ms']:>8.2f} {spread:>17} "
                  f"{t['throughput_images_per_s']:>10.1f} {memory:>9}")
        if "speedup" in row:
            share = row["speedup_over_macs_ratio"]
            tail = f" = {share:.2f} of the MACs ratio" if share is not None else ""
            print(f"{'':>5}  speedup {row['speedup']:.2f}x{tail}")
