"""Results of ``bench_pareto.py``: the JSONL file, its keys, and the markdown tables and plots made from it.

One strict-JSON object per ``(model, method, budget, seed, epochs, distill)`` (:data:`KEY_FIELDS`) in
``results.jsonl``; a run skips the keys already there, so a killed run resumes and the grid is
filled piece by piece. The baseline is one record too (method ``"baseline"``, budget 1).
"""
from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from _common import read_results  # noqa: F401  (the results file's reader, shared with bench_methods)
from norton.io import append_jsonl, atomic_write_text

KEY_FIELDS = ("model", "method", "budget", "seed", "epochs", "distill")
# What a table row shows: (column title, record field, format of the mean and std).
COLUMNS = (
    ("top-1 after compression (%)", "top1_compressed", ".2f"),
    ("top-1 after fine-tuning (%)", "top1_finetuned", ".2f"),
    ("MACs (fraction)", "macs_fraction", ".3f"),
    ("params", "params", "human"),
    ("latency b=1 (ms)", "latency_ms_b1", ".2f"),
    ("latency b=64 (ms)", "latency_ms_b64", ".1f"),
    ("speed-up b=64 (x)", "speedup_b64", ".2f"),
    ("compression (s)", "compress_seconds", ".1f"),
)


def record_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The identity of one result (budgets compared at 1e-6, so 0.3 and 0.30000000001 are one key)."""
    return (record["model"], record["method"], round(float(record["budget"]), 6), int(record["seed"]),
            int(record["epochs"]), bool(record.get("distill", False)))


def done_keys(records: Iterable[Mapping[str, Any]]) -> set[tuple[Any, ...]]:
    return {record_key(record) for record in records}


def append_result(record: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(record, path)


# ------------------------------------------------------------------ aggregation
def _human(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def mean_std(values: Sequence[float | None], fmt: str) -> str:
    """``"m ± s"`` (sample standard deviation) of ``values``; ``"m"`` alone for one value; ``"—"`` for none."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return "—"
    show = _human if fmt == "human" else (lambda v: format(v, fmt))
    mean = statistics.fmean(known)
    if len(known) == 1:
        return show(mean)
    return f"{show(mean)} ± {show(statistics.stdev(known))}"


def grouped(records: Iterable[Mapping[str, Any]], model: str) -> dict[tuple[float, str, int, bool], list[Mapping[str, Any]]]:
    """``{(budget, method, epochs, distill): records over seeds}`` of ``model`` (the baseline left out)."""
    groups: dict[tuple[float, str, int, bool], list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        if record["model"] == model and record["method"] != "baseline":
            key = record_key(record)
            groups[(key[2], key[1], key[4], key[5])].append(record)
    return dict(groups)


def _method_label(method: str, distill: bool) -> str:
    return f"{method} + distillation" if distill else method


def render_tables(records: Sequence[Mapping[str, Any]], model: str) -> str:
    """One markdown table per budget (largest first): mean ± std over seeds, ``n`` seeds shown."""
    groups = grouped(records, model)
    out = []
    for budget in sorted({key[0] for key in groups}, reverse=True):
        header = ["method", "fine-tuning epochs", "n"] + [title for title, _, _ in COLUMNS]
        lines = [f"**{budget:g} of the baseline's MACs**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        rows = [(key, group) for key, group in groups.items() if key[0] == budget]

        def order(item: tuple[tuple[float, str, int, bool], list[Mapping[str, Any]]]) -> tuple[int, float]:
            finetuned = [r["top1_finetuned"] for r in item[1] if r.get("top1_finetuned") is not None]
            return (item[0][2], -(statistics.fmean(finetuned) if finetuned else -1.0))

        for (_, method, epochs, distill), group in sorted(rows, key=order):
            cells = [mean_std([r.get(field) for r in group], fmt) for _, field, fmt in COLUMNS]
            lines.append("| " + " | ".join([_method_label(method, distill), str(epochs), str(len(group)), *cells]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def baseline_line(records: Sequence[Mapping[str, Any]], model: str) -> str | None:
    base = [r for r in records if r["model"] == model and r["method"] == "baseline"]
    if not base:
        return None
    b = base[-1]
    return (f"Baseline `{model}`: top-1 {b['top1_finetuned']:.2f}% after {b['epochs']} epochs "
            f"({b['details']['train_seconds'] / 60:.1f} min of training), {_human(b['macs'])} MACs, "
            f"{_human(b['params'])} params, latency {b['latency_ms_b1']:.2f} ms at batch 1 and "
            f"{b['latency_ms_b64']:.1f} ms at batch 64.")


def environments(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct machines the records were measured on, one line each."""
    seen = []
    for record in records:
        env = record.get("env") or {}
        line = (f"torch {env.get('torch')}, {env.get('threads')} threads, {env.get('cpu')}, "
                f"device {env.get('device')}")
        if line not in seen:
            seen.append(line)
    return seen


# ------------------------------------------------------------------ plots
def plot(records: Sequence[Mapping[str, Any]], model: str, folder: Path, prefix: str = "pareto") -> list[Path]:
    """Top-1 after fine-tuning against the MACs fraction and against batch-64 latency, one line per method."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    groups = grouped(records, model)
    base = [r for r in records if r["model"] == model and r["method"] == "baseline"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for x_field, x_label, name in (("macs_fraction", "MACs (fraction of the baseline's)", "macs"),
                                   ("latency_ms_b64", "CPU latency at batch 64 (ms)", "latency")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
        lines: dict[tuple[str, int, bool], list[tuple[float, float, float]]] = defaultdict(list)
        for (_, method, epochs, distill), group in groups.items():
            xs = [r[x_field] for r in group if r.get(x_field) is not None]
            ys = [r["top1_finetuned"] for r in group if r.get("top1_finetuned") is not None]
            if xs and ys:
                spread = statistics.stdev(ys) if len(ys) > 1 else 0.0
                lines[(method, epochs, distill)].append((statistics.fmean(xs), statistics.fmean(ys), spread))
        for (method, epochs, distill), points in sorted(lines.items()):
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", linestyle="-" if epochs == 1 else "--", capsize=3,
                        label=f"{_method_label(method, distill)}, {epochs} ep")
        if base:
            ax.plot([base[-1][x_field]], [base[-1]["top1_finetuned"]], marker="*", markersize=12, color="black",
                    linestyle="none", label="baseline")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test top-1 after fine-tuning (%)")
        ax.set_title(f"{model} on Fashion-MNIST")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{prefix}_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ the document
def markers(name: str) -> tuple[str, str]:
    """The comments around the generated section ``name`` (one per model) of the document."""
    return f"<!-- bench_pareto:{name}:begin -->", f"<!-- bench_pareto:{name}:end -->"


def replace_between_markers(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` (between its :func:`markers`) replaced by ``body``; appended if absent."""
    begin, end = markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, count=1, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def write_document(path: Path, name: str, body: str) -> None:
    text = path.read_text() if path.is_file() else ""
    atomic_write_text(replace_between_markers(text, name, body), path)


def commands(records: Iterable[Mapping[str, Any]], model: str) -> list[str]:
    """The distinct command lines that produced ``model``'s records, in first-use order."""
    seen: list[str] = []
    for record in records:
        command = record.get("command")
        if record["model"] == model and command and command not in seen:
            seen.append(command)
    return seen
