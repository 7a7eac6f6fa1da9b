"""Results of ``bench_pareto.py``: the JSONL file, its keys, and the markdown tables and plots made from it.

One strict-JSON object per ``(model, method, budget, seed, epochs, distill)`` (:data:`KEY_FIELDS`) in
``results.jsonl``; a run skips the keys already there, so a killed run resumes and the grid is
filled piece by piece. The baseline is one record too (method ``"baseline"``, budget 1).
"""
from __future__ import annotations

import itertools
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
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


# Methods whose budget is a fraction of the baseline's batch-64 latency, not of its MACs (the
# report keeps this list itself, so that --report-only reads a results file without the methods).
LATENCY_METHODS = frozenset({"auto-latency"})
# Methods run at one budget whatever --budgets says: "dense" (the baseline fine-tuned by the same
# recipe, the control for what fine-tuning alone does) at 1.
FIXED_BUDGETS = {"dense": 1.0}
NORTON_METHODS = ("auto", "auto-latency")  # compared with Torch-Pruning at the same latency
PEER_PREFIX = "tp-"


def render_tables(records: Sequence[Mapping[str, Any]], model: str) -> str:
    """One markdown table per budget (largest first; MACs budgets, then latency budgets): mean ± std
    over seeds, ``n`` seeds shown."""
    groups = grouped(records, model)
    out = []
    budgets = sorted({(key[1] in LATENCY_METHODS, key[0]) for key in groups}, key=lambda b: (b[0], -b[1]))
    for by_latency, budget in budgets:
        header = ["method", "fine-tuning epochs", "n"] + [title for title, _, _ in COLUMNS]
        what = "batch-64 latency" if by_latency else "MACs"
        lines = [f"**{budget:g} of the baseline's {what}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        rows = [(key, group) for key, group in groups.items()
                if key[0] == budget and (key[1] in LATENCY_METHODS) == by_latency]

        def order(item: tuple[tuple[float, str, int, bool], list[Mapping[str, Any]]]) -> tuple[int, float]:
            finetuned = [r["top1_finetuned"] for r in item[1] if r.get("top1_finetuned") is not None]
            return (item[0][2], -(statistics.fmean(finetuned) if finetuned else -1.0))

        for (_, method, epochs, distill), group in sorted(rows, key=order):
            cells = [mean_std([r.get(field) for r in group], fmt) for _, field, fmt in COLUMNS]
            lines.append("| " + " | ".join([_method_label(method, distill), str(epochs), str(len(group)), *cells]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _mean_point(group: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """``(mean batch-64 speed-up, mean top-1 after fine-tuning)`` of one group, if both were measured."""
    speed = [r["speedup_b64"] for r in group if r.get("speedup_b64") is not None]
    top1 = [r["top1_finetuned"] for r in group if r.get("top1_finetuned") is not None]
    return (statistics.fmean(speed), statistics.fmean(top1)) if speed and top1 else None


def frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left envelope of ``(speed-up, top-1)`` points: for each point kept, no other point is
    at least as fast and more accurate; sorted by speed-up."""
    kept: list[tuple[float, float]] = []
    for speed, top1 in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first
        if not kept or top1 > kept[-1][1]:
            kept.append((speed, top1))
    return kept[::-1]


def at_speedup(envelope: Sequence[tuple[float, float]], speed: float) -> float | None:
    """The frontier's top-1 at ``speed``, linear between its points; ``None`` outside its span."""
    for (s0, a0), (s1, a1) in itertools.pairwise(envelope):
        if s0 <= speed <= s1:
            return a0 + (a1 - a0) * (speed - s0) / (s1 - s0) if s1 > s0 else max(a0, a1)
    if len(envelope) == 1 and abs(envelope[0][0] - speed) < 1e-9:
        return envelope[0][1]
    return None


def render_same_latency(records: Sequence[Mapping[str, Any]], model: str) -> str:
    """norton's points against Torch-Pruning's at the same batch-64 CPU latency (issue 12's test).

    Torch-Pruning's frontier is drawn through every ``tp-*`` setting and budget at the same
    fine-tuning epochs (mean over seeds); a norton point is compared with the frontier's top-1
    at its own speed-up (linear between the two frontier points around it), and with the most
    accurate Torch-Pruning model that is at least as fast (with its number of seeds, ``n``: a
    single seed of a dropped setting may sit beside a 3-seed mean).
    """
    groups = grouped(records, model)
    rows = []
    for (budget, method, epochs, distill), group in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0])):
        point = _mean_point(group)
        if method not in NORTON_METHODS or distill or point is None:
            continue
        peers = [(key, p, len(g)) for key, g in groups.items() if key[1].startswith(PEER_PREFIX) and key[2] == epochs
                 and not key[3] and (p := _mean_point(g)) is not None]
        if not peers:
            continue
        envelope = frontier(p for _, p, _ in peers)
        same = at_speedup(envelope, point[0])
        faster = [peer for peer in peers if peer[1][0] >= point[0]]
        best = max(faster, key=lambda kpn: kpn[1][1]) if faster else None
        what = "latency" if method in LATENCY_METHODS else "MACs"
        rows.append("| " + " | ".join([
            f"{method} at {budget:g} of the {what}", str(epochs), str(len(group)), f"{point[0]:.2f}", f"{point[1]:.2f}",
            "—" if same is None else f"{same:.2f}", "—" if same is None else f"{point[1] - same:+.2f}",
            "none" if best is None else f"{best[0][1]} at {best[0][0]:g} of the MACs: {best[1][1]:.2f} "
            f"({best[1][0]:.2f}x, n={best[2]})",
            "—" if best is None else f"{point[1] - best[1][1]:+.2f}",
        ]) + " |")
    if not rows:
        return ""
    header = ["norton model", "fine-tuning epochs", "n", "speed-up b=64 (x)", "top-1 (%)",
              "Torch-Pruning frontier at that speed-up (%)", "lead", "best Torch-Pruning model at least as fast",
              "lead over it"]
    return "\n".join([
        "**At the same CPU latency (batch 64)**: each norton model against Torch-Pruning's frontier (every "
        "`tp-*` setting and budget, mean over seeds) at the model's own speed-up over the baseline, and against "
        "the most accurate Torch-Pruning model at least as fast (— : no Torch-Pruning model spans that speed-up).",
        "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|", *rows])


# Issue 11's goals: auto's lead over the best Torch-Pruning setting (points of top-1 after fine-tuning).
GOALS = {0.5: 0.3, 0.3: 0.3, 0.2: 1.5, 0.1: 3.0}


def _mean_of(group: Sequence[Mapping[str, Any]], field: str) -> float | None:
    values = [float(r[field]) for r in group if r.get(field) is not None]
    return statistics.fmean(values) if values else None


def best_peer(groups: Mapping[tuple[float, str, int, bool], Sequence[Mapping[str, Any]]], budget: float, epochs: int,
              distill: bool) -> tuple[str, Sequence[Mapping[str, Any]], float] | None:
    """The best ``tp-*`` setting at ``budget`` under the same recipe, of :func:`grouped`'s ``groups``:
    ``(method, its records, mean top-1 after fine-tuning)``, or ``None`` when none ran.

    Best means the highest mean among the settings with the most seeds: a single lucky seed of a
    setting the protocol dropped does not outrank the finalist that ran all its seeds."""
    budget = round(budget, 6)  # as record_key rounds
    peers = [(key[1], group, mean) for key, group in groups.items() if key[1].startswith(PEER_PREFIX)
             and key[0] == budget and key[2:] == (epochs, distill) and (mean := _mean_of(group, "top1_finetuned")) is not None]
    return max(peers, key=lambda p: (len(p[1]), p[2])) if peers else None


def render_goals(records: Sequence[Mapping[str, Any]], model: str) -> str:
    """``auto`` against the best ``tp-*`` setting at each MACs budget of :data:`GOALS`, one row per
    (budget, fine-tuning epochs, distillation) where both were run; the best setting is
    :func:`best_peer`'s (most seeds, then highest mean). Beside them, the ``dense`` control
    under that recipe where it ran: no lead can be larger than its margin over the peer unless a
    compressed model beats the uncompressed one."""
    groups = grouped(records, model)
    rows = []
    for (budget, method, epochs, distill), group in sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][2], -kv[0][0])):
        goal = GOALS.get(budget)  # budgets in keys are rounded to 6 digits, as GOALS' literals are
        ours = _mean_of(group, "top1_finetuned")
        if method != "auto" or goal is None or ours is None:
            continue
        found = best_peer(groups, budget, epochs, distill)
        if found is None:
            continue
        name, peer, best = found
        lead = round(ours - best, 2)  # judged as shown, so +0.30 against a goal of +0.3 is met
        verdict = "met" if lead >= goal else f"missed by {goal - lead:.2f}"
        dense = groups.get((FIXED_BUDGETS["dense"], "dense", epochs, distill))
        rows.append("| " + " | ".join([
            f"{budget:g}", str(epochs), "yes" if distill else "no",
            f"{mean_std([r.get('top1_finetuned') for r in group], '.2f')} (n={len(group)})",
            f"{mean_std([r.get('top1_finetuned') for r in peer], '.2f')} (`{name}`, n={len(peer)})",
            f"{lead:+.2f}", f"+{goal:g}: {verdict}", mean_std([r.get("top1_compressed") for r in group], ".2f"),
            f"{mean_std([r.get('top1_finetuned') for r in dense], '.2f')} (n={len(dense)})" if dense else "—",
        ]) + " |")
    if not rows:
        return ""
    header = ["MACs kept", "fine-tuning epochs", "distillation", "auto (%)", "best Torch-Pruning setting (%)", "lead",
              "goal", "auto right after compression (%)", "uncompressed, same fine-tuning (%)"]
    return "\n".join([
        "**Issue 11's goals**: `auto` against the best Torch-Pruning setting under the same recipe (mean ± std "
        "over seeds, top-1 after fine-tuning).",
        "", "| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * 3 + ["---"] * 2 + ["---:", "---", "---:", "---"]) + "|",
        *rows])


def baseline_line(records: Sequence[Mapping[str, Any]], model: str) -> str | None:
    base = [r for r in records if r["model"] == model and r["method"] == "baseline"]
    if not base:
        return None
    b = base[-1]
    marks = list(dict.fromkeys(r["details"].get("fingerprint") or "not recorded" for r in base))
    line = (f"Baseline `{model}`: top-1 {b['top1_finetuned']:.2f}% after {b['epochs']} epochs "
            f"({b['details']['train_seconds'] / 60:.1f} min of training), {_human(b['macs'])} MACs, "
            f"{_human(b['params'])} params, latency {b['latency_ms_b1']:.2f} ms at batch 1 and "
            f"{b['latency_ms_b64']:.1f} ms at batch 64 (fingerprint {marks[-1]}).")
    if len(marks) > 1:  # a fresh clone retrained it and got other weights
        line += (f" The rows come from {len(marks)} trainings of this baseline (fingerprints {', '.join(marks)}; "
                 "each row records its own); this line describes the last.")
    return line


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
def plot(records: Sequence[Mapping[str, Any]], model: str, folder: Path, prefix: str = "pareto",
         leave_out: Collection[str] = ()) -> list[Path]:
    """Top-1 after fine-tuning against the MACs fraction and against batch-64 latency, one line per method
    (but the methods in ``leave_out``)."""
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
            if method in leave_out:
                continue
            xs = [r[x_field] for r in group if r.get(x_field) is not None]
            ys = [r["top1_finetuned"] for r in group if r.get("top1_finetuned") is not None]
            if xs and ys:
                spread = statistics.stdev(ys) if len(ys) > 1 else 0.0
                lines[(method, epochs, distill)].append((statistics.fmean(xs), statistics.fmean(ys), spread))
        colors = plt.get_cmap("tab20").colors  # more lines than the default cycle's 10 colours
        for index, ((method, epochs, distill), points) in enumerate(sorted(lines.items())):
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", linestyle=":" if distill else "-" if epochs == 1 else "--", capsize=3,
                        color=colors[index % len(colors)], label=f"{_method_label(method, distill)}, {epochs} ep")
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
