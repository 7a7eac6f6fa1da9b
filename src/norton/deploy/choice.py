"""Which form each CPDBlock takes: measured per layer on its real input shape, or by a MACs rule.

Fewer MACs do not mean less time: depthwise convs are memory-bound while a dense conv
runs at near-peak arithmetic, so on CPU a CPDBlock can be slower than the dense conv
it replaced. With ``measure=True`` every candidate form is timed (interleaved, median)
on a random input of the shape the layer sees in the example forward; identical layers
on identical shapes are timed once. With ``measure=False`` a deterministic rule on
:func:`norton.complexity.cpd_block_macs` decides (see :data:`DENSE_EFFICIENCY`).

With ``compile=True`` each candidate is timed as ``torch.compile`` makes it run: a
compiled form fuses its elementwise tail (rank sum, bias) into the convs around it,
which changes the ranking. Compilation happens in the untimed warm-up; identical
layers still compile and time once, so the cost is one compile per distinct
(layer, shape, form).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from norton.complexity import conv2d_macs, cpd_block_macs
from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.factorized import FactorizedConv, chain_macs
from norton.decomposition.low_rank_layers import LowRankLinear
from norton.deploy._helpers import memory_format, set_submodule, to_memory_format
from norton.deploy.forms import build_form, form_of, is_layer_block, set_training_form
from norton.deploy.timing import compare_callables
from norton.example_inputs import module_input_shapes

# measure=False rule: a dense conv sustains a few times more MACs/s than a depthwise
# pipeline (see docs/speed.md), so it wins unless it needs this many times more MACs.
DENSE_EFFICIENCY = 3.0
# Tie-break of the rule among factored forms of equal MACs: the fastest on CPU first.
_FACTORED_PREFERENCE = ("grouped", "merged", "cpd")


def block_signature(block: nn.Module) -> tuple:
    """Everything that decides a block's speed apart from its weights (the timing cache key)."""
    if isinstance(block, LowRankLinear):
        return ("LowRankLinear", block.in_features, block.out_features, block.rank, block.bias is not None)
    if isinstance(block, FactorizedConv):
        return (
            type(block).__name__, block.in_channels, block.out_channels, block.rank, block.kernel_size, block.stride,
            block.padding, block.dilation, block.bias is not None, block.padding_mode,
        )
    assert isinstance(block, CPDBlock)
    return (
        block.in_channels, block.out_channels, block.rank, block.kernel_size, block.stride, block.padding,
        block.dilation, block.bias is not None, block.padding_mode,
    )


# ================================================================ inference
def choose_forms(
    model: nn.Module, blocks: Sequence[str], inputs: tuple[Tensor, ...], forms: Sequence[str], fmt: str,
    measure: bool, warmup: int, repeats: int, *, compile: bool = False, runtime: str = "torch",
) -> dict[str, str]:
    """Put ``model`` in memory format ``fmt``, pick each named block's form and swap it in.

    ``blocks`` names CPDBlocks and layer-level decomposed blocks; the latter choose between
    ``"factored"`` and ``"dense"`` (when ``"dense"`` is among ``forms``; only ``"dense"`` if it is all of them).
    """
    to_memory_format(model, fmt)
    shapes = module_input_shapes(model, blocks, inputs)
    chosen: dict[str, str] = {}
    cache: dict[tuple, str] = {}  # identical layers on identical inputs are timed once
    for name in blocks:
        block = model.get_submodule(name)
        own = form_of(block) or "cpd"
        if name not in shapes:  # never called on the example: keep it as it is
            chosen[name] = own
            continue
        candidates = tuple(forms)
        if is_layer_block(block):
            candidates = ("dense",) if tuple(forms) == ("dense",) else ("factored", "dense") if "dense" in forms \
                else ("factored",)
        key = (block_signature(block), tuple(shapes[name]))
        if key not in cache:
            cache[key] = (
                fastest_form(block, shapes[name], candidates, fmt, warmup, repeats, compile=compile, runtime=runtime)
                if measure else rule_form(block, shapes[name], candidates)
            )
        chosen[name] = cache[key]
    for name, form in chosen.items():
        block = model.get_submodule(name)
        if form != form_of(block):
            set_submodule(model, name, to_memory_format(build_form(block, form), fmt))
    return chosen


def fastest_form(
    block: nn.Module, shape: torch.Size, forms: Sequence[str], fmt: str, warmup: int, repeats: int,
    *, compile: bool = False, runtime: str = "torch",
) -> str:
    """Time every form of ``block`` on a random input of ``shape`` (interleaved) and return the fastest.

    ``compile``: time each form under ``torch.compile`` (compiled in the warm-up).
    ``runtime="onnxruntime"``: time each form exported to ONNX, in an onnxruntime CPU session
    (its kernels rank the forms differently from PyTorch's: docs/speed.md, "ONNX Runtime").
    """
    if len(forms) == 1:
        return forms[0]
    param = next(block.parameters())
    x = torch.randn(shape, device=param.device, dtype=param.dtype)
    if x.dim() == 4:  # a Linear's input has no memory format
        x = x.to(memory_format=memory_format(fmt))
    candidates = {form: compiled(to_memory_format(build_form(block, form), fmt).eval(), compile) for form in forms}

    def runner(module: nn.Module) -> Callable[[], Any]:
        if runtime == "onnxruntime":
            from norton.deploy.export import onnx_bytes, onnxruntime_runner, onnxruntime_session

            return onnxruntime_runner(onnxruntime_session(onnx_bytes(module, x)), x)

        def run() -> Tensor:
            with torch.no_grad():
                return module(x)
        return run

    with _compile_limits(compile):
        stats = compare_callables(
            {form: runner(m) for form, m in candidates.items()}, warmup=max(warmup, 2 * compile), repeats=repeats,
            max_time_s=1.0, device=param.device,
        )
    return min(stats, key=lambda form: stats[form].median_ms)


def form_macs(block: nn.Module, shape: Sequence[int], form: str) -> int:
    """MACs of ``form`` of ``block`` on a batch of ``shape`` ``(B, C_in, H, W)`` (``(..., K)`` for a Linear)."""
    if isinstance(block, LowRankLinear):
        rows = math.prod(int(d) for d in shape[:-1])
        per_row = block.in_features * block.out_features if form == "dense" else \
            block.rank * (block.in_features + block.out_features)
        return rows * per_row
    hw = (int(shape[-2]), int(shape[-1]))
    if isinstance(block, FactorizedConv):
        if form == "factored":
            return int(shape[0]) * chain_macs(block, hw)
        dense = nn.Conv2d(block.in_channels, block.out_channels, block.kernel_size, stride=block.stride,
                          padding=block.padding, dilation=block.dilation, bias=False, device="meta")
        return int(shape[0]) * conv2d_macs(dense, hw)
    assert isinstance(block, CPDBlock)
    # "fused" computes the merged form's arithmetic in one kernel
    return int(shape[0]) * cpd_block_macs(block, hw, "merged" if form == "fused" else form)


def _dense_efficiency(block: nn.Module) -> float:
    """How many more MACs a dense conv may need and still win: depthwise convs are memory-bound
    (``DENSE_EFFICIENCY``); a chain of dense convs or linears runs at the dense rate (1: fewer MACs win)."""
    if isinstance(block, CPDBlock):
        return DENSE_EFFICIENCY
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in block.children())
    return DENSE_EFFICIENCY if depthwise else 1.0


def rule_form(block: nn.Module, shape: Sequence[int], forms: Sequence[str]) -> str:
    """No timing: dense if it needs at most ``_dense_efficiency(block)`` times the MACs of the best factored form."""
    factored = [f for f in forms if f != "dense"]
    if not factored:
        return "dense"
    best = min(factored, key=lambda f: (form_macs(block, shape, f), _preference(f)))
    if "dense" in forms and form_macs(block, shape, "dense") <= _dense_efficiency(block) * form_macs(block, shape, best):
        return "dense"
    return best


def _preference(form: str) -> int:
    return _FACTORED_PREFERENCE.index(form) if form in _FACTORED_PREFERENCE else len(_FACTORED_PREFERENCE)


def fastest_model(
    candidates: Mapping[str, nn.Module], inputs: tuple[Tensor, ...], device: torch.device,
    *, compile: bool = False, runtime: str = "torch",
) -> str:
    """The key of the fastest whole model (e.g. one per memory format), timed interleaved (compiled if asked,
    or exported and run in onnxruntime with ``runtime="onnxruntime"``)."""
    runners: dict[str, Callable[[], Any]] = {}
    for key, module in candidates.items():
        if runtime == "onnxruntime":
            from norton.deploy.export import onnx_bytes, onnxruntime_runner, onnxruntime_session

            runners[key] = onnxruntime_runner(onnxruntime_session(onnx_bytes(module, inputs[0])), inputs[0])
            continue

        def run(candidate: nn.Module = compiled(module, compile)) -> Any:  # noqa: B008 - bound once per candidate
            with torch.no_grad():
                return candidate(*inputs)
        runners[key] = run
    with _compile_limits(compile):
        stats = compare_callables(runners, warmup=1 + compile, repeats=5, max_time_s=10.0, device=device)
    return min(stats, key=lambda key: stats[key].median_ms)


def compiled(module: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(module)`` (static shapes: each timing is for one input shape) or ``module`` itself."""
    return cast(nn.Module, torch.compile(module, dynamic=False)) if compile else module


@contextlib.contextmanager
def _compile_limits(compile: bool) -> Iterator[None]:
    """Let dynamo compile every candidate: past its recompile limit (8 per code object by default)
    it would silently run the rest eagerly, and their timings would lie."""
    if not compile:
        yield
        return
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
        yield


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
