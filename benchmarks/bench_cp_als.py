"""Benchmark: batched CP-ALS (norton) vs the reference's per-filter tensorly loop.

Every 3x3 convolution of the zoo's ``vgg_16_bn`` (CIFAR VGG-16-BN, 13 layers,
4224 filters; random init, since no pretrained weights exist here) is decomposed
filter by filter at CP rank 8:

* ``norton batched``: ``norton.decomposition.cp_als.cp_als_many`` on all layers in one call;
* ``norton per layer``: ``norton.decomposition.cp_als.cp_als`` once per layer (what
  ``CPDBlock.from_conv`` does);
* ``tensorly``: the reference implementation's loop, ``parafac(W[n], rank=8,
  n_iter_max=300, init='random')`` per filter with tensorly's pytorch backend.

The tensorly loop over all filters takes a long time, so by default it runs on a
deterministic sample of ``--sample`` evenly spaced filters per layer and its
per-layer time is extrapolated (mean time per filter x filters); errors are
compared on exactly the sampled filters. ``--full`` runs tensorly on every filter.
norton's timings are medians of ``--repeats`` runs after ``--warmup`` runs; all
sides run in this process, one after another, at the same thread count.

    .venv/bin/python benchmarks/bench_cp_als.py                 # 16 filters per layer for tensorly
    .venv/bin/python benchmarks/bench_cp_als.py --full          # every filter (~15 min on 1 core)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cp_als.py --threads 2   # busy CPU: see docs/cp_als.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import tensorly
import torch
from tensorly.decomposition import parafac
from torch import nn

from norton.decomposition.cp_als import cp_als, cp_als_many
from norton.models import create_model


def conv_weights(model_name: str, seed: int) -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = create_model(model_name)
    return [
        (name, module.weight.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.kernel_size) == (3, 3)
    ]


def median_time(fn, *, warmup: int, repeats: int) -> tuple[float, object]:
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tensorly_loop(weight: torch.Tensor, indices: list[int], args) -> tuple[list[float], list[float]]:
    """The reference's loop on ``weight[indices]``: per-filter wall times and relative errors."""
    times, errors = [], []
    for n in indices:
        filter_ = weight[n]
        start = time.perf_counter()
        cp = parafac(filter_, rank=args.rank, n_iter_max=args.tensorly_iters, init="random", random_state=args.seed + n)
        times.append(time.perf_counter() - start)
        errors.append(float((filter_ - tensorly.cp_to_tensor(cp)).norm() / filter_.norm()))
    return times, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg_16_bn")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n-iter-max", type=int, default=100, help="norton's sweep budget (library default)")
    parser.add_argument("--tol", type=float, default=1e-7, help="norton's tolerance (library default)")
    parser.add_argument("--tensorly-iters", type=int, default=300, help="as the reference implementation")
    parser.add_argument("--sample", type=int, default=16, help="filters per layer for tensorly (ignored with --full)")
    parser.add_argument("--full", action="store_true", help="run tensorly on every filter, no extrapolation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=int, nargs="*", default=[25, 50, 100, 200, 400],
                        help="n_iter_max values for the error-vs-sweeps table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    layers = conv_weights(args.model, args.seed)
    weights = [w for _, w in layers]
    options = dict(n_iter_max=args.n_iter_max, tol=args.tol)

    batched_s, batched = median_time(
        lambda: cp_als_many(weights, args.rank, **options), warmup=args.warmup, repeats=args.repeats
    )
    per_layer_s = [
        median_time(lambda w=w: cp_als(w, args.rank, **options), warmup=args.warmup, repeats=args.repeats)[0]
        for w in weights
    ]

    rows, all_ours, all_ref = [], [], []
    with tensorly.backend_context("pytorch"):
        for (name, weight), (_, ours), layer_s in zip(layers, batched, per_layer_s, strict=False):
            n = weight.shape[0]
            if args.full or args.sample >= n:
                indices = list(range(n))
            else:  # evenly spaced, deterministic
                indices = torch.linspace(0, n - 1, args.sample).round().long().unique().tolist()
            times, ref_errors = tensorly_loop(weight, indices, args)
            ours_sampled = ours[indices].tolist()
            all_ours += ours_sampled
            all_ref += ref_errors
            rows.append(
                dict(
                    indices=indices, name=name, shape="x".join(map(str, weight.shape)), filters=n, sampled=len(indices),
                    ours_sampled=statistics.fmean(ours_sampled), ref=statistics.fmean(ref_errors),
                    ours_all=float(ours.mean()), ours_s=layer_s, ref_s=statistics.fmean(times) * n,
                )
            )
    # how the error falls with the sweep budget (tol=0: every tensor runs all sweeps)
    budgets = []
    for n_iter_max in args.budgets:
        start = time.perf_counter()
        results = cp_als_many(weights, args.rank, n_iter_max=n_iter_max, tol=0.0)
        seconds = time.perf_counter() - start
        every = torch.cat([errors for _, errors in results])
        sampled = torch.cat([errors[row["indices"]] for (_, errors), row in zip(results, rows, strict=False)])
        budgets.append((n_iter_max, seconds, float(every.mean()), float(sampled.mean())))
    load_after = os.getloadavg()

    extrapolated = any(row["sampled"] < row["filters"] for row in rows)
    star = "*" if extrapolated else ""
    header = (
        f"{'layer':<16} {'weight':>14} {'filters':>7} {'sampled':>7} | {'err norton':>10} {'err tensorly':>12} "
        f"| {'err norton (all)':>16} | {'norton s':>9} {'tensorly s' + star:>11} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<16} {row['shape']:>14} {row['filters']:>7} {row['sampled']:>7} | "
            f"{row['ours_sampled']:>10.4f} {row['ref']:>12.4f} | {row['ours_all']:>16.4f} | "
            f"{row['ours_s']:>9.3f} {row['ref_s']:>11.1f} {row['ref_s'] / row['ours_s']:>6.0f}x"
        )
    print("-" * len(header))
    filters = sum(row["filters"] for row in rows)
    ref_total = sum(row["ref_s"] for row in rows)
    ours_all = sum(row["ours_all"] * row["filters"] for row in rows) / filters
    print(
        f"{'total':<16} {'':>14} {filters:>7} {len(all_ours):>7} | {statistics.fmean(all_ours):>10.4f} "
        f"{statistics.fmean(all_ref):>12.4f} | {ours_all:>16.4f} | {sum(per_layer_s):>9.3f} {ref_total:>11.1f} "
        f"{ref_total / sum(per_layer_s):>6.0f}x"
    )
    print()
    print(f"norton batched (cp_als_many, all {len(rows)} layers in one call): {batched_s:.3f} s "
          f"-> {ref_total / batched_s:.0f}x less wall time than the tensorly loop")
    print(f"norton per layer (cp_als per layer, sum of medians):            {sum(per_layer_s):.3f} s "
          f"-> {ref_total / sum(per_layer_s):.0f}x")
    print(f"tensorly loop over all {filters} filters{' (extrapolated)' if extrapolated else ''}: {ref_total:.1f} s")
    print(f"mean relative error on the {len(all_ours)} compared filters: norton {statistics.fmean(all_ours):.5f}, "
          f"tensorly {statistics.fmean(all_ref):.5f}")
    print("\nnorton batched, error vs sweep budget (tol=0: every filter runs every sweep; one run each):")
    print(f"{'n_iter_max':>10} {'seconds':>8} {'mean err (all)':>15} {'mean err (sampled)':>19}   "
          f"tensorly (sampled): {statistics.fmean(all_ref):.5f}")
    for n_iter_max, seconds, every, sampled in budgets:
        print(f"{n_iter_max:>10} {seconds:>8.2f} {every:>15.5f} {sampled:>19.5f}")
    if extrapolated:
        print(f"* tensorly times extrapolated from {args.sample} evenly spaced filters per layer "
              "(mean time per filter x filters); errors compared on those same filters")
    print(
        f"\nmodel {args.model} (random init), rank {args.rank}; norton n_iter_max={args.n_iter_max} tol={args.tol} "
        f"init=svd, median of {args.repeats} after {args.warmup} warm-up; tensorly {tensorly.__version__} "
        f"n_iter_max={args.tensorly_iters} init=random"
    )
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu ({cpu}, {os.cpu_count()} cores), "
        f"load average before {load_before[0]:.1f} / after {load_after[0]:.1f}"
    )


if __name__ == "__main__":
    main()
