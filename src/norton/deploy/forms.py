"""Equivalent forms of a CPDBlock: the same function, computed by different convolutions.

A rank-``R`` CPDBlock ``(N filters, C_in inputs, k_h x k_w)`` can run as:

``"cpd"``      the block itself: pointwise 1x1 -> depthwise k_h x 1 -> depthwise 1 x k_w -> rank sum.
``"merged"``   pointwise 1x1 (C_in -> R*N) -> one depthwise k_h x k_w conv -> rank sum
               (the two 1-D kernels multiplied into one: one pass over R*N channels less).
``"grouped"``  pointwise 1x1 (C_in -> N*R, channels filter-major ``n*R + r``) -> a grouped
               k_h x k_w conv ``Conv2d(N*R, N, groups=N)``: each group reads the R rank
               components of one filter, so the rank sum happens inside the conv.
``"dense"``    the block re-materialised as one dense (possibly pruned) ``nn.Conv2d``.
``"fused"``    (CUDA) pointwise 1x1, then one Triton kernel for depthwise k_h x k_w + rank sum
               (:mod:`norton.deploy.fused_cpd`): the ``R*N``-channel intermediate is read once.

The layer-level decomposed blocks (:class:`~norton.decomposition.factorized.FactorizedConv`:
Tucker-2, layer-wise CP, SVD; and :class:`~norton.decomposition.low_rank_layers.LowRankLinear`)
have two forms: ``"factored"`` (the block itself, a chain of plain layers) and ``"dense"``
(its reconstructed ``nn.Conv2d`` / ``nn.Linear``).

*Inference forms* (:func:`build_form`) are new modules holding copies of the kernels.
*Training forms* (:func:`set_training_form`) keep the CPDBlock and its parameters and
recompute the kernels from the factors at every forward, so gradients reach the
factors and optimizers, checkpoints and state-dict keys are unchanged. Which form is
fastest is decided in :mod:`norton.deploy.optimize`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.factorized import FactorizedConv
from norton.decomposition.low_rank_layers import LowRankLinear
from norton.errors import UserError

INFERENCE_FORMS = ("cpd", "merged", "grouped", "dense")
# Forms with a kernel of their own that runs on CUDA only (norton.deploy.fused_cpd); elsewhere
# they compute the merged form, so a recorded model still loads and runs on CPU.
GPU_FORMS = ("fused",)
TRAINING_FORMS = ("cpd", "merged", "grouped", "dense")
# The forms of a layer-level decomposed block; a record holds these too.
FACTORED_FORMS = ("factored", "dense")
RECORDED_FORMS = (*INFERENCE_FORMS, *GPU_FORMS, "factored")
LAYER_BLOCKS = (FactorizedConv, LowRankLinear)


def is_layer_block(module: nn.Module | None) -> bool:
    """A layer-level decomposed block (Tucker-2, layer-wise CP, SVD), whose forms are :data:`FACTORED_FORMS`."""
    return isinstance(module, LAYER_BLOCKS)


# ====================================================================== kernels
# Pure functions of a block's parameters, differentiable in the factors: the
# inference forms copy them once, the training forms recompute them every step.
def _factor_weights(block: CPDBlock) -> tuple[Tensor, Tensor, Tensor]:
    n, r = block.out_channels, block.rank
    head = block.pointwise.weight.reshape(r, n, block.in_channels)  # (R, N, C_in)
    body = block.vertical.weight.reshape(r, n, block.kernel_size[0])  # (R, N, k_h)
    tail = block.horizontal.weight.reshape(r, n, block.kernel_size[1])  # (R, N, k_w)
    return head, body, tail


def merged_kernels(block: CPDBlock) -> tuple[Tensor, Tensor]:
    """``pointwise (R*N, C_in, 1, 1)`` (rank-major, as in the block) and ``depthwise (R*N, 1, k_h, k_w)``."""
    _, body, tail = _factor_weights(block)
    depthwise = body.unsqueeze(-1) * tail.unsqueeze(-2)  # (R, N, k_h, k_w): outer product per channel
    return block.pointwise.weight, depthwise.reshape(-1, 1, *block.kernel_size)


def grouped_kernels(block: CPDBlock) -> tuple[Tensor, Tensor]:
    """``pointwise (N*R, C_in, 1, 1)`` (filter-major ``n*R + r``) and ``grouped (N, R, k_h, k_w)``."""
    head, body, tail = _factor_weights(block)
    pointwise = head.transpose(0, 1).reshape(-1, block.in_channels, 1, 1)  # (R, N, C) -> (N, R, C) -> (N*R, C, 1, 1)
    grouped = (body.unsqueeze(-1) * tail.unsqueeze(-2)).transpose(0, 1)  # (R, N, k_h, k_w) -> (N, R, k_h, k_w)
    return pointwise, grouped.contiguous()


def _conv(block: CPDBlock, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``F.conv2d`` with the block's stride/padding/dilation, honouring ``padding_mode``."""
    padding: Any = block.padding
    if block.padding_mode != "zeros":
        ph, pw = block.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=block.padding_mode)
        padding = 0
    return F.conv2d(x, weight, bias, block.stride, padding, block.dilation, groups)


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _rank_sum(y: Tensor, rank: int, out_channels: int) -> Tensor:
    return y.unflatten(1, (rank, out_channels)).sum(1)  # (B, R*N, H, W) -> (B, N, H, W)


# ================================================================ inference forms
class MergedCPDConv(nn.Module):
    """Form ``"merged"``: pointwise 1x1 -> one depthwise ``k_h x k_w`` conv -> rank sum (+ bias)."""

    form_name = "merged"

    def __init__(self, block: CPDBlock) -> None:
        super().__init__()
        n, r = block.out_channels, block.rank
        channels = r * n
        factory: dict[str, Any] = {"device": block.pointwise.weight.device, "dtype": block.pointwise.weight.dtype}
        self.rank, self.out_channels = r, n
        self.pointwise = nn.Conv2d(block.in_channels, channels, 1, bias=False, **factory)
        self.depthwise = nn.Conv2d(
            channels, channels, block.kernel_size, stride=block.stride, padding=block.padding,
            dilation=block.dilation, groups=channels, bias=False, padding_mode=block.padding_mode, **factory,
        )
        self.bias: nn.Parameter | None = None
        if block.bias is not None:
            self.bias = nn.Parameter(block.bias.detach().clone())
        with torch.no_grad():
            pointwise, depthwise = merged_kernels(block)
            self.pointwise.weight.copy_(pointwise)
            self.depthwise.weight.copy_(depthwise)

    def forward(self, x: Tensor) -> Tensor:
        y = self.depthwise(self.pointwise(x))  # (B, R*N, H', W')
        return _add_bias(_rank_sum(y, self.rank, self.out_channels), self.bias)


class GroupedCPDConv(nn.Sequential):
    """Form ``"grouped"``: pointwise 1x1 (filter-major channels) -> ``Conv2d(N*R, N, k, groups=N)``.

    Two plain convs in a Sequential: MAC counters, pruners and exporters see only ``nn.Conv2d``.
    """

    form_name = "grouped"

    def __init__(self, block: CPDBlock) -> None:
        n, r = block.out_channels, block.rank
        factory: dict[str, Any] = {"device": block.pointwise.weight.device, "dtype": block.pointwise.weight.dtype}
        pointwise = nn.Conv2d(block.in_channels, n * r, 1, bias=False, **factory)
        grouped = nn.Conv2d(
            n * r, n, block.kernel_size, stride=block.stride, padding=block.padding, dilation=block.dilation,
            groups=n, bias=block.bias is not None, padding_mode=block.padding_mode, **factory,
        )
        with torch.no_grad():
            pointwise_weight, grouped_weight = grouped_kernels(block)
            pointwise.weight.copy_(pointwise_weight)
            grouped.weight.copy_(grouped_weight)
            if block.bias is not None and grouped.bias is not None:
                grouped.bias.copy_(block.bias)
        super().__init__()
        self.pointwise = pointwise
        self.grouped = grouped


def dense_form(block: CPDBlock) -> nn.Conv2d:
    """Form ``"dense"``: the block as one ``nn.Conv2d`` (tagged ``norton_form = "dense"``)."""
    conv = block.to_conv()
    # A plain attribute: the module stays an exact nn.Conv2d for counters and exporters.
    conv.norton_form = "dense"  # type: ignore[assignment]  # nn.Module's __setattr__ stub types only tensors/modules
    return conv


def build_form(block: nn.Module, form: str) -> nn.Module:
    """The inference module of ``form`` computing the same function as ``block`` (a CPDBlock or a layer block)."""
    if is_layer_block(block):
        if form == "factored":
            return block
        if form == "dense":
            dense = block.to_linear() if isinstance(block, LowRankLinear) else cast(FactorizedConv, block).to_conv()
            dense.norton_form = "dense"  # type: ignore[assignment]  # a plain attribute (see dense_form)
            return dense
        raise UserError(f"unknown form {form!r} of a {type(block).__name__}; choose from {', '.join(FACTORED_FORMS)}")
    assert isinstance(block, CPDBlock)
    if form == "cpd":
        return block
    if form == "merged":
        return MergedCPDConv(block)
    if form == "grouped":
        return GroupedCPDConv(block)
    if form == "dense":
        return dense_form(block)
    if form == "fused":
        from norton.deploy.fused_cpd import FusedCPDConv  # Triton is imported only when asked for

        return FusedCPDConv(block)
    raise UserError(f"unknown inference form {form!r}; choose from {', '.join((*INFERENCE_FORMS, *GPU_FORMS))}")


def form_of(module: nn.Module) -> str | None:
    """The form name of a module built here (``"cpd"`` for a CPDBlock), else ``None``."""
    if isinstance(module, CPDBlock):
        return "cpd"
    if is_layer_block(module):
        return "factored"
    return getattr(module, "form_name", None) or getattr(module, "norton_form", None)


# ================================================================ training forms
def _forward_cpd(block: CPDBlock, x: Tensor) -> Tensor:
    return CPDBlock.forward(block, x)


def _forward_merged(block: CPDBlock, x: Tensor) -> Tensor:
    pointwise, depthwise = merged_kernels(block)
    y = F.conv2d(x, pointwise)  # (B, R*N, H, W)
    y = _conv(block, y, depthwise, None, groups=y.shape[1])  # (B, R*N, H', W')
    return _add_bias(_rank_sum(y, block.rank, block.out_channels), block.bias)


def _forward_grouped(block: CPDBlock, x: Tensor) -> Tensor:
    pointwise, grouped = grouped_kernels(block)
    y = F.conv2d(x, pointwise)  # (B, N*R, H, W)
    return _conv(block, y, grouped, block.bias, groups=block.out_channels)  # (B, N, H', W')


def _forward_dense(block: CPDBlock, x: Tensor) -> Tensor:
    return _conv(block, x, block.dense_weight(), block.bias, groups=1)  # (B, N, H', W')


_TRAINING_FORWARDS: dict[str, Callable[[CPDBlock, Tensor], Tensor]] = {
    "cpd": _forward_cpd, "merged": _forward_merged, "grouped": _forward_grouped, "dense": _forward_dense,
}


class TrainingFormCPDBlock(CPDBlock):
    """A CPDBlock whose forward runs the implementation named by ``self.training_form``.

    Same parameters, same state-dict keys, same function: only the speed differs.
    Blocks become this class in place (``__class__`` swap, as
    ``torch.nn.utils.parametrize`` does), so references held by optimizers survive.
    """

    training_form: str = "cpd"

    def forward(self, x: Tensor) -> Tensor:
        return _TRAINING_FORWARDS[self.training_form](self, x)


def set_training_form(block: CPDBlock, form: str) -> CPDBlock:
    """Switch ``block`` (in place) to compute its forward as ``form``; ``"cpd"`` restores the class."""
    if form not in TRAINING_FORMS:
        raise UserError(f"unknown training form {form!r}; choose from {', '.join(TRAINING_FORMS)}")
    if type(block) not in (CPDBlock, TrainingFormCPDBlock):
        raise UserError(f"can only switch plain CPDBlocks, got {type(block).__name__}")
    if form == "cpd":
        block.__class__ = CPDBlock
        block.__dict__.pop("training_form", None)
    else:
        block.__class__ = TrainingFormCPDBlock
        cast(TrainingFormCPDBlock, block).training_form = form
    return block


def form_of_block(block: CPDBlock) -> str:
    """The training form ``block`` computes in now (``"cpd"`` for a block as written)."""
    return block.training_form if isinstance(block, TrainingFormCPDBlock) else "cpd"


@contextmanager
def forms_restored(model: nn.Module) -> Iterator[None]:
    """Inside, the plain CPDBlocks of ``model`` may be switched to any training form; on exit
    (also by an exception) each is switched back to the form it had on entry.

    The one way norton undoes a temporary switch: ``fit`` trains blocks as written in a faster
    form, ``compress`` in the forms it timed, MACs counting and tracing as written.
    """
    entered = {block: form_of_block(block) for block in model.modules() if is_plain_block(block)}
    try:
        yield
    finally:
        for block, form in entered.items():
            set_training_form(block, form)


def as_written(model: nn.Module) -> None:
    """Switch every CPDBlock of ``model`` in a training form back to the ``cpd`` form, in place."""
    for block in model.modules():
        if isinstance(block, TrainingFormCPDBlock):
            set_training_form(block, "cpd")


@contextmanager
def blocks_as_written(model: nn.Module) -> Iterator[None]:
    """Inside, every CPDBlock of ``model`` computes through its own child convolutions (the ``cpd`` form),
    so hooks on them see it; the training forms are switched back after. MACs counting needs this:
    a dense training form runs one ``F.conv2d`` on a rebuilt kernel, which no hook on a module sees."""
    with forms_restored(model):
        as_written(model)
        yield


def is_plain_block(module: nn.Module) -> TypeGuard[CPDBlock]:
    """A CPDBlock whose training form can be switched (not a subclass of someone else's)."""
    return type(module) in (CPDBlock, TrainingFormCPDBlock)
