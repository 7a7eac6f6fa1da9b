"""Why compressed models are (not) faster under ONNX Runtime: graph optimization level x exported form.

For each model of ``bench_latency.py`` (a dense baseline and its compressed version) it exports
the baseline and several forms of the compressed model, opens each file at three
onnxruntime graph optimization levels (``ORT_ENABLE_BASIC``, ``ORT_ENABLE_EXTENDED``,
``ORT_ENABLE_ALL``: the last adds the NCHWc layout transformation, i.e. MLAS's blocked
convolutions), and times every session *interleaved in one run* (medians), so the
speedup baseline / compressed at each level is fair on a loaded machine. Forms of the
compressed model:

* ``as built``: the CPDBlocks as trained, BatchNorms not folded (what exporting an
  unoptimized model gives);
* ``optimized (torch)``: ``optimize_for_inference`` with forms timed in PyTorch (what
  ``norton export --optimize`` wrote until now);
* ``optimized (ORT)``: ``optimize_for_inference(runtime="onnxruntime")``, forms timed exported,
  in onnxruntime sessions;
* ``dense`` / ``merged`` / ``grouped``: every block forced to one form (``measure=False``).

``--profile`` also prints onnxruntime's per-operator time split for the compressed
``optimized (torch)`` file at ORT_ENABLE_ALL and ORT_ENABLE_EXTENDED.

    .venv/bin/python benchmarks/bench_onnxruntime.py --models resnet_56 --batch-sizes 1 32 --profile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_latency import CONFIGS, build  # noqa: E402 - the same models as the latency table
from norton.complexity import count_complexity  # noqa: E402
from norton.deploy.export import export_onnx, onnxruntime_runner, onnxruntime_session  # noqa: E402
from norton.deploy.optimize import optimize_for_inference  # noqa: E402
from norton.deploy.timing import compare_callables, environment  # noqa: E402

LEVELS = ("basic", "extended", "all")


def variants(baseline: torch.nn.Module, compressed: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    out = {"baseline": optimize_for_inference(baseline, x, memory_format="contiguous"),
           "as built": compressed,
           "optimized (torch)": optimize_for_inference(compressed, x, memory_format="contiguous"),
           "optimized (ORT)": optimize_for_inference(compressed, x, runtime="onnxruntime")}
    for form in ("dense", "merged", "grouped"):
        out[form] = optimize_for_inference(compressed, x, forms=(form,), measure=False)
    return out


def profile(path: str, level: str, x: torch.Tensor, runs: int, workdir: str) -> dict[str, float]:
    """Share of onnxruntime's node time per operator type at ``level`` (its own profiler)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(workdir, f"profile_{level}")
    options.graph_optimization_level = _level(level)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(runs):
        session.run(None, feed)
    with open(session.end_profiling()) as handle:
        events = json.load(handle)
    by_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    return {op: dur / total for op, dur in sorted(by_op.items(), key=lambda kv: -kv[1])}


def _level(level: str):
    import onnxruntime

    return {"basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet_56", "torchvision.resnet18"], choices=list(CONFIGS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--als-iterations", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--spinning", action="store_true",
                        help="let idle onnxruntime threads spin (its default; off: sessions do not steal each other's cores)")
    parser.add_argument("--spin-check", action="store_true",
                        help="also time baseline vs optimized at ORT_ENABLE_ALL with spinning on and off, 2 sessions at a time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(json.dumps(environment("cpu")), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            baseline, compressed, how = build(name, args)
            side = CONFIGS[name]["side"]
            ratio = count_complexity(baseline, (3, side, side)).macs / count_complexity(compressed, (3, side, side)).macs
            print(f"\n{name} ({how}); MACs ratio {ratio:.2f}x", flush=True)
            for batch in args.batch_sizes:
                x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
                models = variants(baseline, compressed, x)
                runners, paths = {}, {}
                for key, model in models.items():
                    slug = key.replace(" ", "_").replace("(", "").replace(")", "")
                    paths[key] = os.path.join(workdir, f"{name.replace('/', '_')}_{slug}_{batch}.onnx")
                    export_onnx(model.float(), paths[key], x, check=False)
                    for level in LEVELS:
                        session = onnxruntime_session(paths[key], optimization_level=level, spinning=args.spinning)
                        runners[(key, level)] = onnxruntime_runner(session, x)
                named = {f"{key}|{level}": fn for (key, level), fn in runners.items()}
                stats = compare_callables(named, warmup=2, repeats=args.repeats)
                ms = {tuple(k.split("|")): s.median_ms for k, s in stats.items()}
                forms = {key: dict(Counter(models[key].norton_plan[-1]["forms"].values()))
                         for key in ("optimized (torch)", "optimized (ORT)")}
                print(f"  batch {batch}: median ms (speedup over the baseline at the same level); forms {forms}")
                print(f"  {'exported form':<20}" + "".join(f"{level:>22}" for level in LEVELS))
                for key in models:
                    cells = "".join(
                        f"{ms[(key, level)]:>12.2f} ({ms[('baseline', level)] / ms[(key, level)]:4.2f}x)"
                        for level in LEVELS)
                    print(f"  {key:<20}{cells}", flush=True)
                rows.append({"model": name, "batch": batch, "macs_ratio": ratio, "forms": forms,
                             "median_ms": {f"{k}|{lv}": v for (k, lv), v in ms.items()}})
                if args.spin_check:
                    for spinning in (True, False):
                        pair = {key: onnxruntime_runner(onnxruntime_session(paths[key], spinning=spinning), x)
                                for key in ("baseline", "optimized (ORT)")}
                        got = compare_callables(pair, warmup=2, repeats=args.repeats)
                        base, comp = got["baseline"].median_ms, got["optimized (ORT)"].median_ms
                        print(f"    two sessions, spinning {'on ' if spinning else 'off'}: baseline {base:.2f} ms, "
                              f"optimized {comp:.2f} ms ({base / comp:.2f}x)", flush=True)
                        del pair
                if args.profile:
                    for level in ("all", "extended"):
                        for key in ("baseline", "optimized (torch)", "optimized (ORT)"):
                            shares = profile(paths[key], level, x, 5 if batch > 8 else 20, workdir)
                            top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:5])
                            print(f"    profile {key} @ {level}: {top}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
