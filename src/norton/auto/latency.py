"""Latency budgets: predicted latency of any auto_compress choice, from a per-device table of layer timings.

Timing every candidate model of the allocation would take hours, and the MACs of a
choice say little about its speed (a GPU in eager mode is bound by activation traffic
and kernel launches, a CPU kernel computes channels in blocks of 8 or 16). So each conv /
linear layer is timed *alone*, once per device, on a coarse grid of kept widths, and the
allocation interpolates:

- a **layer configuration** is what a layer's time depends on besides its widths: kind
  (``conv``, ``depthwise``, ``linear``, ``cp`` at a rank), kernel, stride, padding,
  dilation, input height and width, batch size and memory format;
- its **grid** is the kept widths ``1/8, 1/4, 1/2, 3/4, 1`` of the layer's own input and
  output widths, rounded up to multiples of 8; a point is one (configuration, in, out)
  timing, in milliseconds, of the layer as :func:`norton.optimize_for_inference` runs it
  (BatchNorm folded into a bias; a CPDBlock in its fastest form, never slower than the
  dense conv since that form is always a candidate);
- a layer's latency at any widths is the **bilinear interpolation** of its grid, made
  non-decreasing in both widths first (a timing hit by load cannot make narrower layers look cheap);
  a model's is ``scale * sum(layers)``, where ``scale`` (measured model / summed layers
  of the input model) carries what the table does not time (activations, additions,
  pooling, launch overhead) in proportion.

The points live in a JSON file per device, torch version and dtype
(``~/.cache/norton/latency/<device>_<torch>_<dtype>.json``; the folder is
``$NORTON_LATENCY_CACHE`` or the ``cache`` argument), so a second model on the same
machine times only the configurations it adds, and the same model times nothing.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from norton.auto.costs import ChoiceMacs
from norton.deploy.timing import compare_callables, cpu_model
from norton.io import write_json

CACHE_ENV = "NORTON_LATENCY_CACHE"
GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
GRID_MULTIPLE = 8
LATENCY_TOLERANCE = 0.10  # the measured latency of auto_compress's result is within this of the target
POINT_REPEATS = 7


# ------------------------------------------------------------------ the cache file
def device_name(device: torch.device | str) -> str:
    """What a layer's time depends on about the device: the GPU's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model() or 'cpu'} {torch.get_num_threads()} threads"


def cache_path(device: torch.device | str, dtype: torch.dtype, cache: str | os.PathLike | None = None) -> Path:
    """The table file of ``device`` and ``dtype`` under ``cache`` (default ``$NORTON_LATENCY_CACHE``,
    else ``~/.cache/norton/latency``)."""
    folder = Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "norton" / "latency")
    parts = (device_name(device), torch.__version__, str(dtype).removeprefix("torch."))
    return folder.expanduser() / ("_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", p).strip("-") for p in parts) + ".json")


def latency_memory_format(device: torch.device | str) -> str:
    """The memory format latency is measured in: channels-last on CUDA (cuDNN's fast layout), NCHW elsewhere.

    Fixed rather than chosen by timing (``optimize_for_inference(memory_format="auto")``): a choice that
    flips with the machine's load would key the table differently from one call to the next.
    """
    return "channels_last" if torch.device(device).type == "cuda" else "contiguous"


# ------------------------------------------------------------------ layer configurations
@dataclass(frozen=True)
class LayerConfig:
    """What a layer's time depends on besides its widths (see the module docstring)."""

    kind: str  # "conv" (groups == 1), "depthwise" (its width is its out), "linear", "cp" (a rank-``rank`` CPDBlock)
    input_shape: tuple[int, ...]  # (B, C, H, W) or (B, ..., K) as the layer saw it; C / K is replaced by the width
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    rank: int = 0
    memory_format: str = "contiguous"

    def key(self, width_in: int, width_out: int) -> str:
        shape = "x".join(str(s) for s in self.input_shape[:1] + self.input_shape[2:])
        geometry = "|".join("x".join(map(str, p)) for p in (self.kernel, self.stride, self.padding, self.dilation))
        return f"{self.kind}{self.rank or ''}|{geometry}|{shape}|{self.memory_format}|{width_in}x{width_out}"

    def module(self, width_in: int, width_out: int) -> nn.Module:
        """A random layer of this configuration, as optimize_for_inference would run it (with a bias)."""
        if self.kind == "linear":
            return nn.Linear(width_in, width_out)
        if self.kind == "cp":
            from norton.decomposition.cpd_block import CPDBlock

            return CPDBlock(width_in, width_out, self.rank, self.kernel, self.stride, self.padding, self.dilation)
        groups, width_in = (width_out, width_out) if self.kind == "depthwise" else (1, width_in)
        return nn.Conv2d(width_in, width_out, self.kernel, self.stride, self.padding, self.dilation, groups)

    def input(self, width_in: int, width_out: int) -> Tensor:
        channels = width_out if self.kind == "depthwise" else width_in
        if self.kind == "linear":
            return torch.randn(*self.input_shape[:-1], channels)
        return torch.randn(self.input_shape[0], channels, *self.input_shape[2:])


def layer_config(module: nn.Module, input_shape: Sequence[int], memory_format: str) -> LayerConfig | None:
    """The configuration of a conv / linear leaf; ``None`` for a layer the table does not time (grouped conv)."""
    shape = tuple(int(s) for s in input_shape)
    if isinstance(module, nn.Linear):
        return LayerConfig("linear", shape)
    if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    if module.groups == 1:
        kind = "conv"
    elif module.groups == module.in_channels == module.out_channels:
        kind = "depthwise"
    else:
        return None
    pair = lambda v: (int(v[0]), int(v[1]))  # noqa: E731 - four conversions of the same tuple
    return LayerConfig(kind, shape, pair(module.kernel_size), pair(module.stride), pair(module.padding),
                       pair(module.dilation), memory_format=memory_format)


def width_grid(full: int, multiple: int = GRID_MULTIPLE) -> list[int]:
    """The timed widths of a layer of ``full`` channels: fractions of it rounded up to ``multiple``, and ``full``."""
    widths = {min(full, multiple * -(-max(1, round(full * f)) // multiple)) for f in GRID_FRACTIONS}
    return sorted(widths | {full})


# ------------------------------------------------------------------ the table
def _runner(module: nn.Module, x: Tensor) -> Callable[[], Any]:
    return lambda: module(x)


def _time_candidates(candidates: Mapping[str, Callable[[], Any]], device: torch.device) -> dict[str, float]:
    """Fastest milliseconds of each callable, timed interleaved (the one place the table times anything).

    The minimum, not the median: a layer runs for a fraction of a millisecond, and on a loaded
    machine a descheduled thread adds whole time slices to most of its runs (points 100x their
    neighbours were seen with medians on this project's shared 2-core VM); load only ever adds time.
    """
    stats = compare_callables(candidates, warmup=2, repeats=POINT_REPEATS, max_time_s=0.5, device=device)
    return {name: s.min_ms for name, s in stats.items()}


class LatencyTable:
    """Layer timings (milliseconds) of one device and dtype, read from and written to ``path``.

    ``timed`` counts the points this instance measured (0 when every point was in the file).
    """

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.entries: dict[str, float] = self._read()
        self.timed = 0

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): float(v) for k, v in data["entries"].items() if isinstance(v, (int, float))}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # no table yet, or an unreadable one: it is measured again

    def latencies(self, points: Sequence[tuple[LayerConfig, int, int]]) -> list[float]:
        """Milliseconds of each ``(config, width_in, width_out)``; missing points are timed, then saved."""
        missing = list(dict.fromkeys((c, i, o) for c, i, o in points if c.key(i, o) not in self.entries))
        for config, width_in, width_out in missing:
            self.entries[config.key(width_in, width_out)] = self._measure(config, width_in, width_out)
            self.timed += 1
        if missing:
            self._save()
        return [self.entries[c.key(i, o)] for c, i, o in points]

    @torch.inference_mode()
    def _measure(self, config: LayerConfig, width_in: int, width_out: int) -> float:
        from norton.deploy._helpers import memory_format, to_memory_format

        layer = config.module(width_in, width_out).eval()
        x = config.input(width_in, width_out).to(self.device, self.dtype)
        if x.dim() == 4:
            x = x.to(memory_format=memory_format(config.memory_format))
        forms: dict[str, nn.Module] = {"layer": layer}
        if config.kind == "cp":  # the fastest non-dense form (the dense one is the conv's own entry)
            from norton.deploy.forms import GPU_FORMS, INFERENCE_FORMS, build_form
            from norton.deploy.fused_cpd import fused_available

            names = [f for f in INFERENCE_FORMS if f != "dense"]
            names += [f for f in GPU_FORMS if fused_available(self.device)]
            forms = {f: build_form(layer, f) for f in names}
        runners = {}
        for name, form in forms.items():
            module = to_memory_format(form.to(self.device, self.dtype).eval(), config.memory_format)
            runners[name] = _runner(module, x)
        return min(_time_candidates(runners, self.device).values())

    def _save(self) -> None:
        on_disk = self._read()  # another process may have added points meanwhile: keep them
        write_json({
            "device": device_name(self.device), "torch": torch.__version__,
            "dtype": str(self.dtype).removeprefix("torch."), "entries": {**on_disk, **self.entries},
        }, self.path)


# ------------------------------------------------------------------ the allocation's cost
def _bilinear(axis_in: Tensor, axis_out: Tensor, grid: Tensor, x_in: Tensor, x_out: Tensor) -> Tensor:
    """Interpolate per-layer grids: axes ``(L, P)`` rising, ``grid (M or 1, L, P, P)``, widths ``(M, L)`` -> ``(M, L)``.

    Widths beyond an axis are clamped to it (padded axis entries repeat the edge values).
    """
    def locate(axis: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:  # lower grid index and weight, each (M, L)
        x = x.clamp(axis[:, 0], axis[:, -1])
        hi = torch.searchsorted(axis, x.T.contiguous()).T.clamp(1, axis.shape[1] - 1)
        lo = hi - 1
        a_lo, a_hi = axis.gather(1, lo.T).T, axis.gather(1, hi.T).T
        return lo, ((x - a_lo) / (a_hi - a_lo).clamp_min(1e-12)).clamp(0, 1)

    i_lo, t_in = locate(axis_in, x_in)
    o_lo, t_out = locate(axis_out, x_out)
    grid = grid.expand(x_in.shape[0], -1, -1, -1)
    m = torch.arange(x_in.shape[0])[:, None]
    layer = torch.arange(x_in.shape[1])[None, :]
    i_hi, o_hi = i_lo + 1, o_lo + 1
    v00, v01 = grid[m, layer, i_lo, o_lo], grid[m, layer, i_lo, o_hi]
    v10, v11 = grid[m, layer, i_hi, o_lo], grid[m, layer, i_hi, o_hi]
    return (1 - t_in) * ((1 - t_out) * v00 + t_out * v01) + t_in * ((1 - t_out) * v10 + t_out * v11)


def _padded_axis(widths: Sequence[int], size: int) -> list[float]:
    """``widths`` extended to ``size`` strictly rising entries (past the last real one, values are clamped)."""
    return [float(w) for w in widths] + [float(widths[-1]) + 1 + k for k in range(size - len(widths))]


class ChoiceLatency:
    """Predicted milliseconds of ``(kept widths per group, option per decomposable layer)``, like
    :class:`~norton.auto.costs.ChoiceMacs` (the same call), batched over candidates.

    Args:
        macs: the MAC model of the choices (its widths give every leaf's kept in / out widths).
        modules: the traced model's modules by name; ``input_shapes``: each leaf's input shape.
        table: where the layer timings come from (missing points are timed here, once).
        round_to: widths the grid is rounded to (8).
    """

    def __init__(
        self, macs: ChoiceMacs, modules: Mapping[str, nn.Module], input_shapes: Mapping[str, Sequence[int]],
        table: LatencyTable, memory_format: str, round_to: int = GRID_MULTIPLE,
    ) -> None:
        self.macs = macs
        widths = macs.widths
        names = widths.leaf_names
        configs = [layer_config(modules[n], input_shapes[n], memory_format) for n in names]
        full_in = [int(v) for v in widths.in0.tolist()]
        full_out = [int(v) for v in widths.out0.tolist()]
        axes_in = [[1] if c is not None and c.kind == "depthwise" else width_grid(w, round_to)
                   for c, w in zip(configs, full_in, strict=True)]
        axes_out = [width_grid(w, round_to) for w in full_out]
        size = max(2, *(len(a) for a in axes_in + axes_out))
        self.axis_in = torch.tensor([_padded_axis(a, size) for a in axes_in], dtype=torch.float64)  # (L, P)
        self.axis_out = torch.tensor([_padded_axis(a, size) for a in axes_out], dtype=torch.float64)  # (L, P)

        def grid(config: LayerConfig, leaf: int) -> Tensor:  # (P, P), edge values repeated into the padding
            a_in, a_out = axes_in[leaf], axes_out[leaf]
            points = [(config, i, o) for i in a_in for o in a_out]
            values = torch.tensor(table.latencies(points), dtype=torch.float64).view(len(a_in), len(a_out))
            # A wider layer is never faster: each point is at most every wider one (an outlier timing stays
            # in the file but cannot make its neighbours look cheap).
            values = values.flip(0).cummin(0).values.flip(0).flip(1).cummin(1).values.flip(1)
            values = torch.cat([values, values[:, -1:].expand(-1, size - len(a_out))], 1)
            return torch.cat([values, values[-1:].expand(size - len(a_in), -1)], 0)

        self.base = torch.zeros(len(names), size, size, dtype=torch.float64)  # (L, P, P)
        timed = [i for i, c in enumerate(configs) if c is not None]
        for i in timed:
            config = configs[i]
            assert config is not None
            self.base[i] = grid(config, i)
        # A layer the table cannot time (a grouped conv) costs its MACs at the timed layers' mean rate.
        full_macs = widths.weight * widths.out0 * widths.in0  # (L,)
        timed_macs = float(full_macs[timed].sum()) if timed else 0.0
        rate = float(self.base[timed, -1, -1].sum()) / timed_macs if timed_macs else 0.0
        for i, config in enumerate(configs):
            if config is None:
                self.base[i] = rate * widths.weight[i] * self.axis_in[i][:, None] * self.axis_out[i][None, :]
        # Decomposable layers: option 0 is the dense layer; a rank-R option is its fastest CP form or the dense conv.
        most = macs.table.shape[1]
        self.options = self.base[macs.layer_index].unsqueeze(1).repeat(1, most, 1, 1)  # (D, O, P, P)
        for d, name in enumerate(macs.layers):
            leaf = int(macs.layer_index[d])
            config = configs[leaf]
            for j, option in enumerate(macs.options[name][1:], start=1):
                if config is not None and config.kind == "conv" and option.rank is not None:
                    cp = LayerConfig("cp", config.input_shape, config.kernel, config.stride, config.padding,
                                     config.dilation, option.rank, memory_format)
                    self.options[d, j] = torch.minimum(grid(cp, leaf), self.base[leaf])
        self.scale = 1.0

    def layers(self, keep: Tensor, choice: Tensor) -> Tensor:
        """Unscaled per-leaf milliseconds ``(M, L)`` for ``keep (M, G)`` and ``choice (M, D)``."""
        m = self.macs.widths
        removed = m.channels - keep.to(torch.float64)  # (M, G)
        out = m.out0 + removed @ m.d_out  # (M, L)
        inner = m.in0 + removed @ m.d_in  # (M, L)
        result = _bilinear(self.axis_in, self.axis_out, self.base[None], inner, out)
        if self.macs.layers:
            index = self.macs.layer_index
            picked = self.options[torch.arange(len(index)), choice.long()]  # (M, D, P, P)
            result[:, index] = _bilinear(self.axis_in[index], self.axis_out[index], picked,
                                         inner[:, index], out[:, index])
        return result

    def __call__(self, keep: Tensor, choice: Tensor) -> Tensor:
        """Predicted milliseconds ``(M,)`` of the whole model (``scale`` times the summed layers)."""
        return self.scale * self.layers(keep, choice).sum(-1)


# ------------------------------------------------------------------ whole models
def optimized_memory_format(model: nn.Module) -> str:
    """The memory format :func:`norton.optimize_for_inference` chose for ``model`` (``"contiguous"`` if none)."""
    plan: list[dict[str, Any]] = list(getattr(model, "norton_plan", []))
    record: dict[str, Any] = next((r for r in reversed(plan) if r.get("op") == "optimize"), {})
    return str(record.get("memory_format", "contiguous"))


@torch.inference_mode()
def measure_models(
    models: Mapping[str, nn.Module], example_inputs: Tensor, *, warmup: int = 3, repeats: int = 15,
    max_time_s: float = 20.0,
) -> dict[str, float]:
    """Median milliseconds of each (optimized) model on ``example_inputs``, timed interleaved."""
    from norton.deploy._helpers import memory_format

    runners: dict[str, Callable[[], Any]] = {}
    for name, model in models.items():
        param = next(model.parameters())
        x = example_inputs.to(param.device)
        x = x.to(param.dtype) if x.is_floating_point() else x
        if x.dim() == 4:
            x = x.to(memory_format=memory_format(optimized_memory_format(model)))
        runners[name] = _runner(model, x)
    stats = compare_callables(runners, warmup=warmup, repeats=repeats, max_time_s=max_time_s,
                              device=example_inputs.device)
    return {name: s.median_ms for name, s in stats.items()}
