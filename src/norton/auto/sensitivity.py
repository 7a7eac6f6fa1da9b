"""How much the model's output changes when one unit alone is compressed, at a few amounts.

A *unit* is a coupled group of channels (compressed by keeping fewer of them) or a
convolution (compressed by a rank-``R`` decomposition). Running the whole model once
per unit and amount is too slow (hundreds of passes), so the change is predicted to
second order from one forward and a few backward passes (Fisher information, as in
Optimal Brain Damage and Fisher pruning, Theis et al. 2018):

    KL(p(y|x) || p'(y|x)) ~= 1/2 E_y~p [ (g_y . delta)^2 ],   g_y = d log p(y|x) / d a

where ``a`` is the output of the layers the unit changes and ``delta`` its change there.
``y`` is *sampled from the model's own prediction*, so no label is needed; for outputs
that are not logits ``(B, K)`` (feature maps; a detector's FPN maps and RPN outputs, several
tensors) a unit Gaussian on every output plays the same part (the change is then the
squared output error). ``delta`` is computed exactly and
locally:

* removing channels of a group: a removed channel reaches the rest of the network
  only through the layers that read it (convolutions, CPDBlocks, linears), so
  ``delta`` at each such consumer's output is its output with those input channels
  zeroed minus its output; the effects of all consumers add before squaring;
* decomposing a convolution: its output with the reconstructed rank-``R`` kernel minus
  its output.

Costs are summed across units by the allocator (the usual first-order assumption of
layer-wise allocation: AIMET, ALDS).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.example_inputs import first_tensor, tensors_in


@dataclass
class Curve:
    """Output change of one unit at each of its levels (``costs[0] == 0``: the unit as it is)."""

    kind: str  # "prune" (levels are kept widths) or "decompose" (levels are option indices)
    name: str
    levels: list[int]
    costs: list[float]


@dataclass
class Capture:
    """One calibration batch: each watched module's input ``x``, output ``y`` and sampled gradients ``g (S, *y.shape)``."""

    x: dict[nn.Module, Tensor]
    y: dict[nn.Module, Tensor]
    g: dict[nn.Module, Tensor]
    images: int


def capture(model: nn.Module, batch: Tensor, modules: Sequence[nn.Module], *, samples: int,
            generator: torch.Generator) -> Capture:
    """Inputs, outputs and ``samples`` sampled-label gradients at ``modules`` for one batch."""
    xs: dict[nn.Module, Tensor] = {}
    ys: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        xs[module], ys[module] = args[0].detach(), output

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        with torch.enable_grad():
            # The input asks for gradients so every watched output does, whatever the parameters ask.
            outputs = model(batch.detach().requires_grad_(True))
            output = first_tensor(outputs)
            logits = output.dim() == 2 and output.shape[1] > 1
            watched = list(ys)
            grads: list[list[Tensor]] = []
            for s in range(samples):
                if logits:  # sample a label from the prediction
                    log_p = F.log_softmax(output, dim=1)
                    label = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).to(output.device)
                    objective = log_p.gather(1, label).sum()
                else:  # any other outputs (feature maps, a detector's FPN): a unit Gaussian around each
                    objective = torch.stack([
                        (t * torch.randn(t.shape, generator=generator).to(t.device, t.dtype)).sum()
                        for t in tensors_in(outputs) if t.is_floating_point()
                    ]).sum()
                grads.append(list(torch.autograd.grad(
                    objective, [ys[m] for m in watched], retain_graph=s < samples - 1, allow_unused=True,
                )))
    finally:
        for handle in handles:
            handle.remove()
    g = {
        m: torch.stack([grads[s][i] if grads[s][i] is not None else torch.zeros_like(ys[m]) for s in range(samples)])
        for i, m in enumerate(watched)
    }
    return Capture(xs, {m: y.detach() for m, y in ys.items()}, g, batch.shape[0])


def predicted_change(deltas: Mapping[nn.Module, Tensor], batch: Capture) -> float:
    """Sum over the batch's images of ``1/2 mean_s (sum_modules g_s . delta)^2``."""
    total: Tensor | None = None
    for module, delta in deltas.items():
        g = batch.g[module]  # (S, B, ...)
        dots = (g * delta.unsqueeze(0)).flatten(2).sum(-1)  # (S, B)
        total = dots if total is None else total + dots
    if total is None:
        return 0.0
    return float(0.5 * total.detach().double().pow(2).mean(0).sum())


@torch.no_grad()
def prune_deltas(
    batch: Capture, consumers: Sequence[tuple[nn.Module, Tensor, Tensor]], removed: Tensor,
) -> dict[nn.Module, Tensor]:
    """Each consumer's output change when the group channels ``removed (C,) bool`` are zeroed at its input.

    ``consumers`` holds ``(module, idxs, root_idxs)``: the module's input channels ``idxs``
    carry group channels ``root_idxs``.
    """
    deltas = {}
    for module, idxs, roots in consumers:
        if module not in batch.x:
            continue  # a consumer the calibration forward did not run
        chosen = idxs[removed[roots]]
        if chosen.numel() == 0:
            continue
        x = batch.x[module].clone()
        x[:, chosen] = 0  # channels (conv, CPDBlock) or features (linear) on dim 1
        deltas[module] = module(x) - batch.y[module]
    return deltas


@torch.no_grad()
def kernel_delta(batch: Capture, conv: nn.Conv2d, kernel: Tensor) -> dict[nn.Module, Tensor]:
    """``conv``'s output change when run with ``kernel`` instead of its own weight."""
    if conv not in batch.x:
        return {}
    return {conv: conv._conv_forward(batch.x[conv], kernel, conv.bias) - batch.y[conv]}


@dataclass
class Unit:
    """Something the allocator can compress: its levels and the output change each causes.

    ``delta(batch, j)`` gives, for level ``levels[j]`` (``j >= 1``), the change at the
    outputs of the modules it affects on one captured batch.
    """

    kind: str
    name: str
    levels: list[int]
    delta: Callable[[Capture, int], dict[nn.Module, Tensor]]
    modules: tuple[nn.Module, ...]  # the modules whose inputs, outputs and gradients it needs


def prune_unit(
    name: str, removal_order: Tensor, consumers: Sequence[tuple[nn.Module, Tensor, Tensor]],
    fractions: Sequence[float],
) -> Unit:
    """A group of ``C`` channels keeping each fraction of them, ``removal_order (C,)`` first removed first."""
    channels = removal_order.numel()
    when = torch.empty(channels, dtype=torch.long)
    when[removal_order] = torch.arange(channels)  # when[c]: the position at which channel c goes
    levels = [channels]
    for fraction in fractions:
        keep = max(1, round(channels * fraction))
        if keep < levels[-1]:
            levels.append(keep)

    def delta(batch: Capture, j: int) -> dict[nn.Module, Tensor]:
        return prune_deltas(batch, consumers, when < channels - levels[j])

    return Unit("prune", name, levels, delta, tuple(module for module, _, _ in consumers))


def decompose_unit(name: str, conv: nn.Conv2d, kernels: Sequence[Tensor | None]) -> Unit:
    """``conv`` run with each option's kernel (``kernels[0] is None``: the dense option)."""

    def delta(batch: Capture, j: int) -> dict[nn.Module, Tensor]:
        kernel = kernels[j]
        assert kernel is not None
        return kernel_delta(batch, conv, kernel)

    return Unit("decompose", name, list(range(len(kernels))), delta, (conv,))


def sensitivity_curves(
    model: nn.Module, inputs: Sequence[Tensor], units: Sequence[Unit], *, samples: int = 4, chunk: int = 32,
    seed: int = 0, progress: bool = False,
) -> list[Curve]:
    """Each unit's predicted output change at each of its levels, averaged over the images of ``inputs``.

    The images are processed ``chunk`` at a time (a capture holds every watched layer's
    input, output and ``samples`` gradients), so memory stays bounded.
    """
    modules = list(dict.fromkeys(m for unit in units for m in unit.modules))
    totals = [[0.0] * len(unit.levels) for unit in units]
    generator = torch.Generator().manual_seed(seed)
    pieces = [piece for batch in inputs for piece in batch.split(chunk)]
    images = 0
    for piece in tqdm(pieces, desc="sensitivity", unit="batch", disable=not progress, leave=False):
        batch = capture(model, piece, modules, samples=samples, generator=generator)
        images += batch.images
        for unit, total in zip(units, totals, strict=True):
            for j in range(1, len(unit.levels)):
                total[j] += predicted_change(unit.delta(batch, j), batch)
        del batch
    curves = []
    for unit, total in zip(units, totals, strict=True):
        costs = [0.0]
        for value in total[1:]:
            costs.append(max(value / max(images, 1), costs[-1]))  # compressing further never costs less
        curves.append(Curve(unit.kind, unit.name, list(unit.levels), costs))
    return curves
