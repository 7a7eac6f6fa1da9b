"""Fast, equivalent forms of a CPDBlock, chosen per layer by measurement.

A rank-``R`` CPDBlock ``(N filters, C_in inputs, k_h x k_w)`` can run as:

``"cpd"``      the block itself: pointwise 1x1 -> depthwise k_h x 1 -> depthwise 1 x k_w -> rank sum.
``"merged"``   pointwise 1x1 (C_in -> R*N) -> one depthwise k_h x k_w conv -> rank sum
               (the two 1-D kernels multiplied into one: one pass over R*N channels less).
``"grouped"``  pointwise 1x1 (C_in -> N*R, channels filter-major ``n*R + r``) -> a grouped
               k_h x k_w conv ``Conv2d(N*R, N, groups=N)``: each group reads the R rank
               components of one filter, so the rank sum happens inside the conv.
``"dense"``    the block re-materialised as one dense (possibly pruned) ``nn.Conv2d``.

All four compute the same function (up to float rounding). Fewer MACs do not mean
less time: depthwise convs are memory-bound while a dense conv runs at near-peak
arithmetic, so on CPU a CPDBlock can be slower than the dense conv it replaced.
:func:`optimize_for_inference` therefore times every candidate on each layer's real
input shape and keeps the fastest, folds eval-mode BatchNorms into the preceding
layer, and picks the memory format (NCHW or channels-last) for the whole model.
What it chose is appended to ``model.norton_plan`` and :func:`replay_optimize`
rebuilds the structure before a state dict loads.

Training: :func:`optimize_for_training` switches, per layer, how a CPDBlock computes
its forward (e.g. rebuild the dense kernel from the factors each step and run one
conv). The parameters and state-dict keys stay those of the CPDBlock, so optimizers,
checkpoints and results are unchanged; only the speed differs.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.timing import compare_callables
from norton.errors import UserError
from norton.plan import PlanOperation, register_operation

INFERENCE_FORMS = ("cpd", "merged", "grouped", "dense")
TRAINING_FORMS = ("cpd", "merged", "grouped", "dense")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
# Relative tolerance of the end-to-end check: max |optimized - original| / max |original|.
RELATIVE_TOLERANCE = 1e-4
# measure=False rule: a dense conv sustains a few times more MACs/s than a depthwise
# pipeline (see docs/speed.md), so it wins unless it needs this many times more MACs.
DENSE_EFFICIENCY = 3.0

Inputs = Tensor | tuple[Tensor, ...]


# ====================================================================== kernels
# Pure functions of a block's parameters, differentiable in the factors: the
# inference forms copy them once, the training forms recompute them every step.
def _factor_weights(block: CPDBlock) -> tuple[Tensor, Tensor, Tensor]:
    n, r = block.out_channels, block.rank
    head = block.feature.pointwise.weight.reshape(r, n, block.in_channels)  # (R, N, C_in)
    body = block.feature.vertical.weight.reshape(r, n, block.kernel_size[0])  # (R, N, k_h)
    tail = block.feature.horizontal.weight.reshape(r, n, block.kernel_size[1])  # (R, N, k_w)
    return head, body, tail


def merged_kernels(block: CPDBlock) -> tuple[Tensor, Tensor]:
    """``pointwise (R*N, C_in, 1, 1)`` (rank-major, as in the block) and ``depthwise (R*N, 1, k_h, k_w)``."""
    _, body, tail = _factor_weights(block)
    depthwise = body.unsqueeze(-1) * tail.unsqueeze(-2)  # (R, N, k_h, k_w): outer product per channel
    return block.feature.pointwise.weight, depthwise.reshape(-1, 1, *block.kernel_size)


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
        factory = {"device": block.feature.pointwise.weight.device, "dtype": block.feature.pointwise.weight.dtype}
        self.rank, self.out_channels = r, n
        self.pointwise = nn.Conv2d(block.in_channels, channels, 1, bias=False, **factory)
        self.depthwise = nn.Conv2d(
            channels, channels, block.kernel_size, stride=block.stride, padding=block.padding,
            dilation=block.dilation, groups=channels, bias=False, padding_mode=block.padding_mode, **factory,
        )
        self.bias = nn.Parameter(torch.empty(n, **factory)) if block.bias is not None else None
        with torch.no_grad():
            pointwise, depthwise = merged_kernels(block)
            self.pointwise.weight.copy_(pointwise)
            self.depthwise.weight.copy_(depthwise)
            if self.bias is not None:
                self.bias.copy_(block.bias)

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
        factory = {"device": block.feature.pointwise.weight.device, "dtype": block.feature.pointwise.weight.dtype}
        pointwise = nn.Conv2d(block.in_channels, n * r, 1, bias=False, **factory)
        grouped = nn.Conv2d(
            n * r, n, block.kernel_size, stride=block.stride, padding=block.padding, dilation=block.dilation,
            groups=n, bias=block.bias is not None, padding_mode=block.padding_mode, **factory,
        )
        with torch.no_grad():
            pointwise_weight, grouped_weight = grouped_kernels(block)
            pointwise.weight.copy_(pointwise_weight)
            grouped.weight.copy_(grouped_weight)
            if block.bias is not None:
                grouped.bias.copy_(block.bias)
        super().__init__()
        self.pointwise = pointwise
        self.grouped = grouped


def dense_form(block: CPDBlock) -> nn.Conv2d:
    """Form ``"dense"``: the block as one ``nn.Conv2d`` (tagged ``norton_form = "dense"``)."""
    conv = block.to_conv()
    conv.norton_form = "dense"  # plain attribute: the module stays an exact nn.Conv2d for counters
    return conv


def build_form(block: CPDBlock, form: str) -> nn.Module:
    """The inference module of ``form`` computing the same function as ``block``."""
    if form == "cpd":
        return block
    if form == "merged":
        return MergedCPDConv(block)
    if form == "grouped":
        return GroupedCPDConv(block)
    if form == "dense":
        return dense_form(block)
    raise UserError(f"unknown inference form {form!r}; choose from {', '.join(INFERENCE_FORMS)}")


def form_of(module: nn.Module) -> str | None:
    """The form name of a module built here (``"cpd"`` for a CPDBlock), else ``None``."""
    if isinstance(module, CPDBlock):
        return "cpd"
    return getattr(module, "form_name", None) or getattr(module, "norton_form", None)


# ================================================================ BatchNorm folding
def _foldable_bn(module: nn.Module) -> bool:
    return (
        isinstance(module, _BatchNorm)
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


def _bn_scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = x * scale + shift`` per channel, ``(N,)`` each."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _ensure_bias(module: nn.Module, channels: int, like: Tensor) -> nn.Parameter:
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(channels, device=like.device, dtype=like.dtype))
    return module.bias


def _out_channel_weight(module: nn.Module) -> tuple[Tensor, int]:
    """The weight whose output channels a BN scale multiplies, and how many rank copies it holds."""
    if isinstance(module, CPDBlock):
        return module.feature.horizontal.weight, module.rank  # (R*N, 1, 1, k_w), rank-major
    if isinstance(module, MergedCPDConv):
        return module.depthwise.weight, module.rank  # (R*N, 1, k_h, k_w), rank-major
    if isinstance(module, nn.Conv2d):
        return module.weight, 1  # (N, C_in / groups, k_h, k_w)
    raise UserError(f"cannot fold a BatchNorm into a {type(module).__name__}")


@torch.no_grad()
def fold_batchnorm(producer: nn.Module, bn: _BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``producer`` (Conv2d, CPDBlock or MergedCPDConv) in place."""
    weight, copies = _out_channel_weight(producer)
    scale, shift = _bn_scale_shift(bn)  # (N,)
    # rank-major channels r*N + n all belong to filter n: repeat the scale R times
    weight.mul_(scale.repeat(copies).view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    bias = _ensure_bias(producer, producer.out_channels, weight)
    bias.copy_(bias * scale + shift)


def _fold_structure(producer: nn.Module) -> None:
    """Replay side of :func:`fold_batchnorm`: only the bias parameter a fold creates."""
    weight, _ = _out_channel_weight(producer)
    _ensure_bias(producer, producer.out_channels, weight)


def find_batchnorm_pairs(model: nn.Module, example_inputs: Inputs) -> list[tuple[str, str]]:
    """``(producer, batchnorm)`` name pairs where the BN reads only that producer's output.

    A pair qualifies when the eval-mode BN's input *is* the output of a Conv2d /
    CPDBlock / MergedCPDConv and nothing else in the autograd graph consumes it
    (so folding changes no other path: residual taps, concatenations, returned
    features). One forward on the first example keeps the graph small.
    """
    producers = {
        name: m for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, CPDBlock, MergedCPDConv)) and not _inside_block(name, model)
    }
    norms = {name: m for name, m in model.named_modules() if _foldable_bn(m)}
    if not producers or not norms:
        return []
    outputs: dict[str, Any] = {}  # producer name -> grad_fn of its output
    inputs: dict[str, Any] = {}  # bn name -> grad_fn of its input (None if called more than once)
    calls: dict[str, int] = {}

    def on_output(name: str) -> Callable:
        def hook(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = out.grad_fn if isinstance(out, Tensor) else None
        return hook

    def on_input(name: str) -> Callable:
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            inputs[name] = args[0].grad_fn if args and isinstance(args[0], Tensor) else None
        return hook

    handles = [m.register_forward_hook(on_output(n)) for n, m in producers.items()]
    handles += [m.register_forward_pre_hook(on_input(n)) for n, m in norms.items()]
    sample = tuple(t[:1].detach().clone().requires_grad_(t.is_floating_point()) for t in _as_tuple(example_inputs))
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
    roots = [t.grad_fn for t in _tensors_in(result) if t.grad_fn is not None]
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


def _tensors_in(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


# ================================================================ optimize / replay
def optimize_for_inference(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    device: torch.device | str | None = None,
    forms: Sequence[str] = INFERENCE_FORMS,
    fold_bn: bool = True,
    memory_format: str = "auto",
    measure: bool = True,
    warmup: int = 1,
    repeats: int = 7,
    check: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``model`` with each CPDBlock in its fastest equivalent form.

    ``model`` itself is not modified (it is deep-copied first).

    Args:
        model: any module, e.g. from ``norton.create_model``, after decompose/prune.
        example_inputs: a batch like the ones the model will serve (its batch size
            matters: the fastest form at batch 1 is not always the fastest at 32).
        device: where to run and measure; default: the model's device.
        forms: the candidate forms, from ``"cpd", "merged", "grouped", "dense"``.
        fold_bn: fold eval-mode BatchNorms into the layer before them.
        memory_format: ``"contiguous"``, ``"channels_last"``, or ``"auto"`` (time the
            whole model in both and keep the faster; ``"contiguous"`` when ``measure=False``).
        measure: time candidates per layer; ``False`` uses a MAC-count rule instead.
        warmup, repeats: per-layer timing (interleaved rounds, median).
        check: compare outputs with the original on ``example_inputs`` (relative
            max difference ``<= 1e-4``), raising ``RuntimeError`` otherwise.

    The choice is appended to ``model.norton_plan`` as ``{"op": "optimize",
    "forms": {layer: form}, "fold_bn": [[producer, batchnorm], ...],
    "memory_format": ...}``; :func:`replay_optimize` rebuilds it.
    """
    forms = _check_forms(forms, INFERENCE_FORMS, "inference")
    if memory_format not in MEMORY_FORMATS:
        raise UserError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    if not isinstance(model, nn.Module):
        raise UserError(f"expected an nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    inputs = tuple(t.to(device) for t in _as_tuple(example_inputs))
    model = copy.deepcopy(model).to(device).eval()  # the caller's model stays as it is
    for module in model.modules():
        if type(module) is TrainingFormCPDBlock:  # a training-time forward is no inference form
            set_training_form(module, "cpd")
    reference = _run(model, inputs) if check else None

    pairs = find_batchnorm_pairs(model, inputs) if fold_bn else []
    modules = dict(model.named_modules())
    for producer, bn in pairs:
        fold_batchnorm(modules[producer], modules[bn])
        _set_submodule(model, bn, nn.Identity())

    blocks = [name for name, m in model.named_modules() if isinstance(m, CPDBlock)]
    if memory_format != "auto":
        formats: tuple[str, ...] = (memory_format,)
    else:  # without measuring there is nothing to compare formats by: keep the default layout
        formats = ("contiguous", "channels_last") if measure else ("contiguous",)
    candidates: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for fmt in formats:
        candidate = model if len(formats) == 1 else copy.deepcopy(model)
        try:
            chosen = _choose_forms(candidate, blocks, inputs, forms, fmt, measure, warmup, repeats)
        except RuntimeError:  # e.g. a .view() in the model that channels-last strides do not allow
            if len(formats) == 1:
                raise
            continue
        candidates[fmt] = (candidate, chosen)
    if not candidates:
        raise RuntimeError("optimize_for_inference: the model runs in no memory format tried")
    fmt = next(iter(candidates)) if len(candidates) == 1 else _fastest_model(candidates, inputs, device)
    model, chosen = candidates[fmt]

    if check:
        _check_close(reference, _run(model, inputs), "optimize_for_inference")
    plan = getattr(model, "norton_plan", None)
    if plan is None:
        plan = model.norton_plan = []
    plan.append({
        "op": "optimize",
        "forms": dict(chosen),
        "fold_bn": [[producer, bn] for producer, bn in pairs],
        "memory_format": fmt,
        "measured_on": {"device": str(device), "batch_size": int(inputs[0].shape[0]) if inputs[0].dim() else 1,
                        "measure": bool(measure)},
    })
    return model


def replay_optimize(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Rebuild, in place, the structure an ``{"op": "optimize", ...}`` record describes.

    BatchNorms named in ``fold_bn`` become ``nn.Identity`` (their producer gains
    a bias), CPDBlocks become their recorded form, and the memory format is set.
    Weights are placeholders: load the optimized model's state dict next. The
    record is appended to ``model.norton_plan``.
    """
    if not isinstance(record, Mapping) or record.get("op") != "optimize":
        raise UserError(f"not an optimize record: {record!r:.80}")
    forms = record.get("forms", {})
    folds = record.get("fold_bn", [])
    fmt = record.get("memory_format", "contiguous")
    if not isinstance(forms, Mapping) or not isinstance(folds, (list, tuple)) or fmt not in MEMORY_FORMATS[1:]:
        raise UserError(f"malformed optimize record: {dict(record)!r:.120}")
    modules = dict(model.named_modules())
    for pair in folds:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(f"optimize record: fold_bn entries must be [producer, batchnorm] pairs, got {pair!r}")
        producer, bn = pair
        if producer not in modules or bn not in modules:
            missing = producer if producer not in modules else bn
            raise UserError(f"optimize record names layer {missing!r}, which the model does not have")
        _fold_structure(modules[producer])
        _set_submodule(model, bn, nn.Identity())
    for name, form in forms.items():
        block = modules.get(name)
        if not isinstance(block, CPDBlock):
            raise UserError(f"optimize record names {name!r} as a CPDBlock, but the model has {type(block).__name__} there")
        if form not in INFERENCE_FORMS:
            raise UserError(f"optimize record: unknown form {form!r} for layer {name!r}")
        if form != "cpd":
            _set_submodule(model, name, build_form(block, form))
    _apply_memory_format(model, fmt)
    model.eval()
    if getattr(model, "norton_plan", None) is None:
        model.norton_plan = []
    model.norton_plan.append(copy.deepcopy(dict(record)))
    return model


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
        block.training_form = form
    return block


def optimize_for_training(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    forms: Sequence[str] = TRAINING_FORMS,
    measure: bool = True,
    warmup: int = 2,
    repeats: int = 7,
) -> dict[str, str]:
    """Pick, in place, each CPDBlock's fastest forward+backward implementation.

    Parameters, state-dict keys and outputs are unchanged, so it can be called
    on a model already wrapped by an optimizer. Returns ``{layer: form}``.
    ``measure=False`` picks ``"dense"`` where it is allowed (on CPU and GPU the
    dense conv's backward is the best-tuned kernel), else the first form given.
    """
    forms = _check_forms(forms, TRAINING_FORMS, "training")
    blocks = {name: m for name, m in model.named_modules() if type(m) in (CPDBlock, TrainingFormCPDBlock)}
    if not blocks:
        return {}
    shapes = _capture_input_shapes(model, blocks, _as_tuple(example_inputs), grad=True)
    chosen: dict[str, str] = {}
    cache: dict[tuple, str] = {}
    for name, block in blocks.items():
        if name not in shapes:
            continue
        if not measure:
            chosen[name] = "dense" if "dense" in forms else forms[0]
        else:
            key = (_block_signature(block), tuple(shapes[name]))
            if key not in cache:
                cache[key] = _fastest_training_form(block, shapes[name], forms, warmup, repeats)
            chosen[name] = cache[key]
        set_training_form(block, chosen[name])
    return chosen


def _fastest_training_form(block: CPDBlock, shape: torch.Size, forms: Sequence[str], warmup: int, repeats: int) -> str:
    if len(forms) == 1:
        return forms[0]
    probe = copy.deepcopy(block)  # its .grad buffers fill up, not the model's
    param = next(probe.parameters())
    x = torch.randn(shape, device=param.device, dtype=param.dtype, requires_grad=True)
    with torch.no_grad():
        grad_out = torch.randn_like(_forward_cpd(probe, x))

    def step(form: str) -> Callable[[], None]:
        def run() -> None:
            set_training_form(probe, form)
            probe.zero_grad(set_to_none=True)
            x.grad = None
            probe(x).backward(grad_out)
        return run

    stats = compare_callables({f: step(f) for f in forms}, warmup=warmup, repeats=repeats, device=param.device)
    return min(stats, key=lambda f: stats[f].median_ms)


# ================================================================ helpers
def _check_forms(forms: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(forms, str):
        forms = (forms,)
    forms = tuple(forms)
    if not forms:
        raise UserError(f"need at least one {what} form; choose from {', '.join(allowed)}")
    for form in forms:
        if form not in allowed:
            raise UserError(f"unknown {what} form {form!r}; choose from {', '.join(allowed)}")
    return forms


def _as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise UserError("example_inputs must be a tensor or a tuple of tensors, e.g. torch.randn(1, 3, 32, 32)")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _run(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _check_close(expected: Any, actual: Any, what: str) -> None:
    for a, b in zip(_tensors_in(actual), _tensors_in(expected), strict=True):
        scale = b.abs().max().item() if b.numel() else 0.0
        error = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
        if error > RELATIVE_TOLERANCE * max(scale, 1e-12):
            raise RuntimeError(
                f"{what}: outputs differ from the original by {error:.3g} (relative {error / max(scale, 1e-12):.3g} "
                f"> {RELATIVE_TOLERANCE}); this is a bug in norton, please report it"
            )


def _inside_block(name: str, model: nn.Module) -> bool:
    """True for the convs inside a CPDBlock (the block, not its parts, produces the output)."""
    parent = name.rpartition(".")[0]
    while parent:
        if isinstance(model.get_submodule(parent), CPDBlock) or isinstance(model.get_submodule(parent), MergedCPDConv):
            return True
        parent = parent.rpartition(".")[0]
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise UserError("cannot replace the model itself; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _capture_input_shapes(
    model: nn.Module, modules: Iterable[str], inputs: tuple[Tensor, ...], *, grad: bool = False
) -> dict[str, torch.Size]:
    """The input shape each named module sees on one forward of ``inputs``."""
    shapes: dict[str, torch.Size] = {}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left alone
            shapes.setdefault(name, args[0].shape)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in modules]
    try:
        with torch.set_grad_enabled(grad):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _block_signature(block: CPDBlock) -> tuple:
    return (
        block.in_channels, block.out_channels, block.rank, block.kernel_size, block.stride, block.padding,
        block.dilation, block.bias is not None, block.padding_mode,
    )


def _memory_format(fmt: str) -> torch.memory_format:
    return torch.channels_last if fmt == "channels_last" else torch.contiguous_format


def _as_memory_format(module: nn.Module, fmt: str) -> nn.Module:
    return module.to(memory_format=_memory_format(fmt))


def _apply_memory_format(model: nn.Module, fmt: str) -> None:
    """Store 4-D weights in ``fmt``; convolutions then propagate it to activations."""
    model.to(memory_format=_memory_format(fmt))


def _choose_forms(
    model: nn.Module, blocks: Sequence[str], inputs: tuple[Tensor, ...], forms: Sequence[str], fmt: str,
    measure: bool, warmup: int, repeats: int,
) -> dict[str, str]:
    """Put ``model`` in memory format ``fmt``, pick each named CPDBlock's form and swap it in."""
    _apply_memory_format(model, fmt)
    shapes = _capture_input_shapes(model, blocks, inputs)
    chosen: dict[str, str] = {}
    cache: dict[tuple, str] = {}  # identical layers on identical inputs are timed once
    for name in blocks:
        block = model.get_submodule(name)
        if name not in shapes:  # never called on the example: keep it as it is
            chosen[name] = "cpd"
            continue
        key = (_block_signature(block), tuple(shapes[name]))
        if key not in cache:
            cache[key] = (
                _fastest_form(block, shapes[name], forms, fmt, warmup, repeats)
                if measure else _rule_form(block, shapes[name], forms)
            )
        chosen[name] = cache[key]
    for name, form in chosen.items():
        if form != "cpd":
            _set_submodule(model, name, _as_memory_format(build_form(model.get_submodule(name), form), fmt))
    return chosen


def _fastest_form(
    block: CPDBlock, shape: torch.Size, forms: Sequence[str], fmt: str, warmup: int, repeats: int
) -> str:
    """Time every form of ``block`` on a random input of ``shape`` (interleaved) and return the fastest."""
    if len(forms) == 1:
        return forms[0]
    param = block.feature.pointwise.weight
    x = torch.randn(shape, device=param.device, dtype=param.dtype).to(memory_format=_memory_format(fmt))
    candidates = {form: _as_memory_format(build_form(block, form), fmt).eval() for form in forms}

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
    """Multiply-accumulates of ``form`` of ``block`` on one input of ``shape`` ``(B, C_in, H, W)``."""
    batch, _, h_in, w_in = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = block.kernel_size, block.stride, block.padding, block.dilation
    h_out = (h_in + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w_in + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n, c, r = block.out_channels, block.in_channels, block.rank
    pointwise = h_in * w_in * r * n * c
    per_image = {
        "cpd": pointwise + h_out * w_in * r * n * kh + h_out * w_out * r * n * kw,
        "merged": pointwise + h_out * w_out * r * n * kh * kw,
        "grouped": pointwise + h_out * w_out * r * n * kh * kw,
        "dense": h_out * w_out * n * c * kh * kw,
    }[form]
    return batch * per_image


def _rule_form(block: CPDBlock, shape: torch.Size, forms: Sequence[str]) -> str:
    """No timing: dense if it needs at most ``DENSE_EFFICIENCY`` times the MACs of the best factored form."""
    factored = [f for f in forms if f != "dense"]
    best = min(factored, key=lambda f: (form_macs(block, shape, f), ("grouped", "merged", "cpd").index(f)), default=None)
    if best is None:
        return "dense"
    if "dense" in forms and form_macs(block, shape, "dense") <= DENSE_EFFICIENCY * form_macs(block, shape, best):
        return "dense"
    return best


def _fastest_model(
    candidates: Mapping[str, tuple[nn.Module, Mapping[str, str]]], inputs: tuple[Tensor, ...], device: torch.device
) -> str:
    runners = {}
    for fmt, (candidate, _) in candidates.items():
        def run(candidate: nn.Module = candidate) -> Any:
            with torch.no_grad():
                return candidate(*inputs)
        runners[fmt] = run
    stats = compare_callables(runners, warmup=1, repeats=5, max_time_s=10.0, device=device)
    return min(stats, key=lambda fmt: stats[fmt].median_ms)


# Transitional registration (the deploy stage's owner replaces it with its own check/describe).
def _check_optimize_record(record: Mapping[str, Any]) -> None:
    if not isinstance(record, Mapping) or record.get("op") != "optimize":
        raise UserError(f"not an optimize record: {str(record)[:80]}")


register_operation(PlanOperation(
    name="optimize", check=_check_optimize_record, replay=replay_optimize,
    describe=lambda record: f"optimize {len(record.get('forms', {}))} CPDBlocks",
    example=lambda model, x: optimize_for_inference(model, x, measure=False),
))
