"""Which form each CPDBlock takes: measured per layer on its real input shape, or by a MACs rule.

Fewer MACs do not mean less time: depthwise convs are memory-bound while a dense conv
runs at near-peak arithmetic, so on CPU a CPDBlock can be slower than the dense conv
it replaced. With ``measure=True`` every candidate form is timed (interleaved, median)
on a random input of the shape the layer sees in the example forward; identical layers
on identical shapes are timed once. With ``measure=False`` a deterministic rule on
:func:`norton.complexity.cpd_block_macs` decides (see :data:`DENSE_EFFICIENCY`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from norton.complexity import cpd_block_macs
from norton.decomposition.cpd_block import CPDBlock
from norton.deploy._helpers import memory_format, set_submodule, to_memory_format
from norton.deploy.forms import build_form, set_training_form
from norton.deploy.timing import compare_callables
from norton.example_inputs import module_input_shapes

# measure=False rule: a dense conv sustains a few times more MACs/s than a depthwise
# pipeline (see docs/speed.md), so it wins unless it needs this many times more MACs.
DENSE_EFFICIENCY = 3.0
# Tie-break of the rule among factored forms of equal MACs: the fastest on CPU first.
_FACTORED_PREFERENCE = ("grouped", "merged", "cpd")


def block_signature(block: CPDBlock) -> tuple:
    """Everything that decides a block's speed apart from its weights (the timing cache key)."""
    return (
        block.in_channels, block.out_channels, block.rank, block.kernel_size, block.stride, block.padding,
        block.dilation, block.bias is not None, block.padding_mode,
    )


# ================================================================ inference
def choose_forms(
    model: nn.Module, blocks: Sequence[str], inputs: tuple[Tensor, ...], forms: Sequence[str], fmt: str,
    measure: bool, warmup: int, repeats: int,
) -> dict[str, str]:
    """Put ``model`` in memory format ``fmt``, pick each named CPDBlock's form and swap it in."""
    to_memory_format(model, fmt)
    shapes = module_input_shapes(model, blocks, inputs)
    chosen: dict[str, str] = {}
    cache: dict[tuple, str] = {}  # identical layers on identical inputs are timed once
    for name in blocks:
        block = cast(CPDBlock, model.get_submodule(name))
        if name not in shapes:  # never called on the example: keep it as it is
            chosen[name] = "cpd"
            continue
        key = (block_signature(block), tuple(shapes[name]))
        if key not in cache:
            cache[key] = (
                fastest_form(block, shapes[name], forms, fmt, warmup, repeats)
                if measure else rule_form(block, shapes[name], forms)
            )
        chosen[name] = cache[key]
    for name, form in chosen.items():
        if form != "cpd":
            block = cast(CPDBlock, model.get_submodule(name))
            set_submodule(model, name, to_memory_format(build_form(block, form), fmt))
    return chosen


def fastest_form(
    block: CPDBlock, shape: torch.Size, forms: Sequence[str], fmt: str, warmup: int, repeats: int
) -> str:
    """Time every form of ``block`` on a random input of ``shape`` (interleaved) and return the fastest."""
    if len(forms) == 1:
        return forms[0]
    param = block.pointwise.weight
    x = torch.randn(shape, device=param.device, dtype=param.dtype).to(memory_format=memory_format(fmt))
    candidates = {form: to_memory_format(build_form(block, form), fmt).eval() for form in forms}

    def runner(module: nn.Module) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad():
                return module(x)
        return run

    stats = compare_callables(
        {form: runner(m) for form, m in candidates.items()}, warmup=warmup, repeats=repeats,
        max_time_s=1.0, device=param.device,
    )
    return min(stats, key=lambda form: stats[form].median_ms)


def form_macs(block: CPDBlock, shape: Sequence[int], form: str) -> int:
    """MACs of ``form`` of ``block`` on a batch of ``shape`` ``(B, C_in, H, W)``."""
    return int(shape[0]) * cpd_block_macs(block, (shape[-2], shape[-1]), form)


def rule_form(block: CPDBlock, shape: Sequence[int], forms: Sequence[str]) -> str:
    """No timing: dense if it needs at most ``DENSE_EFFICIENCY`` times the MACs of the best factored form."""
    factored = [f for f in forms if f != "dense"]
    if not factored:
        return "dense"
    best = min(factored, key=lambda f: (form_macs(block, shape, f), _FACTORED_PREFERENCE.index(f)))
    if "dense" in forms and form_macs(block, shape, "dense") <= DENSE_EFFICIENCY * form_macs(block, shape, best):
        return "dense"
    return best


def fastest_model(
    candidates: Mapping[str, nn.Module], inputs: tuple[Tensor, ...], device: torch.device
) -> str:
    """The key of the fastest whole model (e.g. one per memory format), timed interleaved."""
    runners = {}
    for key, candidate in candidates.items():
        def run(candidate: nn.Module = candidate) -> Any:
            with torch.no_grad():
                return candidate(*inputs)
        runners[key] = run
    stats = compare_callables(runners, warmup=1, repeats=5, max_time_s=10.0, device=device)
    return min(stats, key=lambda key: stats[key].median_ms)


# ================================================================ training
def fastest_training_form(block: CPDBlock, shape: torch.Size, forms: Sequence[str], warmup: int, repeats: int) -> str:
    """Time forward + backward of every training form of ``block`` on a random input of ``shape``."""
    if len(forms) == 1:
        return forms[0]
    probe = copy.deepcopy(block)  # its .grad buffers fill up, not the model's
    set_training_form(probe, "cpd")
    param = next(probe.parameters())
    x = torch.randn(shape, device=param.device, dtype=param.dtype, requires_grad=True)
    with torch.no_grad():
        grad_out = torch.randn_like(probe(x))

    def step(form: str) -> Callable[[], None]:
        def run() -> None:
            set_training_form(probe, form)
            probe.zero_grad(set_to_none=True)
            x.grad = None
            probe(x).backward(grad_out)
        return run

    stats = compare_callables({f: step(f) for f in forms}, warmup=warmup, repeats=repeats, device=param.device)
    return min(stats, key=lambda f: stats[f].median_ms)
