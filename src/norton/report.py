"""Compression reports: the JSON summary, the before/after table and the plot a run leaves behind.

A report is plain data: a list of *stages* (baseline, decomposed, pruned, ...),
each a dict with ``name``, ``top1``, ``top5``, ``macs``, ``params`` and optional
``latency_ms`` (CPU, batch 1), ``latency_ms_batch32`` and ``seconds``, plus per-layer channel counts. Everything here
reads that data and writes files; nothing touches a model. ``summary.json`` is strict
JSON: a non-finite number (a diverged run's NaN loss) is written as ``null``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from norton.io import atomic_write_text, json_text

Stage = Mapping[str, Any]


def format_table(stages: Sequence[Stage]) -> str:
    """A fixed-width before/after table; reductions are relative to the first stage."""
    if not stages:
        return "(no stages)"
    base = stages[0]
    header = (f"{'model':<12} {'top-1 %':>8} {'top-5 %':>8} {'MACs':>10} {'(↓%)':>7} {'params':>9} {'(↓%)':>7} "
              f"{'ms@1':>7} {'ms@32':>7}")
    lines = [header, "-" * len(header)]
    for stage in stages:
        macs, params = stage.get("macs"), stage.get("params")
        lines.append(
            f"{stage['name']:<12} {_num(stage.get('top1'), '.2f'):>8} {_num(stage.get('top5'), '.2f'):>8} "
            f"{_human(macs):>10} {_reduction(macs, base.get('macs')):>7} "
            f"{_human(params):>9} {_reduction(params, base.get('params')):>7} "
            f"{_num(stage.get('latency_ms'), '.2f'):>7} {_num(stage.get('latency_ms_batch32'), '.1f'):>7}"
        )
    return "\n".join(lines)


def write_report(
    output_dir: str | Path,
    stages: Sequence[Stage],
    *,
    channels: Mapping[str, Mapping[str, int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.txt`` and ``report.png`` into ``output_dir``.

    ``channels`` maps a stage name to ``{layer_name: out_channels}``; the plot
    shows the first and the last stage's counts per layer.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"stages": list(map(dict, stages)), "channels": dict(channels or {}), **dict(extra or {})}
    paths = {
        "json": atomic_write_text(to_json(summary) + "\n", output_dir / "summary.json"),
        "table": atomic_write_text(format_table(stages) + "\n", output_dir / "summary.txt"),
    }
    paths["plot"] = plot_report(stages, channels or {}, output_dir / "report.png")
    return paths


def plot_report(stages: Sequence[Stage], channels: Mapping[str, Mapping[str, int]], path: str | Path) -> Path:
    """Accuracy vs MACs for every stage and, when known, channels kept per layer."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    path = Path(path)
    has_channels = len(channels) >= 1
    fig, axes = plt.subplots(1, 2 if has_channels else 1, figsize=(13 if has_channels else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    points = [(s["macs"] / 1e6, s["top1"], s["name"]) for s in stages
              if s.get("macs") and s.get("top1") is not None and math.isfinite(s["top1"])]
    if points:
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, "-o", color="tab:blue")
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy vs MACs")
    ax.grid(alpha=0.3)
    if has_channels:
        ax = axes[0][1]
        names = list(channels)
        first, last = channels[names[0]], channels[names[-1]]
        layers = list(first)
        positions = range(len(layers))
        ax.bar(positions, [first[n] for n in layers], color="lightgray", label=names[0])
        ax.bar(positions, [last.get(n, 0) for n in layers], color="tab:orange", label=names[-1])
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel("output channels")
        ax.set_title("channels kept per layer")
        ax.legend()
        step = max(1, math.ceil(len(layers) / 20))
        ax.set_xticks(list(positions)[::step])
        ax.set_xticklabels([str(i) for i in list(positions)[::step]])
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _human(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _reduction(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{100 * (1 - value / base):.1f}"


def to_json(data: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """Strict, indented JSON of plain ``data`` (:func:`norton.io.json_text`)."""
    return json_text(data, indent=2, default=default)
