"""Data-aware recovery after compression, before fine-tuning: refits and BatchNorm re-estimation.

Pruning and decomposition choose weights from the weights alone. A few hundred
unlabeled calibration images (:func:`norton.calibration.calibration_inputs`) recover
much of what they lose, with no training:

* :func:`refit_pruned_consumers`: each layer that lost input channels (a ``Conv2d`` with
  ``groups=1``, an ``nn.Linear`` or a CPDBlock) is refitted by ridge least squares so
  that, fed the *pruned* model's activations, it reproduces the *original* model's output
  of that layer (ThiNet, Luo et al. 2017; channel pruning with reconstruction, He et al.
  2017). A conv is fitted on its input patches; a CPDBlock's factors are fitted
  head, body, tail in turn (its output is linear in each with the others fixed).
* :func:`refit_cp_blocks`: each CPDBlock that replaced a convolution is refitted to
  reproduce that convolution's *output* on the calibration activations, not its kernel;
  of a Tucker-2, layer CP or spatial SVD block, its last layer alone (a plain conv fed by
  the block's earlier layers, whose output is the block's).
* :func:`recalibrate_batchnorm`: every BatchNorm's running statistics re-estimated.
* :func:`recover`: all three, in that order; returns a small report.

How the refit runs (in the order the forward reaches the layers, so a layer sees the
refitted outputs of the layers before it): one forward of the original model records each
target layer's outputs at sampled positions. Then one forward of the compressed model runs
every calibration image as a single batch, with a pre-hook on each layer to refit: when
the forward reaches it, its input (from the already refitted layers) is complete, so the
hook gathers the input patches at the same positions, accumulates the least-squares
statistics (:mod:`norton.layer_fit`) and solves, changing the weights in place before the
layer runs. When the activations of all images at once would not fit (``_LIVE`` copies of
the largest layer output over ``_ONE_PASS_BYTES``, or half the free GPU memory), it falls
back to batch-by-batch partial forwards, one per layer, stopped at that layer: the same
statistics, ``layers / 2`` times the forward cost. Memory is bounded by sampling
``ceil(samples / images)`` output positions per image (all of them when fewer), uniformly
without replacement, so each layer sees about ``samples`` rows. Only weights change, never
the structure, so plans replay unchanged.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norton.calibration import count_images, evaluating
from norton.decomposition.cpd_block import CPDBlock, conv_padding
from norton.decomposition.factorized import FactorizedConv
from norton.errors import UserError
from norton.layer_fit import Stats, cp_factor_system, dense_system, residual, ridge_solve
from norton.limits import check_finite, check_int
from norton.plan import plan_of

__all__ = ["recalibrate_batchnorm", "recover", "refit_cp_blocks", "refit_pruned_consumers"]

log = logging.getLogger(__name__)

# The one-pass refit runs every calibration image at once when about this many activations
# of the model's largest layer output fit in _ONE_PASS_BYTES (else one partial forward per layer).
_LIVE = 8
_ONE_PASS_BYTES = 2 << 30


# --------------------------------------------------------------------- BatchNorm
def recalibrate_batchnorm(model: nn.Module, inputs: Sequence[Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``inputs``, in place; returns ``model``.

    Statistics are reset and re-accumulated with cumulative averaging (``momentum=None``):
    the running mean is the mean of the batch means, the running variance the mean of the
    unbiased batch variances. Only the BatchNorms are in train mode meanwhile (dropout and
    every other module in eval mode, no gradients); modes and momenta are restored after.
    """
    _check_inputs(inputs)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    momenta = {norm: norm.momentum for norm in norms}
    with evaluating(model):
        try:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None
                norm.train()
            for x in inputs:
                model(x)
        finally:
            for norm, momentum in momenta.items():
                norm.momentum = momentum
    return model


# --------------------------------------------------------------------- public refits
def refit_pruned_consumers(
    original: nn.Module,
    pruned: nn.Module,
    inputs: Sequence[Tensor],
    *,
    layers: Iterable[str] | None = None,
    ridge: float = 1e-4,
    samples: int = 8192,
    rounds: int = 1,
    kept_outputs: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Refit, in place, every layer of ``pruned`` whose input channels were reduced; relative errors after.

    Args:
        original: the model before the prune (a deep copy); not changed.
        pruned: the pruned model (same layer names); its refitted layers change in place.
        inputs: calibration batches ``[(B, *image), ...]`` both models run on.
        layers: names to refit (default: every ``Conv2d`` with ``groups=1``, ``nn.Linear``
            and CPDBlock with fewer input channels than the same-named layer of ``original``).
        ridge: ridge strength, relative to the mean diagonal of the Gram, pulling towards
            the current (sliced) weights.
        samples: about this many sampled output rows per layer (bounds time and memory).
        rounds: CPDBlocks: sweeps of head, body, tail solves.
        kept_outputs: ``{name: kept output indices of the original layer}`` for layers whose
            outputs were pruned too; by default read from the prune records ``pruned`` has
            beyond ``original``'s (what :func:`norton.prune` appends).
        seed: seeds the sampled positions.

    Returns ``{layer: relative output error on the calibration samples after the refit}``
    (``||y - y*|| / ||y*||`` over sampled rows and kept outputs); the error before is logged.
    """
    _check_options(inputs, ridge, samples, rounds)
    chosen = _chosen(original, pruned, layers, _reduced_consumer)
    return {name: after for name, (_, after) in
            _refit(original, pruned, inputs, chosen, ridge, samples, rounds, kept_outputs, seed).items()}


def refit_cp_blocks(
    original: nn.Module,
    decomposed: nn.Module,
    inputs: Sequence[Tensor],
    *,
    layers: Iterable[str] | None = None,
    ridge: float = 1e-4,
    samples: int = 8192,
    rounds: int = 1,
    kept_outputs: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Refit every CPDBlock of ``decomposed`` that replaced an ``nn.Conv2d`` of ``original`` (same name).

    The block's factors are fitted to reproduce the convolution's *output* on the
    calibration activations: ``rounds`` sweeps of ridge least squares on the head
    ``(N, C_in, R)``, then the body ``(N, k_h, R)``, then the tail ``(N, k_w, R)``
    (each with the other two fixed, the output being linear in it) and the bias.
    A :class:`~norton.decomposition.factorized.FactorizedConv` (Tucker-2, layer CP, spatial
    SVD) that replaced a convolution has its last layer and bias refitted the same way.
    Each solve starts from and is pulled towards the current factors, so the error on
    the calibration samples never grows. Same arguments and result as
    :func:`refit_pruned_consumers`.
    """
    _check_options(inputs, ridge, samples, rounds)
    chosen = _chosen(original, decomposed, layers, _replaced_conv)
    return {name: after for name, (_, after) in
            _refit(original, decomposed, inputs, chosen, ridge, samples, rounds, kept_outputs, seed).items()}


def recover(
    original: nn.Module,
    compressed: nn.Module,
    calibration_inputs: Sequence[Tensor],
    *,
    ridge: float = 1e-4,
    samples: int = 8192,
    rounds: int = 1,
    batchnorm: bool = True,
) -> dict[str, Any]:
    """Refit pruned consumers and CPDBlocks of ``compressed`` (in one pass, in forward order), then BatchNorm.

    Returns ``{"images": n, "layers": {name: {"before": e0, "after": e1}}, "batchnorms": k}``:
    relative output errors on the calibration samples and the number of BatchNorms re-estimated.
    """
    _check_options(calibration_inputs, ridge, samples, rounds)

    def wanted(name: str, new: nn.Module, old: nn.Module) -> bool:
        return _reduced_consumer(name, new, old) or _replaced_conv(name, new, old)

    chosen = _chosen(original, compressed, None, wanted)
    errors = _refit(original, compressed, calibration_inputs, chosen, ridge, samples, rounds, None, 0)
    norms = 0
    if batchnorm:
        recalibrate_batchnorm(compressed, calibration_inputs)
        norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in compressed.modules())
    return {
        "images": count_images(calibration_inputs),
        "layers": {name: {"before": before, "after": after} for name, (before, after) in errors.items()},
        "batchnorms": norms,
    }


# --------------------------------------------------------------------- checks and choice
def _check_inputs(inputs: Any) -> None:
    if (not isinstance(inputs, Sequence) or not inputs or not all(isinstance(x, Tensor) for x in inputs)):
        raise UserError(
            "calibration inputs must be a non-empty list of input tensors: build them with "
            "norton.calibration_inputs(calibration, example_inputs)"
        )


def _check_options(inputs: Any, ridge: Any, samples: Any, rounds: Any) -> None:
    _check_inputs(inputs)
    check_finite(ridge, "ridge", positive=True)
    check_int(samples, "samples", maximum=1 << 24)
    check_int(rounds, "rounds", maximum=100)


def _in_width(layer: Any) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)


def _out_width(layer: Any) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _refittable(layer: nn.Module) -> bool:
    """Layers whose every input channel enters every output: ``groups=1`` convs, linears, CPDBlocks."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and not isinstance(layer.weight, nn.parameter.UninitializedParameter)
    return isinstance(layer, (nn.Linear, CPDBlock))


def _reduced_consumer(name: str, new: nn.Module, old: nn.Module) -> bool:
    return _refittable(new) and type(new) is type(old) and _in_width(new) < _in_width(old)


def _replaced_conv(name: str, new: nn.Module, old: nn.Module) -> bool:
    return isinstance(new, (CPDBlock, FactorizedConv)) and isinstance(old, nn.Conv2d) and _refittable(old)


def _fitted(layer: nn.Module) -> nn.Module:
    """What is solved for ``layer``: a FactorizedConv's last child (its output is the block's), else itself."""
    return layer.output_layer if isinstance(layer, FactorizedConv) else layer


def _chosen(original: nn.Module, compressed: nn.Module, layers: Iterable[str] | None, rule: Any) -> list[str]:
    """Names to refit: those ``rule`` accepts, or the given ``layers`` (each checked to be refittable)."""
    old = dict(original.named_modules())
    new = dict(compressed.named_modules())
    if layers is None:
        inner = tuple(f"{name}." for name, module in new.items() if isinstance(module, (CPDBlock, FactorizedConv)))
        return [  # a block's own convs are refitted through their block, never alone
            name for name, module in new.items()
            if name in old and not name.startswith(inner) and rule(name, module, old[name])
        ]
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    for name in names:
        if not isinstance(name, str) or name not in new or name not in old:
            raise UserError(f"layers names {name!r}, which is not a layer of both models")
        same = type(new[name]) is type(old[name]) and _refittable(new[name])
        if not (same or _replaced_conv(name, new[name], old[name])):
            raise UserError(
                f"layer {name!r} cannot be refitted: it must be a Conv2d (groups=1), nn.Linear or CPDBlock "
                f"in both models (or a CPDBlock replacing a Conv2d), got {type(old[name]).__name__} -> "
                f"{type(new[name]).__name__}"
            )
    return names


def _kept(
    original: nn.Module, compressed: nn.Module, names: Sequence[str], given: Mapping[str, Sequence[int]] | None
) -> dict[str, Tensor | None]:
    """Which output channels of each original layer the compressed one kept (None: all of them)."""
    old, new = dict(original.named_modules()), dict(compressed.named_modules())
    before, after = plan_of(original), plan_of(compressed)
    records = after[len(before):] if after[: len(before)] == before else []
    kept: dict[str, Tensor | None] = {}
    for name in names:
        width, now = _out_width(old[name]), _out_width(new[name])
        if given is not None and name in given:
            index = torch.as_tensor(list(given[name]), dtype=torch.long)
        elif width == now:
            kept[name] = None
            continue
        else:
            index = torch.arange(width)
            for record in records:  # compose the prunes since `original`, in order
                removed = record.get("removed", {}).get(name) if record.get("op") == "prune" else None
                if removed:
                    mask = torch.ones(index.numel(), dtype=torch.bool)
                    mask[torch.as_tensor(removed, dtype=torch.long)] = False
                    index = index[mask]
        if index.numel() != now or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < width):
            raise UserError(
                f"cannot tell which of the {width} output channels of {name!r} the {now} kept ones are: prune with "
                "norton.prune (its record says so) or pass kept_outputs={name: indices}"
            )
        kept[name] = index
    return kept


# --------------------------------------------------------------------- sampling
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has its input."""


def _geometry(layer: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """``(kernel, stride, padding, dilation)`` of a conv-like layer, None for a linear one."""
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, CPDBlock):
        return layer.kernel_size, layer.stride, layer.padding, layer.dilation
    conv: Any = layer
    return tuple(conv.kernel_size), tuple(conv.stride), conv_padding(conv), tuple(conv.dilation)


def _output_rows(y: Tensor, positions: Tensor) -> Tensor:
    """Outputs at sampled positions: ``y (B, N, H', W')`` or ``(B, ..., N)`` -> ``(B * P, N)``."""
    if y.ndim == 4:
        flat = y.flatten(2)  # (B, N, L)
        picked = flat.gather(2, positions.unsqueeze(1).expand(-1, flat.shape[1], -1))  # (B, N, P)
        return picked.transpose(1, 2).reshape(-1, flat.shape[1])
    flat = y.reshape(y.shape[0], -1, y.shape[-1])  # (B, T, N)
    return flat.gather(1, positions.unsqueeze(-1).expand(-1, -1, flat.shape[-1])).reshape(-1, flat.shape[-1])


def _input_rows(layer: nn.Module, x: Tensor, positions: Tensor, width: int) -> Tensor:
    """The layer's input features at sampled output positions ``(B * P, D0)``.

    A conv-like layer gets its patches ``(C, k_h, k_w)`` gathered directly from the padded
    input (no full unfold: only the sampled positions are built); ``width`` is the output width.
    """
    geometry = _geometry(layer)
    if geometry is None:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        return flat.gather(1, positions.unsqueeze(-1).expand(-1, -1, flat.shape[-1])).reshape(-1, flat.shape[-1])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    mode = getattr(layer, "padding_mode", "zeros")
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), mode="constant" if mode == "zeros" else mode)
    rows = (positions // width).unsqueeze(-1) * sh + torch.arange(kh, device=x.device) * dh  # (B, P, k_h)
    cols = (positions % width).unsqueeze(-1) * sw + torch.arange(kw, device=x.device) * dw  # (B, P, k_w)
    batch = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1)
    patches = x.permute(0, 2, 3, 1)[batch, rows.unsqueeze(-1), cols.unsqueeze(-2)]  # (B, P, k_h, k_w, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, x.shape[1] * kh * kw)  # (B * P, C k_h k_w)


def _dtype(layer: nn.Module) -> torch.dtype:
    """The statistics' dtype: float64, except on MPS (which has none)."""
    return torch.float32 if next(layer.parameters()).device.type == "mps" else torch.float64


class _Targets:
    """One layer's original outputs at sampled positions, batch by batch."""

    def __init__(self) -> None:
        self.positions: list[Tensor] = []  # per batch (B, P)
        self.rows: list[Tensor] = []  # per batch (B * P, N)
        self.width = 0  # output width of a conv (positions are flat H' x W' indices)
        self.calls = 0


def _targets(
    original: nn.Module, names: Sequence[str], inputs: Sequence[Tensor], samples: int, seed: int
) -> tuple[dict[str, _Targets], list[str], int]:
    """One forward of ``original``: sampled outputs of each named layer, the order the forward reaches them,
    and the largest output of any leaf module, in bytes per image (to size the one-pass refit)."""
    per_image = math.ceil(samples / max(count_images(inputs), 1))
    generator = torch.Generator().manual_seed(seed)
    found = {name: _Targets() for name in names}
    order: list[str] = []
    shared: set[str] = set()  # run more than once per forward (shared weights): not refitted
    largest = [0]

    def measure(module: nn.Module, args: tuple, y: Any) -> None:
        if isinstance(y, Tensor) and y.ndim:
            largest[0] = max(largest[0], y[0].numel() * y.element_size())

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, y: Tensor) -> None:
            target = found[name]
            target.calls += 1
            if target.calls > 1 or name in shared:
                return
            if name not in order:
                order.append(name)
            length = y[0, 0].numel() if y.ndim == 4 else y[0, ..., 0].numel()  # output positions per image
            keep = min(per_image, length)
            positions = torch.rand(y.shape[0], length, generator=generator).argsort(1)[:, :keep].to(y.device)
            target.positions.append(positions)  # (B, P)
            target.rows.append(_output_rows(y, positions))  # (B * P, N)
            target.width = y.shape[-1] if y.ndim == 4 else 0
        return record

    modules = dict(original.named_modules())
    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    handles += [m.register_forward_hook(measure) for m in modules.values() if next(m.children(), None) is None]
    try:
        with evaluating(original):
            for x in inputs:
                for target in found.values():
                    target.calls = 0
                original(x)
                shared.update(name for name, target in found.items() if target.calls > 1)
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name in order if name not in shared]
    skipped = [name for name in names if name not in order]
    if skipped:
        log.warning("not refitted (not run, or run more than once per forward): %s", ", ".join(skipped))
    return found, order, largest[0]


def _statistics(model: nn.Module, name: str, inputs: Sequence[Tensor], target: _Targets) -> Stats | None:
    """Least-squares statistics of layer ``name`` of ``model`` against ``target``, from partial forwards."""
    layer = _fitted(model.get_submodule(name))
    weight = next(layer.parameters())
    dtype = _dtype(layer)
    stats: Stats | None = None
    captured: list[Tensor] = []

    def stop(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(stop)
    try:
        with evaluating(model):
            for x, positions, rows in zip(inputs, target.positions, target.rows, strict=True):
                captured.clear()
                try:
                    model(x)
                except _Stop:
                    pass
                if not captured:
                    return None
                features = _input_rows(layer, captured[0], positions, target.width)  # (B * P, D0)
                if stats is None:
                    stats = Stats.zeros(features.shape[1], rows.shape[1], device=weight.device, dtype=dtype)
                stats.add(features, rows)
    finally:
        handle.remove()
    return stats


# --------------------------------------------------------------------- solving
def _solve_layer(layer: nn.Module, stats: Stats, ridge: float, rounds: int) -> tuple[float, float]:
    """Refit ``layer`` in place from ``stats``; relative errors ``(before, after)``."""
    energy = float(stats.yy.sum().clamp_min(1e-30))
    if isinstance(layer, CPDBlock):
        before, after = _solve_cp(layer, stats, ridge, rounds)
    elif isinstance(layer, (nn.Conv2d, nn.Linear)):
        before, after = _solve_dense(layer, stats, ridge)
    else:
        raise TypeError(f"cannot refit a {type(layer).__name__}")
    return math.sqrt(before / energy), math.sqrt(after / energy)


def _solve_dense(layer: nn.Conv2d | nn.Linear, stats: Stats, ridge: float) -> tuple[float, float]:
    """One shared system, ``N`` right-hand sides: the weight rows (and bias); squared errors before/after."""
    weight = layer.weight.detach()
    theta = weight.reshape(weight.shape[0], -1).to(stats.gram.dtype)  # (N, D0): rows in (C, k_h, k_w) order
    beta = layer.bias.detach().to(stats.gram.dtype) if layer.bias is not None else None
    system = dense_system(stats)
    before = float(residual(*system, stats, theta, beta).sum())
    theta, beta = ridge_solve(*system, stats, theta, beta, ridge)
    after = float(residual(*system, stats, theta, beta).sum())
    with torch.no_grad():
        layer.weight.copy_(theta.reshape(weight.shape))
        if layer.bias is not None and beta is not None:
            layer.bias.copy_(beta)
    return before, after


def _solve_cp(layer: CPDBlock, stats: Stats, ridge: float, rounds: int) -> tuple[float, float]:
    """``rounds`` sweeps of head, body, tail solves (each with the bias); squared errors before/after."""
    factors = [f.to(stats.gram.dtype).clone() for f in layer.factors()]  # (N, C, R), (N, k_h, R), (N, k_w, R)
    beta = layer.bias.detach().to(stats.gram.dtype) if layer.bias is not None else None
    before: float | None = None
    after = 0.0
    for _ in range(rounds):
        for mode in (0, 1, 2):
            system = cp_factor_system(stats, (factors[0], factors[1], factors[2]), mode, layer.kernel_size)
            theta = factors[mode].reshape(factors[mode].shape[0], -1)  # (N, d R)
            if before is None:
                before = float(residual(*system, stats, theta, beta).sum())
            theta, beta = ridge_solve(*system, stats, theta, beta, ridge)
            factors[mode] = theta.reshape(factors[mode].shape)
            after = float(residual(*system, stats, theta, beta).sum())
    dtype = layer.pointwise.weight.dtype
    layer.set_factors((factors[0].to(dtype), factors[1].to(dtype), factors[2].to(dtype)))
    if layer.bias is not None and beta is not None:
        with torch.no_grad():
            layer.bias.copy_(beta)
    return before or 0.0, after


def _fits_one_pass(inputs: Sequence[Tensor], largest: int) -> bool:
    """Whether all calibration images can run as one batch: ``_LIVE`` activations of the largest size fit."""
    need = _LIVE * largest * count_images(inputs)
    budget = _ONE_PASS_BYTES
    device = inputs[0].device
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    return need <= budget


def _refit_in_one_pass(
    compressed: nn.Module, inputs: Sequence[Tensor], targets: Mapping[str, _Targets], order: Sequence[str],
    kept: Mapping[str, Tensor | None], ridge: float, rounds: int,
) -> dict[str, tuple[float, float]]:
    """One forward of ``compressed`` on all images at once; each layer is refitted by a pre-hook.

    When the forward reaches a layer, every image's input to it (computed by the layers
    before it, already refitted) is there: the hook accumulates the statistics, solves and
    changes the weights in place before the layer runs, so the layers after it see its
    refitted output. Same statistics as one partial forward per layer, one forward in all.
    """
    modules = dict(compressed.named_modules())
    errors: dict[str, tuple[float, float]] = {}

    def hook(name: str) -> Any:
        target = targets[name]
        positions = torch.cat(target.positions)  # (images, P): batches in order, as the rows
        rows = torch.cat(target.rows)  # (images * P, N)

        def refit(layer: nn.Module, args: tuple) -> None:
            if name in errors:  # run again in the same forward: already refitted
                return
            features = _input_rows(layer, args[0], positions, target.width)  # (images * P, D0)
            stats = Stats.zeros(features.shape[1], rows.shape[1], device=features.device, dtype=_dtype(layer))
            stats.add(features, rows)
            errors[name] = _solve_layer(layer, stats.outputs(kept[name]), ridge, rounds)
            log.info("refit %s: relative output error %.4f -> %.4f (%d rows)", name, *errors[name], stats.count)
            target.rows.clear()  # free the layer's targets
        return refit

    handles = [_fitted(modules[name]).register_forward_pre_hook(hook(name)) for name in order]
    try:
        with evaluating(compressed):
            compressed(torch.cat(list(inputs)))
    finally:
        for handle in handles:
            handle.remove()
    for name in order:
        if name not in errors:
            log.warning("not refitted: the compressed model's forward does not reach %s", name)
    return {name: errors[name] for name in order if name in errors}


def _refit(
    original: nn.Module, compressed: nn.Module, inputs: Sequence[Tensor], names: Sequence[str], ridge: float,
    samples: int, rounds: int, kept_outputs: Mapping[str, Sequence[int]] | None, seed: int,
) -> dict[str, tuple[float, float]]:
    """Refit ``names`` of ``compressed`` in forward order; ``{name: (error before, after)}``.

    All images in one forward of ``compressed`` when their activations fit
    (:func:`_refit_in_one_pass`); otherwise batch by batch, one partial forward per layer.
    """
    if not names:
        return {}
    kept = _kept(original, compressed, names, kept_outputs)  # before any forward: a bad mapping fails fast
    targets, order, largest = _targets(original, names, inputs, samples, seed)
    if _fits_one_pass(inputs, largest):
        return _refit_in_one_pass(compressed, inputs, targets, order, kept, ridge, rounds)
    errors: dict[str, tuple[float, float]] = {}
    for name in order:
        stats = _statistics(compressed, name, inputs, targets[name])
        if stats is None:
            log.warning("not refitted: the compressed model's forward does not reach %s", name)
            continue
        layer = _fitted(compressed.get_submodule(name))
        errors[name] = _solve_layer(layer, stats.outputs(kept[name]), ridge, rounds)
        log.info("refit %s: relative output error %.4f -> %.4f (%d rows)", name, *errors[name], stats.count)
        targets[name].rows.clear()  # free the layer's targets
    return errors
