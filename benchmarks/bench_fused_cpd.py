"""The fused CPD kernel against the other forms, per layer, on a GPU: correct, and is it faster?

For ResNet-50-like CPDBlock shapes (rank 1 and 4, the paper's widths) it checks that the
``"fused"`` form equals the ``"merged"`` one and times every inference form (interleaved,
medians, cudnn.benchmark on) in float32 and bfloat16, channels-last. The fused form is
kept in norton only because the timing chooser picks it where it is faster; this prints
where that is. Needs CUDA and Triton.

    .venv/bin/python benchmarks/bench_fused_cpd.py              # ~1 min on one GPU
    .venv/bin/python benchmarks/bench_fused_cpd.py --batch 32 256 --json fused.json
"""
from __future__ import annotations

import argparse
import json

import torch

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.forms import build_form
from norton.deploy.timing import compare_callables

# (C_in, N, H=W, stride) of ResNet-50's 3x3 convs, one per stage, as pruned by the paper's config
SHAPES = [(64, 64, 56, 1), (115, 115, 28, 1), (154, 154, 14, 1), (128, 128, 7, 1), (256, 256, 14, 2)]
FORMS = ("cpd", "merged", "grouped", "dense", "fused")


def runner(module: torch.nn.Module, x: torch.Tensor):
    def run() -> torch.Tensor:
        with torch.no_grad():
            return module(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_cpd.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; median ms per form (fastest marked *)")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch in args.batch:
            for c_in, n, side, stride in SHAPES:
                for rank in args.ranks:
                    block = CPDBlock(c_in, n, rank, 3, stride=stride, padding=1).to(device, dtype).eval()
                    x = torch.randn(batch, c_in, side, side, device=device, dtype=dtype)
                    x = x.to(memory_format=torch.channels_last)
                    forms = {f: build_form(block, f).to(memory_format=torch.channels_last) for f in FORMS}
                    with torch.no_grad():
                        merged, fused = forms["merged"](x), forms["fused"](x)
                    error = ((fused.float() - merged.float()).abs().max() / merged.float().abs().max()).item()

                    stats = compare_callables({f: runner(m, x) for f, m in forms.items()}, warmup=3,
                                              repeats=args.repeats, device=device)
                    ms = {f: s.median_ms for f, s in stats.items()}
                    best = min(ms, key=ms.__getitem__)
                    cells = "  ".join(f"{f} {v:7.3f}{'*' if f == best else ' '}" for f, v in ms.items())
                    print(f"{str(dtype)[6:]:>8} b{batch:<4} {c_in:>3}->{n:<3} {side:>3}px s{stride} R{rank}: "
                          f"{cells}  (fused vs merged {error:.1e})", flush=True)
                    rows.append({"dtype": str(dtype), "batch": batch, "c_in": c_in, "n": n, "side": side,
                                 "stride": stride, "rank": rank, "median_ms": ms, "fused_error": error})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
