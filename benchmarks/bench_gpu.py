"""Throughput (images/s) of norton's compressed ResNet-50s against the dense model and Torch-Pruning, on a GPU.

Issue 12's table, in one command::

    python benchmarks/bench_gpu.py --json runs/bench_gpu.json              # CUDA, ResNet-50 at 224x224
    python benchmarks/bench_gpu.py --device cpu --quick                     # the CI smoke test (about a minute)

Models (random weights: the speed does not depend on them; every one built on the device):

* ``dense``: ``norton.create_model("resnet_50")``;
* ``paper``: the zoo's compressed ResNet-50 of the paper, ``create_model("resnet_50", rank=1,
  compress_rate="[0.]+[0.1]*2+[0.4]*5+[0.75]*12")``;
* ``auto-macs-0.5``, ``auto-macs-0.25``: ``norton.auto_compress(dense, target_macs=...)``;
* ``auto-lat-0.5``: ``norton.auto_compress(dense, target_latency=0.5)``, the latency measured at
  batch ``--latency-batch`` in float32 (docs/latency.md; the layer table is cached on disk);
* ``tp-0.5``, ``tp-0.25``: Torch-Pruning 1.6 ``MetaPruner``, L1 magnitude, one uniform ratio,
  ``round_to=8``, the ratio bisected to the same MACs (within 3%; the MACs reached are printed).

auto_compress is calibrated on random images (``--calibration-images``): good enough for its
speed, not for its accuracy (accuracy is docs/pareto.md's business).

Every model then goes through ``norton.optimize_for_inference(model, x, dtype=..., memory_format=...)``
(channels-last on CUDA, NCHW on CPU, as latency budgets measure) (BatchNorm folded in float32, then cast; CPDBlock forms timed at batch
``--forms-batch`` and kept for every batch). ``compiled`` is ``torch.compile`` of that module
(the forms chosen eager). Each cell times all models interleaved: ``--warmup`` rounds, then
``--repeats`` rounds of ``--iters`` forward passes each; images/s = batch x iters / median round.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import norton
from norton.auto.latency import latency_memory_format
from norton.deploy.timing import compare_callables, environment

PAPER_RATE = "[0.]+[0.1]*2+[0.4]*5+[0.75]*12"
QUICK_PAPER = ("resnet_20", 4, "[0.]+[0.12]*2+[0.4]*9")  # CIFAR ResNet-20 in the paper's style (docs/models.md)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ models
def torch_pruning(model: nn.Module, x: Tensor, budget: float, round_to: int = 8) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning's uniform L1 pruning with ``round_to``, its ratio bisected to ``budget`` of the MACs."""
    import torch_pruning as tp

    from norton.pruning.surgery import customized_pruners

    pruner_class = getattr(tp.pruner, "MetaPruner", tp.pruner.BasePruner)
    dense = norton.count_complexity(model, example_inputs=x).macs
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]

    def prune(ratio: float) -> tuple[nn.Module, float]:
        work = copy.deepcopy(model)
        ignored = [dict(work.named_modules())[n] for n, m in model.named_modules() if m in classifier]
        pruner = pruner_class(work, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                              global_pruning=False, round_to=round_to, ignored_layers=ignored,
                              customized_pruners=customized_pruners(work))
        pruner.step()
        return work, norton.count_complexity(work, example_inputs=x).macs / dense

    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        work, fraction = prune(ratio)
        if best is None or abs(fraction / budget - 1) < abs(best[1] / budget - 1):
            best = (work, fraction, ratio)
        if abs(fraction / budget - 1) <= 0.03:
            break
        low, high = (ratio, high) if fraction > budget else (low, ratio)
    assert best is not None
    return best[0].eval(), {"macs_kept": best[1], "pruning_ratio": best[2]}


def build_models(args: argparse.Namespace, device: torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    """``{name: {"model", "macs_kept", "seconds", ...}}`` for every model of the table."""
    side = args.side
    name, rank, rate = QUICK_PAPER if args.quick else ("resnet_50", 1, PAPER_RATE)
    torch.manual_seed(0)
    dense = norton.create_model(name, num_classes=10 if args.quick else 1000).to(device).eval()
    one = torch.randn(1, 3, side, side, device=device)
    dense_macs = norton.count_complexity(dense, example_inputs=one).macs
    generator = torch.Generator().manual_seed(0)
    batches = -(-args.calibration_images // 32)
    calibration = [torch.randn(32, 3, side, side, generator=generator).to(device) for _ in range(batches)]
    auto = {"calibration": calibration, "progress": False, "sensitivity_images": min(128, args.calibration_images),
            "calibration_images": args.calibration_images, "recover": not args.quick}
    builders: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
        "dense": lambda: (dense, {}),
        "paper": lambda: (norton.create_model(name, rank=rank, compress_rate=rate,
                                              num_classes=10 if args.quick else 1000).to(device).eval(), {}),
        "auto-macs-0.5": lambda: (norton.auto_compress(dense, one, target_macs=0.5, **auto).eval(), {}),
        "auto-macs-0.25": lambda: (norton.auto_compress(dense, one, target_macs=0.25, **auto).eval(), {}),
        "auto-lat-0.5": lambda: _auto_latency(dense, args, device, auto),
        "tp-0.5": lambda: torch_pruning(dense, one, 0.5),
        "tp-0.25": lambda: torch_pruning(dense, one, 0.25),
    }
    models: dict[str, Any] = {}
    for key, build in builders.items():
        if args.models and key not in args.models:
            continue
        start = time.perf_counter()
        model, details = build()
        macs = norton.count_complexity(model, example_inputs=one).macs
        models[key] = {"model": model, "macs": macs, "macs_kept": macs / dense_macs,
                       "seconds": time.perf_counter() - start, **details}
        say(f"built {key}: {macs / dense_macs:.3f} of the MACs in {models[key]['seconds']:.1f} s")
    return models


def _auto_latency(dense: nn.Module, args: argparse.Namespace, device: torch.device, auto: dict[str, Any],
                  ) -> tuple[nn.Module, dict[str, Any]]:
    x = torch.randn(args.latency_batch, 3, args.side, args.side, device=device)
    model = norton.auto_compress(dense, x, target_latency=0.5, latency_cache=args.latency_cache,
                                 latency_passes=2 if args.quick else 3, **auto).eval()
    report = model.norton_auto_report
    return model, {"latency_target_ms": report.target_latency_ms, "latency_before_ms": report.latency_before_ms,
                   "latency_after_ms": report.latency_after_ms, "latency_passes": report.latency_passes,
                   "latency_table": report.latency_table, "latency_batch": args.latency_batch}


# ------------------------------------------------------------------ timing
def _runner(model: nn.Module, x: Tensor, iters: int) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            for _ in range(iters):
                out = model(x)
        return out
    return run


def time_cell(models: dict[str, nn.Module], x: Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Images per second of each model on ``x``, timed interleaved (medians of ``--repeats`` rounds)."""
    stats = compare_callables({k: _runner(m, x, args.iters) for k, m in models.items()}, warmup=args.warmup,
                              repeats=args.repeats, device=x.device)
    return {k: x.shape[0] * args.iters / (s.median_ms / 1e3) for k, s in stats.items()}


def prepare(model: nn.Module, x: Tensor, dtype: torch.dtype, compiled: bool) -> nn.Module:
    optimized = norton.optimize_for_inference(model, x, dtype=dtype, memory_format=latency_memory_format(x.device))
    return torch.compile(optimized, dynamic=False) if compiled else optimized  # type: ignore[return-value]


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    device = torch.device(args.device)
    started = time.perf_counter()
    built = build_models(args, device, say)
    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for mode in args.modes:
            batches = args.batch_sizes if mode == "eager" else args.compiled_batch_sizes
            forms_x = torch.randn(args.forms_batch, 3, args.side, args.side, device=device)
            ready = {k: prepare(v["model"], forms_x, dtype, compiled=mode == "compiled") for k, v in built.items()}
            for batch in batches:
                x = torch.randn(batch, 3, args.side, args.side, device=device, dtype=dtype)
                if latency_memory_format(device) == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                throughput = time_cell(ready, x, args)
                for key, value in throughput.items():
                    rows.append({"model": key, "dtype": dtype_name, "mode": mode, "batch": batch, "images_per_s": value})
                say(f"{dtype_name} {mode} b{batch}: " + ", ".join(f"{k} {v:,.0f}" for k, v in throughput.items())
                    + f"  ({time.perf_counter() - started:.0f} s)")
    details = {k: {f: v for f, v in m.items() if f != "model"} for k, m in built.items()}
    return {"environment": environment(device), "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "models": details, "rows": rows, "seconds": time.perf_counter() - started}


def table(result: dict[str, Any]) -> str:
    """The markdown table: a row per model, a column per (batch, dtype, mode)."""
    rows = result["rows"]
    columns = list(dict.fromkeys((r["batch"], r["dtype"], r["mode"]) for r in rows))
    value = {(r["model"], r["batch"], r["dtype"], r["mode"]): r["images_per_s"] for r in rows}
    head = "| model | MACs kept | " + " | ".join(f"b{b} {d} {m}" for b, d, m in columns) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(columns)]
    for model, info in result["models"].items():
        cells = " | ".join(f"{value[(model, *c)]:,.0f}" if (model, *c) in value else "" for c in columns)
        lines.append(f"| {model} | {info['macs_kept']:.3f} | {cells} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: ResNet-20 at 32x32, batch 1 and 8, fp32, eager, few rounds")
    parser.add_argument("--models", nargs="+", default=None, help="only these rows (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--compiled-batch-sizes", type=int, nargs="+", default=None,
                        help="batches of the compiled columns (default: 256; each is a compile per model)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=None)
    parser.add_argument("--side", type=int, default=None, help="input height and width (default 224; quick 32)")
    parser.add_argument("--forms-batch", type=int, default=None, help="batch the CPDBlock forms are chosen at")
    parser.add_argument("--latency-batch", type=int, default=None, help="batch of auto_compress's latency target")
    parser.add_argument("--latency-cache", default=None, help="folder of the layer-latency tables")
    parser.add_argument("--calibration-images", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="forward passes per timed round")
    parser.add_argument("--json", default=None, help="write the rows and settings here")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "batch_sizes": [1, 8] if quick else [1, 32, 256], "compiled_batch_sizes": [256],
        "dtypes": ["fp32"] if quick else ["fp32", "bf16"], "modes": ["eager"] if quick else ["eager", "compiled"],
        "side": 32 if quick else 224, "forms_batch": 8 if quick else 32, "latency_batch": 8 if quick else 32,
        "calibration_images": 32 if quick else 256, "repeats": 3 if quick else 5, "iters": 2 if quick else 10,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu (with --quick for the smoke test)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(result))
    if args.json:
        from norton.io import write_json

        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
