"""Benchmark: batched pruning criteria vs a per-pair Python loop, on one large layer.

The loop side mirrors the reference implementation's structure (pvti/NORTON
``pruning/saliency.py``): a double loop over filter pairs that orthonormalises
the two filters' factors and computes their angles pair by pair, then a greedy
loop that scans the whole distance matrix at every step. It is written here
(correct angles via SVD, no reference code). Its pair loop is timed on a random
subset of pairs and extrapolated linearly to all N(N-1)/2 pairs.

    .venv/bin/python benchmarks/bench_criteria.py            # 512 filters, C_in 512, rank 8, 3x3, 2 threads
    .venv/bin/python benchmarks/bench_criteria.py --filters 256 --loop-pairs 500
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

# OpenMP's default active spin-wait makes every parallel region cost a scheduler
# tick (~4-8 ms here) when the cores are shared with other jobs: a 10x10 QR took
# 8 ms instead of 20 us. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from norton.decomposition.cpd_block import CPDBlock  # noqa: E402
from norton.deploy.timing import cpu_model  # noqa: E402
from norton.pruning.angles import _eigvalsh, _subspace_basis  # noqa: E402
from norton.pruning.criteria import (  # noqa: E402
    SubspaceCriterion,
    filter_removal_order,
    pairwise_distance,
    removal_order,
)


def median_time(fn, *, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds (all threads) of ``fn()``.

    CPU seconds are reported too because the benchmark machine may be shared:
    other jobs inflate wall time but barely change the CPU time we consume.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


# ------------------------------------------------------------------ loop baseline
def loop_pair_distance(factors, i: int, j: int) -> float:
    """pabs distance of one pair, the way a per-pair implementation computes it."""
    total = 0.0
    for factor in factors:  # head, body, tail
        qa, _ = torch.linalg.qr(factor[i])
        qb, _ = torch.linalg.qr(factor[j])
        cosines = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)
        total += torch.acos(cosines).sum().item()
    return total


def loop_greedy(distance: torch.Tensor) -> list[int]:
    """Reference-style greedy: scan the full matrix for its minimum at every step."""
    d = distance.clone()
    n = d.shape[0]
    d.fill_diagonal_(float("inf"))
    order = []
    for _ in range(n - 1):
        # the first closest pair in row-major order (float32 distances of 130k pairs do tie)
        i, j = torch.nonzero(d == d.min())[0].tolist()
        total_i = d[i][d[i] != float("inf")].sum()
        total_j = d[:, j][d[:, j] != float("inf")].sum()
        victim = i if total_i < total_j else j
        order.append(victim)
        d[victim, :] = float("inf")
        d[:, victim] = float("inf")
    return order


def cpu_name() -> str:
    return cpu_model() or platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=512)
    parser.add_argument("--in-channels", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-pairs", type=int, default=2000, help="pairs timed in the loop baseline")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.filters
    block = CPDBlock(args.in_channels, n, args.rank, args.kernel).eval()  # random factors (default init)
    conv = block.to_conv()
    factors = tuple(f.clone() for f in block.factors())
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | device cpu ({cpu_name()}, "
        f"{len(os.sched_getaffinity(0))} cores usable) | OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(
        f"layer: {n} filters, C_in {args.in_channels}, rank {args.rank}, {args.kernel}x{args.kernel}; "
        f"median of {args.repeats} runs after a warm-up; load average before: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )

    rows: list[tuple[str, tuple[float, float]]] = []
    distance = pairwise_distance(factors, "pabs")

    def timed(label, fn):
        rows.append((label, median_time(fn, repeats=args.repeats)))
        return rows[-1][1]

    timed("pabs: pairwise_distance", lambda: pairwise_distance(factors, "pabs"))
    timed("pabs: removal_order", lambda: removal_order(distance))
    fast, fast_cpu = timed("pabs: filter_removal_order (CPDBlock)", lambda: filter_removal_order(block, "pabs"))
    for name in ("csa", "vbd", "l1", "random"):
        timed(f"{name}: filter_removal_order (CPDBlock)", lambda name=name: filter_removal_order(block, name))
    # Where the pabs time goes (head factor only: a rank-R body/tail of k <= R rows spans R^k, so it is skipped).
    head = factors[0]
    basis, _ = _subspace_basis(head)  # (N, C_in, R)
    stacked = basis.transpose(1, 2).reshape(-1, basis.shape[1])  # (N*R, C_in)
    upper = torch.triu_indices(n, n, 1)
    gram = (stacked @ stacked.T).view(n, args.rank, n, args.rank)
    cross = gram.permute(0, 2, 1, 3)[upper[0], upper[1]]  # (P, R, R) = Q_i^T Q_j
    products = cross.mT @ cross  # (P, R, R)
    timed("  part: subspace bases (QR + SVD)", lambda: _subspace_basis(head))
    timed("  part: Gram of all bases (full; the code does half)", lambda: stacked @ stacked.T)
    timed(f"  part: {upper.shape[1]} eigvalsh of {args.rank}x{args.rank} (threaded)", lambda: _eigvalsh(products))
    ranked = SubspaceCriterion("pabs", rank=args.rank)
    timed(f"pabs: Conv2d, unfoldings (rank {args.rank})", lambda: ranked(conv))
    timed("pabs: Conv2d, unfoldings (full rank)", lambda: filter_removal_order(conv, "pabs"))

    # Loop baseline: time a random subset of pairs once (no repeats: it is the slow side), extrapolate.
    all_pairs = n * (n - 1) // 2
    g = torch.Generator().manual_seed(1)
    i, j = torch.randint(0, n, (2, args.loop_pairs), generator=g)
    keep = i != j
    i, j = i[keep].tolist(), j[keep].tolist()
    loop_pair_distance(factors, i[0], j[0])  # warm-up
    start, start_cpu = time.perf_counter(), time.process_time()
    loop_values = [loop_pair_distance(factors, a, b) for a, b in zip(i, j, strict=True)]
    scale = all_pairs / len(i)
    loop_pairs = (time.perf_counter() - start) * scale
    loop_pairs_cpu = (time.process_time() - start_cpu) * scale
    loop_order, loop_order_cpu = median_time(lambda: loop_greedy(distance), repeats=1)
    loop_total, loop_total_cpu = loop_pairs + loop_order, loop_pairs_cpu + loop_order_cpu
    agreement = (distance[i, j].double() - torch.tensor(loop_values, dtype=torch.float64)).abs().max().item()
    same_order = removal_order(distance).tolist()[:-1] == loop_greedy(distance)

    width = max(len(label) for label, _ in rows) + 2
    print()
    print(f"{'step':<{width}}{'wall s':>9}{'CPU s':>9}")
    for label, (wall, cpu) in rows:
        print(f"{label:<{width}}{wall:>9.3f}{cpu:>9.3f}")
    print(f"{'loop: pair distances (extrapolated)':<{width}}{loop_pairs:>9.2f}{loop_pairs_cpu:>9.2f}"
          f"   ({len(i)} of {all_pairs} pairs timed, {loop_pairs / all_pairs * 1e6:.0f} us/pair)")
    print(f"{'loop: greedy order (full scan)':<{width}}{loop_order:>9.2f}{loop_order_cpu:>9.2f}")
    print(f"{'loop: total':<{width}}{loop_total:>9.2f}{loop_total_cpu:>9.2f}")
    print()
    print(f"speedup pabs, loop total / filter_removal_order: {loop_total / fast:.0f}x wall, "
          f"{loop_total_cpu / fast_cpu:.0f}x CPU")
    print(f"max |batched - loop| over the timed pairs: {agreement:.1e} rad "
          "(the loop's arccos-only angles err by ~1e-3 where the batched sine formula gives ~1e-7)")
    print(f"same greedy order as the loop's full-scan greedy: {same_order}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

if __name__ == "__main__":
    main()
