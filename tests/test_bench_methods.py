"""The pieces of ``benchmarks/bench_methods.py`` on tiny data: the whole-model rank search, resume, the table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_methods as bench  # noqa: E402
import norton  # noqa: E402
from norton.errors import UserError  # noqa: E402

X = torch.zeros(1, 3, 16, 16)


def _resnet20():
    torch.manual_seed(0)
    return norton.create_model("resnet_20", num_classes=10).eval()


# ------------------------------------------------------------------ the rank search
@pytest.mark.parametrize("budget", [0.5, 0.3])
@pytest.mark.parametrize("method", ["cp-filter", "tucker2", "cp-layer", "svd"])
def test_search_lands_the_whole_model_within_two_percent(method, budget):
    model = _resnet20()
    base = norton.count_complexity(model, example_inputs=X).macs
    layers = bench.decomposable_layers(model, method, X)
    choice = bench.search_ranks(layers, method, base, budget)
    assert choice.ranks is not None, choice.reason
    assert abs(choice.fraction / budget - 1) <= bench.TOLERANCE
    # The closed forms the search adds up are what the counter sees once the model is decomposed.
    norton.decompose(model, choice.ranks, method=method, example_inputs=X, n_iter_max=1, progress=False)
    measured = norton.count_complexity(model, example_inputs=X).macs / base
    assert measured == pytest.approx(choice.fraction, rel=1e-9)


def test_search_refines_layer_by_layer_when_no_uniform_fraction_lands():
    # cp-filter's ranks are few and coarse: at 0.5 no single F lands, the per-layer step must.
    model = _resnet20()
    base = norton.count_complexity(model, example_inputs=X).macs
    layers = bench.decomposable_layers(model, "cp-filter", X)
    choice = bench.search_ranks(layers, "cp-filter", base, 0.5, tolerance=0.005)
    assert choice.ranks is not None and "deepest layer" in choice.spec
    assert abs(choice.fraction / 0.5 - 1) <= 0.005


def test_a_budget_below_rank_one_everywhere_is_unreachable():
    model = _resnet20()
    base = norton.count_complexity(model, example_inputs=X).macs
    layers = bench.decomposable_layers(model, "cp-filter", X)
    choice = bench.search_ranks(layers, "cp-filter", base, 0.02)
    assert choice.ranks is None and "rank 1 everywhere" in choice.reason


def test_decompose_then_prune_meets_the_budget_from_a_milder_decomposition():
    model = _resnet20()
    before = [p.clone() for p in model.parameters()]
    work, details = bench.compress(model, "svd", 0.3, "decompose+prune", X, seed=0)
    assert work is not None
    assert details["decompose_target"] == pytest.approx(0.42)
    assert 0.42 * 0.98 <= details["decomposed_fraction"] <= 0.42 * 1.02
    base = norton.count_complexity(model, example_inputs=X).macs
    assert abs(bench.macs_fraction(work, base, X) / 0.3 - 1) <= 0.02
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # baseline untouched


def test_prune_ranks_variant_reaches_a_tucker2_budget_from_the_first_decomposition():
    model = _resnet20()
    work, details = bench.compress(model, "tucker2", 0.3, "decompose+prune-ranks", X, seed=0)
    assert work is not None and details["decompose_target"] == pytest.approx(0.42)  # no fallback to 1.2x, 1.1x
    base = norton.count_complexity(model, example_inputs=X).macs
    assert abs(bench.macs_fraction(work, base, X) / 0.3 - 1) <= 0.02
    assert work.norton_plan[-1]["prune_ranks"] is True


# ------------------------------------------------------------------ the results file
def test_run_missing_skips_done_keys_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    calls = []

    def run_one(key):
        calls.append((key["method"], key["budget"]))
        return {"status": "ok", "value": len(calls)}

    keys = [{"method": m, "budget": b, "variant": "decompose", "seed": 0} for m in ("svd", "tucker2") for b in (0.5, 0.3)]
    bench.run_missing(keys[:2], path, run_one, log=lambda _: None)
    with open(path, "a") as handle:  # a write torn by a kill
        handle.write('{"method": "tucker2", "budget": 0.5, "vari')
    assert len(bench.read_results(path)) == 2
    path.write_text(path.read_text().rsplit("\n", 1)[0] + "\n")
    bench.run_missing(keys, path, run_one, log=lambda _: None)
    assert calls == [("svd", 0.5), ("svd", 0.3), ("tucker2", 0.5), ("tucker2", 0.3)]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [bench.record_key(r) for r in records] == [bench.record_key(k) for k in keys]


def test_a_broken_line_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('not json\n{"method": "svd", "budget": 0.5, "variant": "decompose", "seed": 0}\n')
    with pytest.raises(UserError, match="results.jsonl:1"):
        bench.read_results(path)


# ------------------------------------------------------------------ the table
def _record(method, budget, variant, **fields):
    return {"method": method, "budget": budget, "variant": variant, "seed": 0, **fields}


def test_table_orders_rows_and_says_which_budget_cannot_be_reached():
    records = [
        _record("svd", 0.3, "decompose", status="ok", macs_fraction=0.301, params=51_234, top1_compressed=40.5,
                top1_finetuned=80.25, row_seconds=123.4, details={"rank_summary": "2x19", "spec": "macs:0.31"}),
        _record("tucker2", 0.5, "decompose+prune", status="unreachable", reason="pruning: too low"),
        _record("cp-filter", 0.5, "decompose+prune", status="ok", macs_fraction=0.5, params=100_000,
                top1_compressed=10.0, top1_finetuned=85.0, row_seconds=60.0,
                details={"rank_summary": "3x19", "spec": "macs:0.7", "decomposed_fraction": 0.7}),
        _record("baseline", 1.0, "-", status="ok", top1_compressed=86.1, params=272_474),
    ]
    lines = bench.render_table(records).splitlines()
    assert lines[2].startswith("| 1 | baseline |") and "86.10" in lines[2] and "272.5k" in lines[2]
    assert lines[3].startswith("| 0.5 | cp-filter | decompose+prune |") and "at 0.700, then l1 pruning" in lines[3]
    assert lines[4].startswith("| 0.5 | tucker2 | decompose+prune | cannot reach the budget: pruning: too low")
    assert lines[5] == ("| 0.3 | svd | decompose | 2x19 (macs:0.31) | 0.301 | 51.2k | 40.50 | 80.25 | 123 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="unknown method 'qr'"):
        bench.parse_args(["--methods", "svd,qr", "--report-only"])
    with pytest.raises(UserError, match="unknown variant"):
        bench.parse_args(["--variants", "prune", "--report-only"])
    with pytest.raises(UserError, match="leave --ckpt out"):
        bench.parse_args(["--ckpt", str(tmp_path / "missing.pt")])


def test_the_table_replaces_only_what_lies_between_the_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{bench.MARKERS[0]}\nold table\n{bench.MARKERS[1]}\noutro\n")
    bench.write_between_markers(doc, "| new |")
    assert doc.read_text() == f"intro\n{bench.MARKERS[0]}\n| new |\n{bench.MARKERS[1]}\noutro\n"
    doc.write_text("no markers\n")
    with pytest.raises(UserError, match="bench_methods:begin"):
        bench.write_between_markers(doc, "| new |")
    assert doc.read_text() == "no markers\n"


def test_the_data_follows_the_channels_the_baseline_reads():
    assert bench.input_channels(_resnet20()) == 3
    assert bench.input_channels(norton.create_model("resnet_20", num_classes=10, in_channels=1)) == 1
    with pytest.raises(UserError, match="trained on Fashion-MNIST"):
        bench.input_channels(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3)))
    with pytest.raises(UserError, match="trained on Fashion-MNIST"):
        bench.input_channels(torch.nn.Linear(3, 2))


def test_without_ckpt_the_pareto_baseline_is_used_and_nothing_is_refused():
    args = bench.parse_args(["--methods", "svd", "--budgets", "0.5"])
    assert args.ckpt is None and args.train_images == 60_000


def test_results_are_committed_and_an_empty_file_leaves_the_docs_alone(tmp_path, capsys):
    assert bench.parse_args([]).out == "benchmarks/results/methods.jsonl"
    docs = tmp_path / "page.md"
    docs.write_text(f"{bench.MARKERS[0]}\nmeasured before\n{bench.MARKERS[1]}\n")
    argv = ["--report-only", "--out", str(tmp_path / "none.jsonl"), "--docs", str(docs)]
    assert bench.main(argv) == 0
    assert "no results" in capsys.readouterr().out and "measured before" in docs.read_text()
