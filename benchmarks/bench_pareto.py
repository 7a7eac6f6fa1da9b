"""Benchmark: accuracy against MACs and CPU latency, norton vs Torch-Pruning, on Fashion-MNIST (resumable).

The zoo's ``resnet_20`` (or ``--model resnet_56``) is trained once on the 60,000 Fashion-MNIST
training images (cached under ``--out``), then compressed by every ``--methods`` entry to every
``--budgets`` fraction of its conv+linear MACs (norton's counter), for every ``--seeds`` seed.
Each compressed model is scored on the 10,000 test images right after compression, fine-tuned
by the same recipe for ``--epochs`` epochs over the 60,000 training images (SGD, momentum 0.9,
weight decay 5e-4, lr 0.01 with a per-step cosine to 0, batch 128, no warm-up; ``--distill``: the
baseline as teacher for every model), scored again,
and timed on the CPU at batch 1 and 64 after :func:`norton.optimize_for_inference` (BatchNorm
folded, fastest CPDBlock forms; the same call for every model). Nothing is selected on the test
images: there is no validation split, every run stops after its fixed number of epochs.

``--latency-budgets`` adds ``auto-latency``: :func:`norton.auto_compress` with ``target_latency`` at
those fractions of the baseline's batch-64 CPU latency; the report compares every norton model
with Torch-Pruning's frontier at the same measured speed-up.

One JSON object per ``(model, method, budget, seed, epochs, distill)`` is appended to
``--results`` (``benchmarks/results/pareto.jsonl``, committed: a fresh clone keeps every earlier
session's rows); keys already there are skipped, so a killed run resumes and the grid is filled
piece by piece, across machines. The baseline is cached under ``--out`` (not committed: a fresh
clone trains it again, seeded, and every row records the fingerprint of the baseline it came
from). The tables (mean ± std over seeds) and the two plots go to ``docs/pareto.md`` and
``docs/images/pareto_*.png``.

    .venv/bin/python benchmarks/bench_pareto.py                    # issue 11's protocol (FINALISTS), resumable
    .venv/bin/python benchmarks/bench_pareto.py --budgets 0.5,0.3 --methods paper,tp-l1-uniform --seeds 0
    .venv/bin/python benchmarks/bench_pareto.py --methods auto,paper,tp-l1-global --epochs 5 --seeds 0,1,2
    .venv/bin/python benchmarks/bench_pareto.py --methods auto-latency --latency-budgets 0.8,0.6 --seeds 0
    .venv/bin/python benchmarks/bench_pareto.py --report-only
    .venv/bin/python benchmarks/bench_pareto.py --quick            # a smoke test, under a minute
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import _pareto_data as data_lib  # the _pareto_* helpers: next to this file, first on sys.path when it runs
import _pareto_report as report
import norton
from _common import cpu_name, parse_list
from _pareto_methods import METHODS, OPTION_VARIANTS, VARIANTS, macs_fraction
from norton.deploy.benchmark import time_models, torch_runner
from norton.deploy.timing import environment
from norton.errors import UserError
from norton.limits import check_distillation, check_epochs, check_int, check_target_macs
from norton.training.distributed import resolve_device

# The default grid: every MACs method but the auto variants that only show why auto's default is what it is.
MACS_METHODS = [m for m in METHODS if m not in report.LATENCY_METHODS and m not in VARIANTS]
DEFAULTS = {"budgets": "0.5,0.3,0.2,0.1", "methods": ",".join(MACS_METHODS), "seeds": "0,1,2"}
# Issue 11's protocol, what a run without --methods, --seeds and --epochs does: every MACs method once
# (seed 0, 1 epoch); then at each budget the finalists, auto, the paper's path and the best Torch-Pruning
# setting of that first stage, with three seeds at 1 epoch; then the finalists again with 5 epochs.
FINALISTS = ("auto", "paper")
FINALIST_SEEDS = (0, 1, 2)
FINALIST_EPOCHS = 5
# --quick: 512 training and 512 test images, one budget, two methods, one epoch (4 steps) everywhere.
# Committed, so that the grid is filled across sessions and clones (the baseline is not: weights stay out of git).
RESULTS = Path("benchmarks/results/pareto.jsonl")
QUICK: dict[str, Any] = {"limit": 512, "budgets": "0.5", "methods": "tp-l1-uniform,paper", "seeds": "0",
                         "epochs": 1, "baseline_epochs": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_20", choices=sorted(data_lib.BASELINE_EPOCHS))
    parser.add_argument("--budgets", help=f"fractions of the baseline's MACs (default {DEFAULTS['budgets']})")
    parser.add_argument("--methods", help=f"from {', '.join(METHODS)} (default all but "
                                          f"{', '.join([*sorted(report.LATENCY_METHODS), *VARIANTS])})")
    parser.add_argument("--latency-budgets", default="",
                        help="fractions of the baseline's batch-64 CPU latency for auto-latency (e.g. 0.8,0.6)")
    parser.add_argument("--seeds", help=f"default {DEFAULTS['seeds']}")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 1)")
    parser.add_argument("--baseline-epochs", type=int, default=None, help="default: 8 (about 92%% top-1)")
    parser.add_argument("--calibration-images", type=int, default=512, help="training images for auto and Taylor")
    parser.add_argument("--distill", action="store_true", help="fine-tune with the baseline as teacher")
    parser.add_argument("--distill-alpha", type=float, default=0.5)
    parser.add_argument("--distill-temperature", type=float, default=4.0)
    parser.add_argument("--results", default=str(RESULTS),
                        help=f"the JSONL file of results, appended to (default {RESULTS}, committed)")
    parser.add_argument("--out", default="runs/pareto", help="the cached baseline (not committed)")
    parser.add_argument("--merge", default=None, metavar="FILE",
                        help="first append FILE's rows whose keys --results lacks (a run on another machine)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default Debian's)")
    parser.add_argument("--docs", default="docs/pareto.md", help="the document whose marked section is rewritten")
    parser.add_argument("--images", default="docs/images", help="folder of the plots")
    parser.add_argument("--device", default="auto", help="for training (latency is always CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="only render the tables and plots")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 512 train/test images, budget 0.5, two methods, all into --out/quick")
    args = parser.parse_args(argv)
    # Nothing of the grid chosen: the whole protocol (FINALISTS); --budgets still narrows it.
    args.protocol = not args.quick and all(getattr(args, n) is None for n in ("methods", "seeds", "epochs"))
    if args.protocol:
        args.seeds = "0"
    if args.epochs is None:
        args.epochs = 1
    if args.quick:
        args.out = str(Path(args.out) / "quick")
        args.results = str(Path(args.out) / "results.jsonl")
        args.docs, args.images = str(Path(args.out) / "pareto.md"), args.out
        args.epochs, args.baseline_epochs = QUICK["epochs"], QUICK["baseline_epochs"]
    for name in ("budgets", "methods", "seeds"):  # a piece of the grid given is kept, also with --quick
        if getattr(args, name) is None:
            setattr(args, name, (QUICK if args.quick else DEFAULTS)[name])
    # Every mistake is refused here, before data is read or anything is trained.
    args.budgets = [check_target_macs(b, "--budgets") for b in parse_list(args.budgets, float, "budgets")]
    if any(b >= 1 for b in args.budgets):
        raise UserError(f"--budgets are fractions of the baseline's MACs in (0, 1), got {args.budgets}")
    args.methods = parse_list(args.methods, str, "methods")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    args.latency_budgets = [check_target_macs(b, "--latency-budgets")
                            for b in parse_list(args.latency_budgets, float, "latency budgets")] \
        if args.latency_budgets else []
    if any(b >= 1 for b in args.latency_budgets):
        raise UserError(f"--latency-budgets are fractions of the baseline's latency in (0, 1), got {args.latency_budgets}")
    if any(m in report.LATENCY_METHODS for m in args.methods) and not args.latency_budgets:
        raise UserError("auto-latency's budgets are fractions of the baseline's latency: give them with "
                        "--latency-budgets, e.g. --latency-budgets 0.8,0.6")
    args.seeds = [check_int(s, "--seeds", minimum=0) for s in parse_list(args.seeds, int, "seeds")]
    args.epochs = check_epochs(args.epochs, "--epochs", minimum=1)
    args.baseline_epochs = check_epochs(args.baseline_epochs or data_lib.BASELINE_EPOCHS[args.model], "--baseline-epochs",
                                        minimum=1)
    check_int(args.calibration_images, "--calibration-images", maximum=60_000)
    if args.distill:
        check_distillation(args.distill_alpha, args.distill_temperature)
    return args


# ------------------------------------------------------------------ measuring one model
def inference_form(model: nn.Module, x: torch.Tensor, *, quick: bool) -> tuple[nn.Module, bool]:
    """``optimize_for_inference(model)`` at ``x``'s batch size (BatchNorm folded, fastest forms); ``(model, optimized)``."""
    model = model.cpu().eval()
    try:
        return norton.optimize_for_inference(model, x, measure=not quick, repeats=3), True
    except (RuntimeError, UserError) as error:  # timed as it is, and said so in the record
        print(f"  optimize_for_inference failed ({str(error).splitlines()[0][:120]}): timing the model as it is")
        return model, False


def latency_ms(model: nn.Module, baseline: nn.Module, input_size: tuple[int, ...], batch: int, *,
               quick: bool) -> tuple[float, float, bool]:
    """Median CPU latencies (ms) of ``model`` and ``baseline`` at ``batch``, timed interleaved (so a burst of
    load from another process hits both alike): ``(model ms, baseline ms, model optimized)``."""
    x = torch.randn(batch, *input_size)
    fast, optimized = inference_form(model, x, quick=quick)
    fast_baseline, _ = inference_form(baseline, x, quick=quick)
    timing = time_models({"model": torch_runner(fast, x), "baseline": torch_runner(fast_baseline, x)},
                         batch_size=batch, warmup=2 if quick else 5, repeats=3 if quick else 25,
                         max_time_s=2 if quick else 20, memory=False)
    return timing["model"].latency.median_ms, timing["baseline"].latency.median_ms, optimized


def measure(model: nn.Module, baseline: nn.Module, data: data_lib.Data, reference_macs: int, *,
            quick: bool) -> dict[str, Any]:
    """MACs, params, CPU latency at batch 1 and 64 of ``model``, and its speed-up over ``baseline`` (same timing run)."""
    count = norton.count_complexity(model.cpu(), input_size=data.input_size)
    record: dict[str, Any] = {"macs": count.macs, "macs_fraction": count.macs / reference_macs, "params": count.params}
    optimized = True
    for batch in (1, 64):
        ms, baseline_ms, done = latency_ms(model, baseline, data.input_size, batch, quick=quick)
        record.update({f"latency_ms_b{batch}": ms, f"speedup_b{batch}": baseline_ms / ms})
        optimized = optimized and done
    return {**record, "latency_optimized": optimized}


def top1(model: nn.Module, loader: Any, device: str) -> float:
    return norton.evaluate(model, loader, device=device, progress=False)["top1"]


def finetune_kwargs(args: argparse.Namespace, teacher: nn.Module) -> dict[str, Any]:
    if not args.distill:
        return {}
    teacher = copy.deepcopy(teacher).to(resolve_device(args.device)).eval().requires_grad_(False)
    return {"teacher": teacher, "distill_alpha": args.distill_alpha, "distill_temperature": args.distill_temperature}


# ------------------------------------------------------------------ the grid
def run_one(args: argparse.Namespace, env: dict[str, Any], data: data_lib.Data, baseline: nn.Module,
            base_record: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    """Compress, score, fine-tune, score and time one ``(method, budget, seed)``; its result record."""
    method, budget, seed = key["method"], key["budget"], key["seed"]
    device = str(resolve_device(args.device))
    example = torch.zeros(1, *data.input_size)
    calibration = data_lib.calibration_batches(data, images=args.calibration_images, seed=seed)
    started = time.perf_counter()
    compressed, details = METHODS[method](baseline, example, budget, calibration, seed)
    compress_seconds = time.perf_counter() - started
    fraction = macs_fraction(compressed, base_record["macs"], example)
    print(f"  compressed in {compress_seconds:.1f} s to {fraction:.3f} of the MACs ({details})", flush=True)
    loaders = data_lib.loaders_for(data, seed)
    before = top1(compressed.to(device), loaders.test, device)
    print(f"  top-1 right after compression {before:.2f}%", flush=True)
    started = time.perf_counter()
    # the key's epochs, not --epochs: the protocol's last stage runs 5-epoch keys in a run whose --epochs is 1
    result = norton.fit(compressed, loaders, epochs=key["epochs"], **data_lib.FINETUNE_RECIPE, device=args.device,
                        seed=seed, progress=False, verbose=True, **finetune_kwargs(args, baseline))
    finetune_seconds = time.perf_counter() - started
    assert result.test is not None
    print(f"  top-1 after {key['epochs']} epoch(s) of fine-tuning {result.test['top1']:.2f}% "
          f"({finetune_seconds / 60:.1f} min)", flush=True)
    return {**key, "top1_compressed": before, "top1_finetuned": result.test["top1"],
            **measure(compressed, baseline, data, base_record["macs"], quick=args.quick),
            "compress_seconds": compress_seconds, "finetune_seconds": finetune_seconds, "details": details,
            "baseline_top1": base_record["top1_finetuned"],
            "baseline_fingerprint": base_record["details"]["fingerprint"], "recipe": {**data_lib.FINETUNE_RECIPE, "device": device,
            "batch_size": data_lib.BATCH_SIZE, "train_images": len(data.splits.train)},
            "env": env, "command": command_line(), "finished": datetime.now(UTC).isoformat(timespec="seconds")}


def command_line() -> str:
    """How this process was started, as a user would type it."""
    return " ".join([".venv/bin/python benchmarks/bench_pareto.py", *sys.argv[1:]])


def baseline_record(args: argparse.Namespace, env: dict[str, Any], data: data_lib.Data, model: nn.Module,
                    metadata: dict[str, Any]) -> dict[str, Any]:
    macs = norton.count_complexity(model, input_size=data.input_size).macs
    return {"model": args.model, "method": "baseline", "budget": 1.0, "seed": metadata["seed"],
            "epochs": metadata["epochs"], "distill": False, "top1_compressed": None,
            "top1_finetuned": metadata["test_top1"], **measure(model, model, data, macs, quick=args.quick),
            "compress_seconds": 0.0, "details": {"train_seconds": metadata["train_seconds"]},
            "env": env, "command": command_line(), "finished": datetime.now(UTC).isoformat(timespec="seconds")}


def run_grid(args: argparse.Namespace, results: Path) -> None:
    env = environment("cpu")
    env = {"torch": env["torch"], "threads": env["threads"], "cpu": cpu_name(), "cpu_count": env["cpu_count"],
           "device": str(resolve_device(args.device))}
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu']} ({env['cpu_count']} cores), "
          f"training on {env['device']}, latency on the CPU", flush=True)
    records = report.read_results(results)
    done = report.done_keys(records)
    data = data_lib.build_data(data_dir=args.data_dir, limit=QUICK["limit"] if args.quick else None)
    baseline, metadata = data_lib.trained_baseline(
        data, Path(args.out), model_name=args.model, epochs=args.baseline_epochs, seed=0, device=args.device)
    baseline = baseline.cpu().eval()
    base_key = {"model": args.model, "method": "baseline", "budget": 1.0, "seed": metadata["seed"],
                "epochs": metadata["epochs"], "distill": False}
    measured = [r for r in records if report.record_key(r) == report.record_key(base_key)]
    mark = data_lib.fingerprint(baseline)
    base = next((r for r in measured if r["details"].get("fingerprint") == mark), None)
    if base is None and measured:
        # Another machine (or torch) trained a different baseline: its rows stay, new rows say which they used.
        others = ", ".join(r["details"].get("fingerprint") or "not recorded" for r in measured)
        print(f"warning: this baseline (fingerprint {mark}) is not the one the rows in {results} were measured "
              f"with ({others}); new rows record {mark}", flush=True)
    if base is None:
        base = baseline_record(args, env, data, baseline, metadata)
        base["details"]["fingerprint"] = mark
        report.append_result(base, results)
    # Each stage's keys are decided when it starts: the protocol's finalists depend on the first stage's rows.
    stages = [lambda: grid_keys(args)]
    if args.protocol:
        stages += [lambda: finalist_keys(args, report.read_results(results), 1),
                   lambda: finalist_keys(args, report.read_results(results), FINALIST_EPOCHS)]
    for stage in stages:
        todo = stage()
        for index, key in enumerate(todo, 1):
            unit = "latency" if key["method"] in report.LATENCY_METHODS else "MACs"
            label = f"[{index}/{len(todo)}] {key['method']} at {key['budget']:g} of the {unit}, seed {key['seed']}, " \
                    f"{key['epochs']} epoch(s)"
            if report.record_key(key) in done:
                print(f"{label}: done before, skipped", flush=True)
                continue
            print(label, flush=True)
            try:
                record = run_one(args, env, data, baseline, base, key)
            except UserError as error:  # e.g. a budget a method cannot reach: the others go on
                print(f"  {key['method']} failed: {error}", flush=True)
                continue
            report.append_result(record, results)
            done.add(report.record_key(key))


def _key(args: argparse.Namespace, method: str, budget: float, seed: int, epochs: int) -> dict[str, Any]:
    return {"model": args.model, "method": method, "budget": budget, "seed": seed, "epochs": epochs,
            "distill": bool(args.distill)}


def grid_keys(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The keys of ``--methods`` at every budget and seed: the fixed-budget control first (dense at 1),
    ``--budgets`` for the MACs methods, ``--latency-budgets`` for the latency ones (auto-latency, also
    when ``--methods`` does not name it)."""
    methods = args.methods
    pieces = [(report.FIXED_BUDGETS[method], method) for method in methods if method in report.FIXED_BUDGETS]
    pieces += [(budget, method) for budget in args.budgets for method in methods
               if method not in report.LATENCY_METHODS and method not in report.FIXED_BUDGETS]
    pieces += [(budget, method) for budget in args.latency_budgets for method in sorted(report.LATENCY_METHODS)]
    return [_key(args, method, budget, seed, args.epochs) for budget, method in pieces for seed in args.seeds]


def finalist_keys(args: argparse.Namespace, records: Sequence[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """The protocol's later stages: at each budget, FINALISTS and the best Torch-Pruning setting after one
    fine-tuning epoch in ``records`` (under the same distillation setting), each with FINALIST_SEEDS."""
    groups = report.grouped(records, args.model)
    todo = []
    for budget in args.budgets:
        best = report.best_peer(groups, budget, 1, bool(args.distill))
        finalists = [*FINALISTS, *([best[0]] if best else [])]
        todo += [_key(args, method, budget, seed, epochs) for method in finalists for seed in FINALIST_SEEDS]
    return todo


def merge_results(source: Path, results: Path) -> int:
    """Append the rows of ``source`` whose key ``results`` lacks (baselines: whose fingerprint it lacks);
    returns how many. A run on another machine (a lent GPU) comes home this way."""
    if not source.is_file():
        raise UserError(f"--merge: {source} not found: give the results.jsonl the other run wrote")

    def identity(record: dict[str, Any]) -> tuple[Any, ...]:
        mark = record.get("details", {}).get("fingerprint") if record["method"] == "baseline" else None
        return (*report.record_key(record), mark)

    have = {identity(r) for r in report.read_results(results)}
    added = 0
    for record in report.read_results(source):
        if identity(record) not in have:
            report.append_result(record, results)
            have.add(identity(record))
            added += 1
    return added


def render(args: argparse.Namespace, results: Path) -> None:
    records = report.read_results(results)
    if not any(r["model"] == args.model for r in records):
        print(f"no results for {args.model} in {results} yet")
        return
    plots = report.plot(records, args.model, Path(args.images), leave_out=OPTION_VARIANTS)
    docs = Path(args.docs)
    images = [os.path.relpath(p, docs.parent) for p in plots]
    mine = [r for r in records if r["model"] == args.model]
    tables, goals = report.render_tables(records, args.model), report.render_goals(records, args.model)
    body = "\n".join([
        f"### {args.model}", "", "Commands that produced these results (`--report-only` re-renders them):", "",
        *[f"    {command}" for command in report.commands(mine, args.model)], "",
        *[f"Measured on: {line}." for line in report.environments(mine)], "",
        report.baseline_line(records, args.model) or "", "",
        tables, "",
        report.render_same_latency(records, args.model), "",
        goals, "",
        f"![top-1 against MACs]({images[0]})", f"![top-1 against batch-64 latency]({images[1]})",
    ])
    report.write_document(docs, args.model, body)
    print(tables)
    print(goals)
    print(f"wrote {docs} and {', '.join(str(p) for p in plots)}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UserError as error:
        print(f"bench_pareto: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    try:
        if args.merge:
            added = merge_results(Path(args.merge), results)
            print(f"merged {added} new row(s) of {args.merge} into {results}")
        if not args.report_only:
            run_grid(args, results)
    except UserError as error:
        print(f"bench_pareto: error: {error}", file=sys.stderr)
        return 2
    render(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
