"""Multiply-accumulates (MACs) and parameters of any ``nn.Module``, counted with forward hooks.

One forward pass of a zero input (batch 1 unless given) runs in eval mode under
``torch.no_grad``; hooks record each counted module's cost. Conventions:

``"conv+linear"`` (default)
    MACs of convolutions (``out_elements * in_channels/groups * k_h * k_w``) and
    linear layers (``out_elements * in_features``) only, biases not counted;
    params = every parameter except those of normalisation layers (BN's scale and
    shift fold into the conv at inference). This is how the paper's tables quote
    the baselines (ResNet-56 125.49M / 0.85M, DenseNet-40 282.92M / 1.04M).

``"reference"`` (alias ``"ptflops"``)
    What the reference's ``complexity.py`` printed: ``min(ptflops, thop)``, taken
    separately for MACs and for params, i.e. ``min`` of the two rule sets below.
    For the paper's BN networks the MACs come from ptflops' module rules and the
    params from thop's (which skip a CPDBlock's own bias).

``"ptflops-modules"``
    ptflops 0.7's module hooks without its functional patching (which the README's
    numbers show the authors' ptflops did not apply): convs and linears with their bias, BN ``2 * elements`` (affine),
    ReLU-family ``elements``, pools ``input elements``; params = trainable parameters.

``"thop"``
    thop 0.1.1's rules: convs and linears without bias, norms ``4 * elements``
    (affine), average pools ``output elements``, ReLU and max pools free; params
    = parameters of counted modules only (modules of unknown type contribute nothing).

Module rules match exact types (as both tools do), except ``"conv+linear"``, which
also counts subclasses. Functional calls (``F.avg_pool2d`` in a ``forward``) and
tensor arithmetic are never counted. Numbers are per sample (divided by the batch).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from norton.errors import UserError
from norton.example_inputs import call_model, first_tensor, on_device_of, takes_image_list

if TYPE_CHECKING:  # the block type only: norton.decomposition imports this module
    from norton.decomposition.cpd_block import CPDBlock
from norton.limits import check_input_size

# A rule reads the attributes of the module types it is registered for (kernel_size, groups, ...).
Rule = Callable[[Any, Tensor, Tensor], float]

CONVENTIONS = ("conv+linear", "reference", "ptflops-modules", "thop")
ALIASES = {"ptflops": "reference"}


@dataclass(frozen=True)
class LayerComplexity:
    """One counted module: its qualified name, type name, MACs and parameters (per sample)."""

    name: str
    type: str
    macs: int
    params: int


@dataclass(frozen=True)
class Complexity:
    """Totals of one count; ``layers`` (when requested) sum to the totals."""

    macs: int
    params: int
    convention: str
    input_size: tuple[int, ...]
    layers: list[LayerComplexity] = field(default_factory=list)


# ---------------------------------------------------------------- closed forms
# MACs from shapes alone (no forward pass), for choices made per layer: decomposition
# reports, inference-form rules and pruning budgets. They agree with the hooked count
# of the "conv+linear" convention below (tests check both on the same layers).
def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one axis (``nn.Conv2d``'s formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_macs(conv: nn.Conv2d, input_hw: Sequence[int]) -> int:
    """MACs of ``conv`` on one ``(H, W)`` input: ``H_out * W_out * N * C_in/groups * k_h * k_w``."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = _padding(conv)
    h_out = conv_output_size(int(input_hw[0]), kh, sh, ph, dh)
    w_out = conv_output_size(int(input_hw[1]), kw, sw, pw, dw)
    return h_out * w_out * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


CPD_FORMS = ("cpd", "merged", "grouped", "dense")


def cpd_block_macs(block: CPDBlock, input_hw: Sequence[int], form: str = "cpd") -> int:
    """MACs of a CPDBlock (``N`` filters, ``C_in``, rank ``R``) on one ``(H, W)`` input, in one of its forms.

    ``"cpd"``: pointwise ``C_in -> R*N`` on the input grid, depthwise ``k_h x 1`` (vertical
    stride), depthwise ``1 x k_w``; ``"merged"``/``"grouped"``: the pointwise conv, then one
    ``k_h x k_w`` pass over ``R*N`` channels; ``"dense"``: the equivalent ``N x C_in x k_h x k_w`` conv.
    """
    if form not in CPD_FORMS:
        raise UserError(f"unknown CPDBlock form {form!r}; use one of {', '.join(CPD_FORMS)}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = block.kernel_size, block.stride, block.padding, block.dilation
    h_in, w_in = int(input_hw[0]), int(input_hw[1])
    h_out, w_out = conv_output_size(h_in, kh, sh, ph, dh), conv_output_size(w_in, kw, sw, pw, dw)
    n, c, r = block.out_channels, block.in_channels, block.rank
    pointwise = h_in * w_in * r * n * c
    if form == "cpd":
        return pointwise + h_out * w_in * r * n * kh + h_out * w_out * r * n * kw
    if form == "dense":
        return h_out * w_out * n * c * kh * kw
    return pointwise + h_out * w_out * r * n * kh * kw


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    from norton.decomposition.cpd_block import conv_padding  # resolves padding="same"

    return conv_padding(conv)


# ---------------------------------------------------------------- rule sets
def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


def _conv_macs(module: Any, x: Tensor, y: Tensor) -> float:
    """``out_elements * C_in/groups * prod(kernel)``; transposed convs scatter from each input element."""
    kernel = _prod(module.kernel_size)
    if module.transposed:
        return x.numel() * (module.out_channels // module.groups) * kernel
    return y.numel() * (module.in_channels // module.groups) * kernel


def _linear_macs(module: Any, x: Tensor, y: Tensor) -> float:
    return y.numel() * module.in_features


# ptflops 0.7 ``MODULES_MAPPING`` (pytorch backend, functional patching off).
def _ptflops_conv(module: Any, x: Tensor, y: Tensor) -> float:
    spatial = x.shape[2:] if module.transposed else y.shape[2:]
    per_position = _prod(module.kernel_size) * module.in_channels * (module.out_channels // module.groups)
    bias = y.numel() if module.bias is not None else 0
    return per_position * x.shape[0] * _prod(spatial) + bias


def _ptflops_linear(module: Any, x: Tensor, y: Tensor) -> float:
    bias = y.shape[-1] if module.bias is not None else 0
    return (x.shape[-1] * y.shape[-1] + bias) * _prod(x.shape[:-1])


def _ptflops_norm(module: Any, x: Tensor, y: Tensor) -> float:
    # ptflops reads ``affine``, which LayerNorm does not have (it has ``elementwise_affine``).
    return x.numel() * (2 if getattr(module, "affine", False) else 1)


def _output_elements(module: Any, x: Tensor, y: Tensor) -> float:
    return y.numel()


def _input_elements(module: Any, x: Tensor, y: Tensor) -> float:
    return x.numel()


def _free(module: Any, x: Tensor, y: Tensor) -> float:
    return 0


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_PTFLOPS_RULES: dict[type, Rule] = {
    **dict.fromkeys(_CONVS, _ptflops_conv),
    **dict.fromkeys((nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU), _output_elements),
    **dict.fromkeys(
        (
            nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        ),
        _input_elements,
    ),
    **dict.fromkeys(
        (
            nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
            nn.GroupNorm, nn.LayerNorm,
        ),
        _ptflops_norm,
    ),
    nn.Linear: _ptflops_linear,
    nn.Upsample: _output_elements,
}


# thop 0.1.1.post2209072238 ``register_hooks``.
def _thop_conv(module: Any, x: Tensor, y: Tensor) -> float:
    return y.numel() * (x.shape[1] // module.groups) * _prod(module.weight.shape[2:])


def _thop_norm(module: Any, x: Tensor, y: Tensor) -> float:
    # thop counts 2 ops per element, and doubles that again for an affine norm.
    affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
    return 2 * x.numel() * (2 if affine else 1)


def _thop_adaptive_avgpool(module: Any, x: Tensor, y: Tensor) -> float:
    window = math.prod(float(i) / float(o) for i, o in zip(x.shape[2:], y.shape[2:], strict=False))
    return int((window + 1) * y.numel())


def _thop_softmax(module: Any, x: Tensor, y: Tensor) -> float:
    features = x.shape[module.dim]
    return (x.numel() // features) * (3 * features - 1)


_THOP_UPSAMPLE_COST = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 259}


def _thop_upsample(module: Any, x: Tensor, y: Tensor) -> float:
    return y.numel() * _THOP_UPSAMPLE_COST.get(module.mode, 0)


_THOP_RULES: dict[type, Rule] = {
    **dict.fromkeys(_CONVS, _thop_conv),
    **dict.fromkeys(
        (
            nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
            nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        ),
        _thop_norm,
    ),
    **dict.fromkeys(
        (
            nn.ZeroPad2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.PixelShuffle,
            nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
        ),
        _free,
    ),
    **dict.fromkeys((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _output_elements),
    **dict.fromkeys((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), _thop_adaptive_avgpool),
    nn.Linear: _linear_macs,
    nn.Softmax: _thop_softmax,
    **dict.fromkeys((nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d), _thop_upsample),
}


# Scale and shift of a normalisation layer fold into the neighbouring conv at inference.
_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _conv_linear_rule(module: nn.Module) -> Rule | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_macs
    if isinstance(module, nn.Linear):
        return _linear_macs
    return None


# ---------------------------------------------------------------- counting
@dataclass
class _Tally:
    """Per-module MACs and params of one rule set, in module order."""

    macs: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    def totals(self) -> tuple[int, int]:
        return round(sum(self.macs.values())), sum(self.params.values())


def count_complexity(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    example_inputs: Any = None,
    convention: str = "conv+linear",
    per_layer: bool = False,
) -> Complexity:
    """Count MACs and parameters of ``model`` on an input of ``input_size`` (per sample).

    Args:
        model: any module taking one image tensor (or ``example_inputs``).
        input_size: ``(C, H, W)`` or ``(N, C, H, W)``; a zero input of this shape is used.
        example_inputs: instead of ``input_size``, what the model runs on: a tensor, a
            tuple of tensors or a dict of keyword tensors (moved to the model's device;
            numbers are per sample of the first tensor's batch).
        convention: ``"conv+linear"``, ``"reference"`` (alias ``"ptflops"``),
            ``"ptflops-modules"`` or ``"thop"``; see the module docstring.
        per_layer: also return one row per counted module in ``layers``.
    """
    convention = _check_convention(convention)
    if example_inputs is not None and input_size is None:
        inputs = on_device_of(example_inputs, model)
        shape = tuple(first_tensor(inputs).shape)
    elif input_size is not None and example_inputs is None:
        shape = _check_input_size(input_size)
        inputs = _example_input(model, shape)
    else:
        raise UserError("count_complexity needs exactly one of input_size or example_inputs")
    tallies = _count_macs(model, inputs, _batch(model, inputs, shape))
    totals = _count_params(model, tallies)
    macs_key, params_key = convention_sources(convention, totals)
    layers = _rows(model, tallies[macs_key].macs, tallies[params_key].params) if per_layer else []
    return Complexity(totals[macs_key][0], totals[params_key][1], convention, shape, layers)


def count_conventions(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, int]]:
    """``{convention: (macs, params)}`` of every convention from ONE hooked forward of ``example_inputs``.

    For sums over parts (a detector counted part by part): ``"reference"``'s minimum must be
    taken over the *totals* of ``ptflops-modules`` and ``thop``, so the parts keep them apart.
    """
    inputs = on_device_of(example_inputs, model)
    shape = tuple(first_tensor(inputs).shape)
    totals = _count_params(model, _count_macs(model, inputs, _batch(model, inputs, shape)))
    macs_key, params_key = convention_sources("reference", totals)
    return {**totals, "reference": (totals[macs_key][0], totals[params_key][1])}


def convention_sources(convention: str, totals: dict[str, tuple[int, int]]) -> tuple[str, str]:
    """The rule sets the MACs and the params of ``convention`` come from, given every rule set's totals."""
    if convention != "reference":
        return convention, convention
    # the reference printed min(ptflops, thop), MACs and params separately
    macs_key = min(("ptflops-modules", "thop"), key=lambda key: totals[key][0])
    params_key = min(("ptflops-modules", "thop"), key=lambda key: totals[key][1])
    return macs_key, params_key


def _batch(model: nn.Module, inputs: Any, shape: tuple[int, ...]) -> int:
    """Samples in the example: a detector's list holds one image per sample (each ``(3, H, W)``)."""
    if isinstance(inputs, list) and takes_image_list(model):
        return max(len(inputs), 1)
    return shape[0] if len(shape) > 1 else 1


def _count_macs(model: nn.Module, inputs: Any, batch: int) -> dict[str, _Tally]:
    """One hooked forward pass filling every rule set's per-module MACs (and thop's params)."""
    names = {module: name for name, module in model.named_modules()}
    tallies = {key: _Tally() for key in ("conv+linear", "ptflops-modules", "thop")}
    thop_units = _units(model, _THOP_RULES)
    ptflops_units = _units(model, _PTFLOPS_RULES)

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            return
        name, x = names[module], inputs[0]
        rule = _conv_linear_rule(module)
        if rule is not None:
            _add(tallies["conv+linear"].macs, name, rule(module, x, output) / batch)
        if module in ptflops_units:
            _add(tallies["ptflops-modules"].macs, name, _PTFLOPS_RULES[type(module)](module, x, output) / batch)
        if module in thop_units:
            _add(tallies["thop"].macs, name, _THOP_RULES[type(module)](module, x, output) / batch)
            # thop counts a module's parameters (its children's included) only once it has run.
            tallies["thop"].params[name] = sum(p.numel() for p in module.parameters())

    handles = []
    modes = {module: module.training for module in model.modules()}
    try:
        for module in model.modules():
            handles.append(module.register_forward_hook(hook))
        model.eval()
        from norton.deploy.forms import blocks_as_written  # deploy builds on this module: imported late

        with torch.no_grad(), blocks_as_written(model):
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return tallies


def _count_params(model: nn.Module, tallies: dict[str, _Tally]) -> dict[str, tuple[int, int]]:
    """Fill the per-module params of ``conv+linear`` and ``ptflops-modules``; return every set's totals."""
    weights: dict[int, Tensor] = {}  # parameters outside normalisation layers, each once
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        trainable = sum(p.numel() for p in own if p.requires_grad)
        if trainable:
            tallies["ptflops-modules"].params[name] = trainable
        if own and not isinstance(module, _NORM_TYPES):
            tallies["conv+linear"].params[name] = sum(p.numel() for p in own)
            weights.update((id(p), p) for p in own)
    totals = {key: tally.totals() for key, tally in tallies.items()}
    # A shared parameter appears under each of its owners above; the totals count it once.
    unique = {id(p): p for p in model.parameters()}.values()
    totals["conv+linear"] = (totals["conv+linear"][0], sum(p.numel() for p in weights.values()))
    totals["ptflops-modules"] = (totals["ptflops-modules"][0], sum(p.numel() for p in unique if p.requires_grad))
    return totals


def _check_convention(convention: str) -> str:
    convention = ALIASES.get(convention, convention)
    if convention not in CONVENTIONS:
        known = ", ".join([*CONVENTIONS, *ALIASES])
        raise UserError(f"unknown complexity convention {convention!r}; use one of: {known}")
    return convention


def _check_input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    shape = check_input_size(input_size)
    return (1, *shape) if len(shape) == 3 else shape


def original_complexity(model: nn.Module, input_size: Sequence[int] | None = None, *, example_inputs: Any = None,
                        convention: str = "conv+linear") -> Complexity:
    """MACs and params of ``model`` before its first norton operation (:func:`norton.plan.original_model`).

    Fractions of MACs (``target_macs``) are fractions of this count.
    """
    from norton.plan import original_model

    return count_complexity(original_model(model), input_size, example_inputs=example_inputs,
                            convention=convention)


def _units(model: nn.Module, rules: dict[type, Rule]) -> set[nn.Module]:
    """Modules a tool counts: the outermost ones whose exact type has a rule (it does not look inside them)."""
    if type(model) in rules:
        return {model}
    units: set[nn.Module] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child) in rules:
                units.add(child)
            else:
                visit(child)

    visit(model)
    return units


def _add(table: dict[str, float], name: str, value: float) -> None:
    table[name] = table.get(name, 0) + value


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    reference: Tensor | None = next(model.parameters(), None)
    if reference is None:
        reference = next(model.buffers(), None)
    if reference is None or not reference.is_floating_point():
        return torch.zeros(shape)
    return torch.zeros(shape, device=reference.device, dtype=reference.dtype)


def _rows(model: nn.Module, macs: dict[str, float], params: dict[str, int]) -> list[LayerComplexity]:
    rows = []
    for name, module in model.named_modules():
        if name in macs or name in params:
            rows.append(LayerComplexity(name, type(module).__name__, round(macs.get(name, 0)), params.get(name, 0)))
    return rows
