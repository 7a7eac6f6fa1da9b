"""Benchmark: the four decompositions at matched MACs on Fashion-MNIST, with and without pruning after (resumable).

The Pareto benchmark's ResNet-20 baseline (``bench_pareto.py``'s cache under ``runs/pareto``,
trained there first if missing; or ``--ckpt``, any model trained on Fashion-MNIST padded to
32x32) is compressed by every ``--methods`` entry (``cp-filter``, ``tucker2``, ``cp-layer``,
``svd``) to every ``--budgets`` fraction of its conv+linear MACs (:func:`norton.count_complexity`),
in two variants:

* ``decompose``: decomposition alone, at the ranks that land the whole model within 2% of the
  budget. The ranks come from a bisection on ``F`` of the per-layer spec ``"macs:F"`` (every
  layer keeps at most ``F`` of its own MACs); when the whole model's MACs step over the 2% band
  as ``F`` moves, the layers are then moved one at a time, deepest first, from their rank just
  above the budget to their rank just below (a per-layer rank mapping). Sizes are computed
  from the blocks' closed forms, so the search decomposes nothing; the model is decomposed
  once, at the chosen ranks, and counted again.
* ``decompose+prune``: decomposition at the ranks landing at ``--mild`` (1.4) times the budget
  by the same search, then :func:`norton.prune` with ``target_macs=budget`` (a fraction of the
  original model's MACs) and the ``l1`` criterion.
* ``decompose+prune-ranks``: the same with ``prune(prune_ranks=True)``: the blocks' rank channels
  are pruned with their widths (Tucker-2, layer CP and SVD; cp-filter's ranks live inside a
  CPDBlock and stay).

Each model is scored on the 10,000 test images right after compression, fine-tuned by the Pareto
benchmark's recipe and data (``_pareto_data``: SGD lr 0.01, momentum 0.9, weight decay 5e-4,
per-step cosine to 0, batch 128, no warm-up, ``--epochs`` epochs over the 60,000 augmented
training images in the order the seed draws, or ``--train-images`` of them), and scored again.
Nothing is selected on the test images: no validation split, a fixed epoch count. One JSON line
per ``(method, budget, variant, seed)`` goes to ``--out`` (``benchmarks/results/methods.jsonl``,
committed, so a fresh clone keeps the rows); keys already there are skipped, so a killed run
resumes. ``--report-only`` prints the table again.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_methods.py
    .venv/bin/python benchmarks/bench_methods.py --report-only --docs docs/decompositions.md
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import _pareto_data as data_lib  # next to this file, first on sys.path when it runs
import norton
from _common import cpu_name, parse_list, read_results
from norton.decomposition.decompose import eligible_convs
from norton.decomposition.methods import METHODS, layer_macs
from norton.errors import UserError
from norton.example_inputs import module_input_shapes
from norton.io import append_jsonl, atomic_write_text
from norton.limits import check_epochs, check_int, check_target_macs
from norton.serialization import load_model_file

VARIANTS = ("decompose", "decompose+prune", "decompose+prune-ranks")
KEY_FIELDS = ("method", "budget", "variant", "seed")
TOLERANCE = 0.02  # a budget is met when |MACs / (budget * baseline MACs) - 1| <= 2%
PARETO_OUT = Path("runs/pareto")  # bench_pareto.py's default --out: its baseline cache
PARETO_MODEL = "resnet_20"
Rank = int | tuple[int, int]
MARKERS = ("<!-- bench_methods:begin -->", "<!-- bench_methods:end -->")


# ------------------------------------------------------------------ the rank search (no decomposition run)
@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer a method can decompose: its name, the layer, its input's ``(H, W)``, its dense MACs."""

    name: str
    module: nn.Module
    input_hw: tuple[int, int] | None
    dense_macs: int


@dataclasses.dataclass
class RankChoice:
    """The per-layer ranks of one search and how they were found (``ranks`` is ``None``: unreachable)."""

    ranks: dict[str, Rank] | None
    fraction: float  # the whole model's predicted MACs / the baseline's
    spec: str  # what a reader of the table needs to redo it
    reason: str = ""


def decomposable_layers(model: nn.Module, method: str, example: Tensor) -> list[Layer]:
    """The layers ``method`` would decompose in ``model``, in model order, with their input sizes on ``example``."""
    layers = eligible_convs(model, method=method)
    shapes = module_input_shapes(model, layers, example, eval_mode=True)
    out = []
    for name, module in layers.items():
        hw = None if isinstance(module, nn.Linear) else (int(shapes[name][-2]), int(shapes[name][-1]))
        out.append(Layer(name, module, hw, layer_macs(module, hw)))
    return out


def predicted_fraction(layers: Sequence[Layer], ranks: Mapping[str, Rank], method: str, base_macs: int) -> float:
    """The whole model's MACs with ``layers`` at ``ranks`` (closed forms), as a fraction of ``base_macs``."""
    spec = METHODS[method]
    change = sum(spec.block_macs(layer.module, ranks[layer.name], layer.input_hw) - layer.dense_macs
                 for layer in layers if layer.name in ranks)
    return (base_macs + change) / base_macs


def ranks_at(layers: Sequence[Layer], method: str, fraction: float) -> dict[str, Rank]:
    """The ranks ``"macs:<fraction>"`` gives each layer (the highest keeping at most that share of its MACs)."""
    spec = METHODS[method]
    return {layer.name: spec.select_rank(layer.module, "macs", fraction, layer.input_hw) for layer in layers}


def search_ranks(layers: Sequence[Layer], method: str, base_macs: int, target: float, *,
                 tolerance: float = TOLERANCE, steps: int = 40) -> RankChoice:
    """Per-layer ranks putting the whole model within ``tolerance`` of ``target`` of ``base_macs``.

    Bisection on ``F`` of ``"macs:F"`` (the model's MACs grow with ``F``); if no ``F`` lands in the
    band, the layers whose ranks differ between the configurations just above and just below it
    are moved down one at a time, deepest first, and the closest count is kept.
    """
    def size(ranks: Mapping[str, Rank]) -> float:
        return predicted_fraction(layers, ranks, method, base_macs)

    def within(fraction: float) -> bool:
        return abs(fraction / target - 1.0) <= tolerance

    floor = ranks_at(layers, method, 1e-9)  # rank 1 (the cheapest candidate) everywhere
    if size(floor) > target * (1 + tolerance):
        return RankChoice(None, size(floor), "", f"rank 1 everywhere keeps {size(floor):.3f} of the MACs")
    low, high = 1e-9, 1.0
    below: tuple[float, float, dict[str, Rank]] = (low, size(floor), floor)  # (F, fraction, ranks) under target
    above: tuple[float, float, dict[str, Rank]] | None = None
    for _ in range(steps):
        middle = (low + high) / 2
        ranks = ranks_at(layers, method, middle)
        fraction = size(ranks)
        if within(fraction):
            return RankChoice(ranks, fraction, f"macs:{middle:.6g}")
        if fraction > target:
            high, above = middle, (middle, fraction, ranks)
        else:
            low, below = middle, (middle, fraction, ranks)
    if above is None:
        return RankChoice(None, below[1], "", f"'macs:1' keeps only {below[1]:.3f} of the MACs")
    # Between two F's the MACs jump by several layers at once: move those layers one by one.
    moved = [layer.name for layer in reversed(layers) if above[2][layer.name] != below[2][layer.name]]
    best: tuple[float, int, dict[str, Rank]] | None = None
    for count in range(len(moved) + 1):
        ranks = {**above[2], **{name: below[2][name] for name in moved[:count]}}
        fraction = size(ranks)
        if best is None or abs(fraction / target - 1) < abs(best[0] / target - 1):
            best = (fraction, count, ranks)
    assert best is not None
    spec = f"macs:{above[0]:.6g}, then {best[1]} deepest layer(s) at macs:{below[0]:.6g}"
    if not within(best[0]):
        return RankChoice(None, best[0], spec, f"closest whole-model MACs {best[0]:.3f} (no rank choice lands within "
                                                f"{tolerance:.1%} of {target:g})")
    return RankChoice(best[2], best[0], spec)


def macs_fraction(model: nn.Module, base_macs: int, example: Tensor) -> float:
    return norton.count_complexity(model, example_inputs=example).macs / base_macs


def rank_summary(ranks: Mapping[str, Rank]) -> str:
    """``"1x3, 6x4, 12x12"``-style: each distinct rank and how many layers take it, in order."""
    counts: dict[str, int] = {}
    for rank in ranks.values():
        text = f"({rank[0]},{rank[1]})" if isinstance(rank, tuple) else str(rank)
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{text}x{n}" for text, n in counts.items())


def decompose_to(model: nn.Module, method: str, target: float, example: Tensor, seed: int) -> tuple[nn.Module | None, dict[str, Any]]:
    """A decomposed copy of ``model`` within 2% of ``target`` of its MACs, or ``(None, details)`` saying why not."""
    base_macs = norton.count_complexity(model, example_inputs=example).macs
    layers = decomposable_layers(model, method, example)
    choice = search_ranks(layers, method, base_macs, target)
    details: dict[str, Any] = {"spec": choice.spec, "predicted_fraction": choice.fraction}
    if choice.ranks is None:
        return None, {**details, "reason": choice.reason}
    work = copy.deepcopy(model)
    norton.decompose(work, dict(choice.ranks), method=method, example_inputs=example, seed=seed, progress=False)
    details.update(ranks={k: list(v) if isinstance(v, tuple) else v for k, v in choice.ranks.items()},
                   rank_summary=rank_summary(choice.ranks), decomposed_fraction=macs_fraction(work, base_macs, example))
    return work, details


def compress(model: nn.Module, method: str, budget: float, variant: str, example: Tensor, seed: int, *,
             mild: float = 1.4) -> tuple[nn.Module | None, dict[str, Any]]:
    """``model`` compressed by ``method`` to ``budget`` in ``variant``; ``(None, details with a reason)`` if it cannot."""
    if variant == "decompose":
        return decompose_to(model, method, budget, example, seed)
    # Without prune_ranks, pruning cannot touch a block's rank channels: when they alone hold more than
    # the budget (Tucker-2's core), the decomposition starts closer to the budget, at 1.2 then 1.1 times it.
    reasons = []
    for factor in dict.fromkeys((mild, 1.2, 1.1)):
        start = min(factor * budget, 0.95)
        work, details = decompose_to(model, method, start, example, seed)
        details["decompose_target"] = start
        if work is None:
            reasons.append(f"decomposing to {start:.3g}: {details['reason']}")
            continue
        try:
            norton.prune(work, example, target_macs=budget, criterion="l1",
                         prune_ranks=variant == "decompose+prune-ranks")
        except UserError as error:  # e.g. the prunable channels cannot take the model that low
            reasons.append(f"from {start:.3g}: {error}")
            continue
        return work, details
    return None, {"reason": "; ".join(reasons)}


# ------------------------------------------------------------------ results file
def record_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (record["method"], round(float(record["budget"]), 6), record["variant"], int(record["seed"]))


def run_missing(keys: Iterable[Mapping[str, Any]], path: Path, run_one: Callable[[dict[str, Any]], dict[str, Any]],
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``run_one(key)`` for every key not in ``path`` yet, appending each record as it finishes."""
    done = {record_key(r) for r in read_results(path)}
    new = []
    for key in keys:
        label = f"{key['method']} at {key['budget']:g}, {key['variant']}, seed {key['seed']}"
        if record_key(key) in done:
            log(f"{label}: done before, skipped")
            continue
        log(label)
        record = {**key, **run_one(dict(key))}
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(record, path)
        done.add(record_key(key))
        new.append(record)
    return new


# ------------------------------------------------------------------ the table
def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "params":
        return f"{value / 1e3:.1f}k"
    return format(value, fmt)


def render_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of ``records`` (the baseline first, then by budget, variant, method)."""
    order = {m: i for i, m in enumerate(METHODS)}
    lines = ["| budget | method | variant | ranks (whole-model search) | MACs kept | params | top-1 compressed (%) | "
             "top-1 fine-tuned (%) | wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["method"] == "baseline":
            lines.append(f"| 1 | baseline | - | - | 1.000 | {_cell(r.get('params'), 'params')} | "
                         f"{_cell(r.get('top1_compressed'), '.2f')} | - | - |")
    rows = sorted((r for r in records if r["method"] != "baseline"),
                  key=lambda r: (-float(r["budget"]), VARIANTS.index(r["variant"]), order.get(r["method"], 99), r["seed"]))
    for r in rows:
        head = f"| {r['budget']:g} | {r['method']} | {r['variant']} |"
        if r.get("status") != "ok":
            lines.append(f"{head} cannot reach the budget: {r.get('reason', '?')} | - | - | - | - | - |")
            continue
        ranks = f"{r['details']['rank_summary']} ({r['details']['spec']})"
        if r["variant"] != "decompose":
            pruning = "l1 pruning of widths and ranks" if r["variant"] == "decompose+prune-ranks" else "l1 pruning"
            ranks = f"{ranks}, at {r['details']['decomposed_fraction']:.3f}, then {pruning}"
        lines.append(f"{head} {ranks} | {r['macs_fraction']:.3f} | {_cell(r['params'], 'params')} | "
                     f"{r['top1_compressed']:.2f} | {r['top1_finetuned']:.2f} | {r['row_seconds']:.0f} |")
    return "\n".join(lines)


def write_between_markers(path: Path, body: str) -> None:
    """Replace what lies between :data:`MARKERS` in ``path`` by ``body`` (the rest of the file is kept)."""
    text = path.read_text()
    if text.count(MARKERS[0]) != 1 or text.count(MARKERS[1]) != 1:
        raise UserError(f"{path} needs exactly one {MARKERS[0]} line and one {MARKERS[1]} line around the table")
    head, rest = text.split(MARKERS[0])
    _, tail = rest.split(MARKERS[1])
    atomic_write_text(f"{head}{MARKERS[0]}\n{body}\n{MARKERS[1]}{tail}", path)


def environment_line(records: Iterable[Mapping[str, Any]]) -> str:
    envs = {(r["env"]["torch"], r["env"]["threads"], r["env"]["cpu"]) for r in records if "env" in r}
    return "; ".join(f"torch {t}, {n} thread(s), {cpu}" for t, n, cpu in sorted(envs))


# ------------------------------------------------------------------ running
def training_subset(data: data_lib.Data, train_images: int, seed: int) -> data_lib.Data:
    """``data`` with only the first ``train_images`` training images in the seed's order (all of them: ``data``)."""
    if train_images >= len(data.splits.train):
        return data
    order = torch.randperm(len(data.splits.train), generator=torch.Generator().manual_seed(seed))[:train_images]
    train = torch.utils.data.Subset(data.splits.train, order.tolist())
    return dataclasses.replace(data, splits=dataclasses.replace(data.splits, train=train))


def input_channels(model: nn.Module) -> int:
    """The channels ``model``'s first convolution reads (1: Fashion-MNIST as is, 3: repeated to RGB)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels not in (1, 3):
        raise UserError("the checkpoint's model does not start with a 1- or 3-channel convolution: "
                        "pass a model trained on Fashion-MNIST")
    return first.in_channels


def baseline_and_data(args: argparse.Namespace) -> tuple[nn.Module, data_lib.Data, str]:
    """``(baseline, its Fashion-MNIST, where the baseline is)``, the data read once.

    The baseline is ``--ckpt``'s model, or the Pareto benchmark's cached ResNet-20 (trained first
    if missing: ~20 min of CPU).
    """
    if args.ckpt:
        model = load_model_file(args.ckpt)[0]
        data = data_lib.build_data(data_dir=args.data_dir, limit=None, grey_to_rgb=input_channels(model) == 3)
        return model, data, args.ckpt
    data = data_lib.build_data(data_dir=args.data_dir, limit=None)
    epochs = data_lib.BASELINE_EPOCHS[PARETO_MODEL]
    model, _ = data_lib.trained_baseline(data, PARETO_OUT, model_name=PARETO_MODEL, epochs=epochs, seed=0, device="cpu")
    return model, data, str(data_lib.baseline_dir(PARETO_OUT, PARETO_MODEL, epochs, 0) / "baseline.pt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ckpt", default=None,
                        help="a model trained on Fashion-MNIST (default: bench_pareto.py's ResNet-20 baseline)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="0.5,0.3", help="fractions of the baseline's conv+linear MACs")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--mild", type=float, default=1.4, help="decompose+prune: decompose to this times the budget")
    parser.add_argument("--train-images", type=int, default=60_000, help="fine-tuning images (of 60,000)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default Debian's)")
    parser.add_argument("--out", default="benchmarks/results/methods.jsonl", help="the JSONL results (committed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="only print the table of --out")
    parser.add_argument("--docs", default=None,
                        help=f"also write the table between the {MARKERS[0]} / {MARKERS[1]} lines of this file")
    args = parser.parse_args(argv)
    # Every mistake is refused here, before a model or an image is read.
    args.methods = parse_list(args.methods, str, "methods")
    for name in args.methods:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    args.budgets = [check_target_macs(b, "--budgets") for b in parse_list(args.budgets, float, "budgets")]
    args.variants = parse_list(args.variants, str, "variants")
    for name in args.variants:
        if name not in VARIANTS:
            raise UserError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    args.seeds = [check_int(s, "--seeds", minimum=0) for s in parse_list(args.seeds, int, "seeds")]
    if not 1.0 < args.mild < 3.0:
        raise UserError(f"--mild must be in (1, 3), got {args.mild}")
    check_int(args.train_images, "--train-images", minimum=128, maximum=60_000)
    args.epochs = check_epochs(args.epochs, "--epochs", minimum=1)
    check_int(args.threads, "--threads", minimum=1)
    if not args.report_only and args.ckpt and not Path(args.ckpt).is_file():
        raise UserError(f"--ckpt {args.ckpt} does not exist: leave --ckpt out to use the Pareto benchmark's "
                        "baseline, or pass a model trained on Fashion-MNIST")
    return args


def run(args: argparse.Namespace, out: Path) -> None:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name()}
    print(f"torch {env['torch']}, {env['threads']} thread(s), {env['cpu']}", flush=True)
    command = " ".join([".venv/bin/python benchmarks/bench_methods.py", *sys.argv[1:]])
    baseline, data, ckpt = baseline_and_data(args)
    baseline = baseline.cpu().eval()
    example = torch.zeros(1, *data.input_size)
    base = norton.count_complexity(baseline, example_inputs=example)
    recipe = {**data_lib.FINETUNE_RECIPE, "epochs": args.epochs, "batch_size": data_lib.BATCH_SIZE,
              "train_images": args.train_images}

    def loaders(seed: int) -> Any:
        return data_lib.loaders_for(training_subset(data, args.train_images, seed), seed)

    def run_baseline(key: dict[str, Any]) -> dict[str, Any]:
        top1 = norton.evaluate(baseline, loaders(0).test, device="cpu", progress=False)["top1"]
        return {"status": "ok", "top1_compressed": top1, "macs": base.macs, "params": base.params, "env": env,
                "ckpt": ckpt, "command": command}

    def run_row(key: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        torch.manual_seed(key["seed"])
        model, details = compress(baseline, key["method"], key["budget"], key["variant"], example, key["seed"],
                                  mild=args.mild)
        compress_seconds = time.perf_counter() - started
        common = {"details": details, "env": env, "recipe": recipe, "ckpt": ckpt, "command": command,
                  "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        if model is None:
            print(f"  cannot reach the budget: {details['reason']}", flush=True)
            return {"status": "unreachable", "reason": details["reason"], **common}
        count = norton.count_complexity(model, example_inputs=example)
        print(f"  {details['spec']}: ranks {details['rank_summary']}, {count.macs / base.macs:.3f} of the MACs, "
              f"{compress_seconds:.0f} s", flush=True)
        row_loaders = loaders(key["seed"])
        before = norton.evaluate(model, row_loaders.test, device="cpu", progress=False)["top1"]
        print(f"  top-1 right after compression {before:.2f}%", flush=True)
        tuned = time.perf_counter()
        result = norton.fit(model, row_loaders, epochs=args.epochs, **data_lib.FINETUNE_RECIPE, device="cpu", seed=key["seed"],
                            progress=False, verbose=False)
        assert result.test is not None  # the test loader always exists
        row_seconds = time.perf_counter() - started
        print(f"  top-1 after fine-tuning {result.test['top1']:.2f}% ({time.perf_counter() - tuned:.0f} s; "
              f"row {row_seconds:.0f} s)", flush=True)
        return {"status": "ok", "top1_compressed": before, "top1_finetuned": result.test["top1"], "macs": count.macs,
                "macs_fraction": count.macs / base.macs, "params": count.params, "compress_seconds": compress_seconds,
                "finetune_seconds": time.perf_counter() - tuned, "row_seconds": row_seconds, **common}

    run_missing([{"method": "baseline", "budget": 1.0, "variant": "-", "seed": 0}], out, run_baseline)
    keys = [{"method": m, "budget": b, "variant": v, "seed": s}
            for b in args.budgets for v in args.variants for m in args.methods for s in args.seeds]
    run_missing(keys, out, run_row)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        if not args.report_only:
            run(args, out)
        records = read_results(out)
    except UserError as error:
        print(f"bench_methods: error: {error}", file=sys.stderr)
        return 2
    if not records:
        print(f"no results in {out} yet")
        return 0
    table = f"{render_table(records)}\n\nMeasured on: {environment_line(records)}."
    print(f"\n{table}")
    if args.docs:
        try:
            write_between_markers(Path(args.docs), table)
        except UserError as error:
            print(f"bench_methods: error: {error}", file=sys.stderr)
            return 2
        print(f"wrote the table into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
