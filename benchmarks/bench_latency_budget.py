"""auto_compress(target_latency=...): the latency asked for vs the latency measured afterwards.

For each model: ``auto_compress`` to a fraction of its latency (random weights, random
calibration images: the speed does not depend on them), then the input model and the
result, both through ``optimize_for_inference``, are timed again *interleaved* (same run,
medians) and their ratio is compared with the fraction asked for. Then ``auto_compress``
runs again on the same table, which must time no layer.

    python benchmarks/bench_latency_budget.py                      # resnet_56 b32 32x32, resnet18 b8 224x224
    python benchmarks/bench_latency_budget.py --models resnet_56 --target 0.5 --json out.json
    python benchmarks/bench_latency_budget.py --models resnet18 --resnet18-side 112 --no-second-call
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
import torchvision

import norton
from norton.auto.latency import measure_models
from norton.io import write_json

MODELS = {  # name -> (builder, input shape (B, C, H, W))
    "resnet_56": (lambda: norton.create_model("resnet_56", num_classes=10), (32, 3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=1000), (8, 3, 224, 224)),
}


def run(name: str, target: float, repeats: int, cache: str, side: int | None, again: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    build, shape = MODELS[name]
    if side is not None and name == "resnet18":
        shape = (*shape[:2], side, side)
    model = build().eval()
    x = torch.randn(*shape)
    calibration = [torch.randn(32, *shape[1:]) for _ in range(4)]
    start = time.perf_counter()
    small = norton.auto_compress(model, x, target_latency=target, calibration=calibration, progress=False,
                                 latency_cache=cache)
    seconds = time.perf_counter() - start
    report = small.norton_auto_report
    times = measure_models({"dense": norton.optimize_for_inference(model, x),
                            "auto": norton.optimize_for_inference(small, x)}, x, repeats=repeats, max_time_s=120)
    row: dict[str, Any] = {
        "model": name, "input": list(shape), "target": target, "threads": torch.get_num_threads(),
        "dense_ms": times["dense"], "auto_ms": times["auto"], "measured": times["auto"] / times["dense"],
        "macs_kept": report.macs_after / report.macs_before, "passes": report.latency_passes,
        "table": report.latency_table, "seconds": seconds,
    }
    if again:
        start = time.perf_counter()
        second = norton.auto_compress(model, x, target_latency=target, calibration=calibration, progress=False,
                                      latency_cache=cache)
        row["second_call_timed"] = second.norton_auto_report.latency_table["timed"]
        row["second_call_seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cache", default=None, help="latency table folder (default: a fresh temporary one)")
    parser.add_argument("--resnet18-side", type=int, default=None, help="resnet18's input side (default 224)")
    parser.add_argument("--no-second-call", dest="again", action="store_false",
                        help="skip the second auto_compress (which must time no layer)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache or os.path.join(fresh, "latency")
        for name in args.models:
            row = run(name, args.target, args.repeats, cache, args.resnet18_side, args.again)
            rows.append(row)
            print(f"{name} {row['input']}: asked {row['target']:.2f} of {row['dense_ms']:.1f} ms, measured "
                  f"{row['measured']:.3f} ({row['auto_ms']:.1f} ms), MACs kept {row['macs_kept']:.2f}, "
                  f"passes {len(row['passes'])}, table {row['table']['timed']} points timed, {row['seconds']:.0f} s"
                  + (f"; second call timed {row['second_call_timed']} points ({row['second_call_seconds']:.0f} s)"
                     if "second_call_timed" in row else ""), flush=True)
            print("  passes (ms): " + "; ".join(
                f"goal {p['goal_ms']:.1f} predicted {p['predicted_ms']:.1f} measured {p['measured_ms']:.1f}"
                for p in row["passes"]), flush=True)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
