"""Benchmark: norton's Tucker-2, layer-wise CP and spatial SVD vs tensorly's equivalents.

Every 3x3 convolution of the zoo's ``vgg_16_bn`` (13 layers; kaiming-normal init, the
zoo's default, since no pretrained weights exist here: random kernels are the hard case
for HOOI and ALS, trained ones have faster-decaying spectra) is decomposed by

* ``tucker2``: ``norton.decomposition.tucker2.tucker2(W, (ceil(C/4), ceil(N/4)))`` vs
  ``tensorly.decomposition.partial_tucker(W, [ceil(N/4), ceil(C/4)], modes=[0, 1])``
  (both from the HOSVD start, each with its default stopping rule);
* ``cp-layer``: ``norton.decomposition.layer_cp.layer_cp(W, ceil(min(N, C)/4))`` vs
  ``tensorly.decomposition.parafac(W, R, init='svd', n_iter_max=100, tol=1e-7)``;
* ``svd``: ``norton.decomposition.svd.spatial_svd(W, ceil(max_rank/4))`` vs
  ``tensorly.tenalg.svd_interface`` on the same ``(C k_h, N k_w)`` matrix.

Times: norton is the median of ``--repeats`` runs after one warm-up; tensorly (slow)
the median of ``--tl-repeats`` runs after one warm-up (``--tl-repeats 1`` by default).
Errors are ``||W - W_hat|| / ||W||`` of each result, computed here the same way. The
last lines sum each method's times over the benchmarked layers (what decomposing the
whole network costs) and count the layers where norton's error is not above tensorly's.

    .venv/bin/python benchmarks/bench_decompositions.py --quick     # 3 layers, < 1 min
    .venv/bin/python benchmarks/bench_decompositions.py             # all 13 layers
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

from norton.decomposition.layer_cp import layer_cp, layer_cp_to_tensor
from norton.decomposition.svd import spatial_svd, spatial_svd_max_rank, spatial_svd_to_tensor
from norton.decomposition.tucker2 import tucker2, tucker2_to_tensor
from norton.models import create_model

QUICK_LAYERS = (0, 2, 4)  # 3->64, 64->128, 128->256


def _median_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _error(rebuilt: torch.Tensor, w: torch.Tensor) -> float:
    return float((rebuilt - w).norm() / w.norm())


def _methods(w: torch.Tensor) -> dict[str, tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    n, c, kh, kw = w.shape
    r_in, r_out = math.ceil(c / 4), math.ceil(n / 4)
    r_cp = math.ceil(min(n, c) / 4)
    r_svd = math.ceil(spatial_svd_max_rank(w.shape) / 4)
    matrix = w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)

    def tl_tucker() -> torch.Tensor:
        (core, factors), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd")
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])

    def tl_cp() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank above the spatial modes: tensorly fills randomly
            return tl.cp_to_tensor(parafac(w, r_cp, init="svd", n_iter_max=100, tol=1e-7, random_state=0))

    def tl_svd() -> torch.Tensor:
        u, s, vt = tl.tenalg.svd_interface(matrix, n_eigenvecs=r_svd)
        return ((u * s) @ vt).reshape(c, kh, n, kw).permute(2, 0, 1, 3)

    return {
        "tucker2": (f"({r_in},{r_out})", lambda: tucker2_to_tensor(tucker2(w, (r_in, r_out))[0]), tl_tucker),
        "cp-layer": (str(r_cp), lambda: layer_cp_to_tensor(layer_cp(w, r_cp)[0]), tl_cp),
        "svd": (str(r_svd), lambda: spatial_svd_to_tensor(*spatial_svd(w, r_svd)[:2]), tl_svd),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only layers {QUICK_LAYERS} (< 1 min)")
    parser.add_argument("--methods", default="tucker2,cp-layer,svd")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tl-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tl.set_backend("pytorch")
    torch.manual_seed(0)
    model = create_model("vgg_16_bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    chosen = QUICK_LAYERS if args.quick else range(len(convs))
    print(f"torch {torch.__version__}, tensorly {tl.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, {platform.processor() or platform.machine()}")
    print(f"{'layer':>5} {'shape':>18} {'method':>8} {'rank':>9} {'norton s':>9} {'tensorly s':>10} "
          f"{'speed-up':>8} {'err norton':>10} {'err tensorly':>12}")
    totals: dict[str, list[float]] = {}  # method -> [norton s, tensorly s, layers, error <= tensorly's, min speed-up]
    for index in chosen:
        w = convs[index].weight.detach().to(args.device)
        for name, (rank, ours, theirs) in _methods(w).items():
            if name not in args.methods.split(","):
                continue
            t_ours, rebuilt_ours = _median_time(ours, args.repeats)
            t_theirs, rebuilt_theirs = _median_time(theirs, args.tl_repeats)
            err_ours, err_theirs = _error(rebuilt_ours, w), _error(rebuilt_theirs, w)
            sums = totals.setdefault(name, [0.0, 0.0, 0, 0, math.inf])
            sums[0] += t_ours
            sums[1] += t_theirs
            sums[2] += 1
            sums[3] += err_ours <= err_theirs
            sums[4] = min(sums[4], t_theirs / t_ours)
            print(f"{index:>5} {str(tuple(w.shape)):>18} {name:>8} {rank:>9} {t_ours:>9.3f} {t_theirs:>10.3f} "
                  f"{t_theirs / t_ours:>7.1f}x {err_ours:>10.4f} {err_theirs:>12.4f}"
                  f"{'' if err_ours <= err_theirs else f'  (norton higher by {err_ours - err_theirs:.1e})'}")
    # a user decomposes the whole network: the sums are what they wait for
    for name, (ours_total, theirs_total, layers, not_worse, slowest) in totals.items():
        print(f"total {name} ({layers} layers): norton {ours_total:.3f} s, tensorly {theirs_total:.3f} s, "
              f"{theirs_total / ours_total:.1f}x (per layer >= {slowest:.1f}x); error <= tensorly's on {not_worse}/{layers}")


if __name__ == "__main__":
    main()
