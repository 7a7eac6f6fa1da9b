"""Folding eval-mode BatchNorms into the layer that produces their input.

An eval-mode BatchNorm is a per-channel affine map ``y = x * scale + shift``. When
its input is the output of a Conv2d, CPDBlock or MergedCPDConv and nothing else
reads that output, the map can be moved into the producer (its output-channel
weights times ``scale``, its bias ``bias * scale + shift``) and the BatchNorm
dropped. :func:`find_batchnorm_pairs` finds such pairs from one traced forward;
:func:`fold_batchnorm` folds one pair; :func:`fold_structure` is the replay side
(the bias a fold creates, so a folded state dict loads).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy._helpers import Inputs, as_tuple, tensors_in
from norton.deploy.forms import MergedCPDConv
from norton.errors import UserError

# Layers whose output channels a BatchNorm scale can be folded into.
PRODUCERS = (nn.Conv2d, CPDBlock, MergedCPDConv)


def is_foldable(module: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics (a training-mode one normalises by the batch)."""
    return (
        isinstance(module, _BatchNorm)
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


def _scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = x * scale + shift`` per channel, ``(N,)`` each."""
    if bn.running_var is None or bn.running_mean is None:
        raise UserError(f"cannot fold a {type(bn).__name__} without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _ensure_bias(module: nn.Module, weight: Tensor, copies: int) -> Tensor:
    """``module.bias``, created as zeros of the output width (``weight``'s rows / ``copies``) when absent."""
    bias = getattr(module, "bias", None)
    if bias is None:
        bias = nn.Parameter(torch.zeros(weight.shape[0] // copies, device=weight.device, dtype=weight.dtype))
        module.bias = bias
    return bias


def _out_channel_weight(module: nn.Module) -> tuple[Tensor, int]:
    """The weight whose output channels a BN scale multiplies, and how many rank copies it holds."""
    if isinstance(module, CPDBlock):
        return module.horizontal.weight, module.rank  # (R*N, 1, 1, k_w), rank-major
    if isinstance(module, MergedCPDConv):
        return module.depthwise.weight, module.rank  # (R*N, 1, k_h, k_w), rank-major
    if isinstance(module, nn.Conv2d):
        return module.weight, 1  # (N, C_in / groups, k_h, k_w)
    raise UserError(f"cannot fold a BatchNorm into a {type(module).__name__}")


@torch.no_grad()
def fold_batchnorm(producer: nn.Module, bn: _BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``producer`` (Conv2d, CPDBlock or MergedCPDConv) in place."""
    weight, copies = _out_channel_weight(producer)
    scale, shift = _scale_shift(bn)  # (N,)
    # rank-major channels r*N + n all belong to filter n: repeat the scale R times
    weight.mul_(scale.repeat(copies).view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    bias = _ensure_bias(producer, weight, copies)
    bias.copy_(bias * scale + shift)


def fold_structure(producer: nn.Module) -> None:
    """Replay side of :func:`fold_batchnorm`: only the bias parameter a fold creates."""
    _ensure_bias(producer, *_out_channel_weight(producer))


def find_batchnorm_pairs(model: nn.Module, example_inputs: Inputs) -> list[tuple[str, str]]:
    """``(producer, batchnorm)`` name pairs where the BN reads only that producer's output.

    A pair qualifies when the eval-mode BN's input *is* the output of a Conv2d /
    CPDBlock / MergedCPDConv and nothing else in the autograd graph consumes it
    (so folding changes no other path: residual taps, concatenations, returned
    features). One forward on the first example keeps the graph small.
    """
    producers = {
        name: m for name, m in model.named_modules()
        if isinstance(m, PRODUCERS) and not _inside_block(name, model)
    }
    norms = {name: m for name, m in model.named_modules() if is_foldable(m)}
    if not producers or not norms:
        return []
    outputs: dict[str, Any] = {}  # producer name -> grad_fn of its output
    inputs: dict[str, Any] = {}  # bn name -> grad_fn of its input
    calls: dict[str, int] = {}  # a module called more than once is never folded

    def on_output(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = out.grad_fn if isinstance(out, Tensor) else None
        return hook

    def on_input(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            inputs[name] = args[0].grad_fn if args and isinstance(args[0], Tensor) else None
        return hook

    handles = [m.register_forward_hook(on_output(n)) for n, m in producers.items()]
    handles += [m.register_forward_pre_hook(on_input(n)) for n, m in norms.items()]
    sample = tuple(t[:1].detach().clone().requires_grad_(t.is_floating_point()) for t in as_tuple(example_inputs))
    try:
        with torch.enable_grad():
            result = model(*sample)
    finally:
        for handle in handles:
            handle.remove()
    consumers = _count_consumers(result)
    by_fn = {fn: name for name, fn in outputs.items() if fn is not None and calls.get(name) == 1}
    pairs = []
    for bn_name, fn in inputs.items():
        producer = by_fn.get(fn) if fn is not None else None
        if producer is None or calls.get(bn_name) != 1 or consumers.get(fn, 0) != 1:
            continue
        if producers[producer].out_channels != norms[bn_name].num_features:
            continue
        pairs.append((producer, bn_name))
    return pairs


def _count_consumers(result: Any) -> dict[Any, int]:
    """How many graph edges point at each autograd node (outputs count as one use each)."""
    roots = [t.grad_fn for t in tensors_in(result) if t.grad_fn is not None]
    counts: dict[Any, int] = {}
    for root in roots:
        counts[root] = counts.get(root, 0) + 1
    stack, seen = list(set(roots)), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            counts[child] = counts.get(child, 0) + 1
            stack.append(child)
    return counts


def _inside_block(name: str, model: nn.Module) -> bool:
    """True for the convs inside a CPDBlock or MergedCPDConv (the block, not its parts, produces the output)."""
    parent = name.rpartition(".")[0]
    while parent:
        if isinstance(model.get_submodule(parent), (CPDBlock, MergedCPDConv)):
            return True
        parent = parent.rpartition(".")[0]
    return False
