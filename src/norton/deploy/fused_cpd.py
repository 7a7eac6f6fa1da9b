"""The ``"fused"`` form of a CPDBlock: pointwise 1x1, then one Triton kernel for depthwise + rank sum.

A CPDBlock's pointwise conv is a matmul (compute-bound, cuDNN/cuBLAS do it well); what
follows is memory-bound. The merged form writes the pointwise output ``(B, R*N, H, W)``,
reads it in a depthwise ``k_h x k_w`` conv, writes ``(B, R*N, H', W')``, then reads that
again to sum the ``R`` rank groups: three passes over an ``R*N``-channel tensor. The kernel
here reads the pointwise output once and writes only ``(B, N, H', W')``::

    out[b, n, oh, ow] = bias[n] + sum_r sum_{i, j} y[b, r*N + n, oh*s_h - p_h + i*d_h, ow*s_w - p_w + j*d_w]
                                                   * K[r*N + n, i, j]

with ``K`` the merged depthwise kernel (outer product of the vertical and horizontal
factors, :func:`norton.deploy.forms.merged_kernels`), accumulated in float32 whatever the
storage dtype. It honours any strides, so NCHW and channels-last inputs both work.

:class:`FusedCPDConv` is a :class:`~norton.deploy.forms.MergedCPDConv` (same parameters,
same state-dict keys, same BatchNorm folding) whose forward runs the kernel when it can:
on CUDA tensors, or anywhere under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported: how the tests run it on CPU). Elsewhere it computes the
merged form, so a model saved with fused layers loads and runs on any device. The
timing chooser (:mod:`norton.deploy.choice`) offers it on CUDA only and keeps it only
where it measures faster than the other forms.
"""
from __future__ import annotations

import os
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from norton.deploy.forms import MergedCPDConv

try:  # Triton ships with torch's CUDA builds on Linux; elsewhere the form falls back to "merged"
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Read once, like Triton itself, which decides at decoration time whether @triton.jit interprets.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_PIXELS, BLOCK_FILTERS = 64, 32


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused kernel runs on ``device``: Triton installed and CUDA (or the interpreter)."""
    return triton is not None and (torch.device(device).type == "cuda" or INTERPRET)


def kernel_runs_on(x: Tensor) -> bool:
    """Whether :func:`depthwise_rank_sum` can run on ``x`` (else the merged form is computed)."""
    return triton is not None and (x.is_cuda or INTERPRET)


if triton is not None:

    @triton.jit
    def _depthwise_rank_sum_kernel(
        y_ptr, w_ptr, bias_ptr, out_ptr,
        N, H, W, OH, OW, R,
        sy_b, sy_c, sy_h, sy_w,
        so_b, so_c, so_h, so_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # program (pixel tile of image b, filter tile): a (BLOCK_P, BLOCK_N) tile of the output
        tiles = tl.cdiv(OH * OW, BLOCK_P)
        pid_p = tl.program_id(0)
        b = (pid_p // tiles).to(tl.int64)  # int64: offsets of large batches overflow int32
        p = (pid_p % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) output pixels
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) filters
        p_ok = p < OH * OW
        n_ok = n < N
        oh = p // OW
        ow = p % OW
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for r in range(R):
            c = r * N + n  # (BLOCK_N,) rank-major channel of component r of filter n
            for i in tl.static_range(KH):
                ih = oh * stride_h - pad_h + i * dil_h
                h_ok = p_ok & (ih >= 0) & (ih < H)
                for j in tl.static_range(KW):
                    iw = ow * stride_w - pad_w + j * dil_w
                    ok = h_ok & (iw >= 0) & (iw < W)  # zero padding: masked loads read 0
                    offsets = b * sy_b + c[None, :] * sy_c + ih[:, None] * sy_h + iw[:, None] * sy_w
                    v = tl.load(y_ptr + offsets, mask=ok[:, None] & n_ok[None, :], other=0.0)
                    k = tl.load(w_ptr + c * (KH * KW) + i * KW + j, mask=n_ok, other=0.0)  # (BLOCK_N,)
                    acc += v.to(tl.float32) * k.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        offsets = b * so_b + n[None, :] * so_c + oh[:, None] * so_h + ow[:, None] * so_w
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


def depthwise_rank_sum(
    y: Tensor, weight: Tensor, bias: Tensor | None, rank: int,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    *, block_pixels: int = BLOCK_PIXELS, block_filters: int = BLOCK_FILTERS,
) -> Tensor:
    """Depthwise conv of ``y (B, R*N, H, W)`` with ``weight (R*N, 1, k_h, k_w)``, summed over the ``R``
    rank groups, plus ``bias (N,)``: ``(B, N, H', W')`` in ``y``'s dtype and memory format. Zero padding."""
    if triton is None:
        raise RuntimeError("the fused CPD kernel needs Triton (pip install triton)")
    batch, channels, height, width = y.shape
    n = channels // rank
    kh, kw = int(weight.shape[-2]), int(weight.shape[-1])
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    layout = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) and channels > 1 \
        else torch.contiguous_format
    out = torch.empty((batch, n, out_h, out_w), device=y.device, dtype=y.dtype, memory_format=layout)
    weight = weight.contiguous()
    block_n = min(block_filters, triton.next_power_of_2(n))
    block_p = min(block_pixels, triton.next_power_of_2(out_h * out_w))
    grid = (batch * triton.cdiv(out_h * out_w, block_p), triton.cdiv(n, block_n))
    _depthwise_rank_sum_kernel[grid](
        y, weight, bias if bias is not None else weight, out,
        n, height, width, out_h, out_w, rank,
        *y.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return out


class FusedCPDConv(MergedCPDConv):
    """Form ``"fused"``: pointwise 1x1, then :func:`depthwise_rank_sum` (the merged form where it cannot run)."""

    form_name = "fused"

    def forward(self, x: Tensor) -> Tensor:
        if not kernel_runs_on(x):
            return super().forward(x)
        y = self.pointwise(x)  # (B, R*N, H, W)
        conv = self.depthwise
        ph, pw = cast(tuple[int, int], conv.padding)  # always a pair: built from the CPDBlock's explicit padding
        if conv.padding_mode != "zeros":  # pad explicitly, as nn.Conv2d does, then the kernel pads nothing
            y = F.pad(y, (pw, pw, ph, ph), mode=conv.padding_mode)
            ph = pw = 0
        stride, dilation = cast(tuple[int, int], conv.stride), cast(tuple[int, int], conv.dilation)
        return depthwise_rank_sum(y, conv.weight, self.bias, self.rank, stride, (ph, pw), dilation)
