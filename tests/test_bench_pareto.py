"""The pieces of ``benchmarks/bench_pareto.py`` on tiny data: budgets met, resume, tables, the missing auto method."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _pareto_methods as methods  # noqa: E402
import _pareto_report as report  # noqa: E402
import bench_pareto  # noqa: E402
import norton  # noqa: E402
from norton.errors import UserError  # noqa: E402


def _resnet20():
    torch.manual_seed(0)
    return norton.create_model("resnet_20", num_classes=10, in_channels=1).eval()


def _calibration(n=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))]


# ------------------------------------------------------------------ Torch-Pruning reaches the budget
@pytest.mark.parametrize("budget", [0.3, 0.1])
@pytest.mark.parametrize("name", ["tp-l1-uniform", "tp-l1-global", "tp-taylor-uniform", "tp-lamp-global"])
def test_torch_pruning_methods_meet_the_budget_within_2_percent_and_leave_the_model(name, budget):
    model = _resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.zeros(1, 1, 32, 32)
    reference = norton.count_complexity(model, example_inputs=example).macs
    pruned, details = methods.METHODS[name](model, example, budget, _calibration(), 0)
    fraction = methods.macs_fraction(pruned, reference, example)
    assert abs(fraction / budget - 1) <= 0.02, (fraction, details)
    assert details["budget_error"] == pytest.approx(abs(fraction / budget - 1))
    assert pruned.fc.out_features == 10  # the classifier keeps its classes
    assert pruned(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model unchanged
    assert all(p.grad is None for p in model.parameters())  # Taylor's gradients were taken on a copy


def test_bisection_reports_the_closest_trial_when_widths_cannot_meet_the_budget():
    # A single conv of 2 filters: the MACs can only be 1/2 or 1 of the original's here (the classifier is kept).
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 6 * 6, 3))
    pruned, details = methods.tp_to_budget(model, torch.zeros(1, 1, 8, 8), 0.6, [], importance="l1",
                                           global_pruning=False)
    assert details["budget_error"] > 0.02
    assert details["trials"] >= 5
    assert pruned[0].out_channels == 1


def test_paper_rank_rule():
    assert [methods.paper_rank(b) for b in (0.5, 0.3, 0.2, 0.1)] == [4, 4, 2, 2]


def test_paper_path_meets_the_budget_and_leaves_the_model():
    model = _resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.zeros(1, 1, 32, 32)
    reference = norton.count_complexity(model, example_inputs=example).macs
    compressed, details = methods.paper(model, example, 0.2, [], 0)
    assert details["rank"] == 2 and details["decomposed_macs_fraction"] > 0.2
    assert abs(methods.macs_fraction(compressed, reference, example) / 0.2 - 1) <= 0.02
    assert [r["op"] for r in compressed.norton_plan] == ["decompose", "prune"]
    assert compressed.conv1.rank == 2 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ results file and resume
def _key(method="paper", budget=0.5, seed=0, epochs=1):
    return {"model": "resnet_20", "method": method, "budget": budget, "seed": seed, "epochs": epochs,
            "distill": False}


def test_read_results_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "results.jsonl"
    report.append_result({**_key(), "top1_finetuned": float("nan")}, path)
    with open(path, "a") as handle:
        handle.write('{"model": "resnet_20", "meth')  # killed mid-write
    records = report.read_results(path)
    assert len(records) == 1 and records[0]["top1_finetuned"] is None  # strict JSON: NaN written as null
    assert report.done_keys(records) == {report.record_key(_key(budget=0.5000000001))}
    path.write_text('{"broken\n' + json.dumps(_key()) + "\n")
    with pytest.raises(ValueError, match=":1 is not a JSON object"):
        report.read_results(path)


def _fake_data_and_baseline(monkeypatch):
    """run_grid without data or training: a tiny model as the cached baseline."""
    class FakeData:
        input_size = (1, 8, 8)
        splits = None

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 10))
    monkeypatch.setattr(bench_pareto.data_lib, "build_data", lambda **_: FakeData())
    monkeypatch.setattr(bench_pareto.data_lib, "trained_baseline",
                        lambda *a, **k: (model, {"seed": 0, "epochs": 1, "test_top1": 90.0, "train_seconds": 1.0}))
    return model


def test_a_second_run_skips_the_keys_the_first_wrote(tmp_path, monkeypatch):
    _fake_data_and_baseline(monkeypatch)
    monkeypatch.setattr(bench_pareto, "measure", lambda *a, **k: {"macs": 1000, "macs_fraction": 1.0, "params": 5,
                                                                  "latency_ms_b1": 1.0, "latency_ms_b64": 9.0})
    calls = []

    def fake_run_one(args, env, data, baseline, base, key):
        calls.append((key["method"], key["budget"], key["seed"]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed during its second model
        return {**key, "top1_finetuned": 80.0}

    monkeypatch.setattr(bench_pareto, "run_one", fake_run_one)
    argv = ["--out", str(tmp_path), "--budgets", "0.5,0.3", "--methods", "paper", "--seeds", "0", "--device", "cpu"]
    with pytest.raises(KeyboardInterrupt):
        bench_pareto.run_grid(bench_pareto.parse_args(argv), tmp_path / "results.jsonl")
    assert calls == [("paper", 0.5, 0), ("paper", 0.3, 0)]
    bench_pareto.run_grid(bench_pareto.parse_args(argv), tmp_path / "results.jsonl")
    assert calls[2:] == [("paper", 0.3, 0)]  # 0.5 was done: only the killed one runs again
    bench_pareto.run_grid(bench_pareto.parse_args(argv), tmp_path / "results.jsonl")
    assert len(calls) == 3
    records = report.read_results(tmp_path / "results.jsonl")
    assert [r["method"] for r in records] == ["baseline", "paper", "paper"]  # the baseline record written once


def test_results_are_committed_by_default_and_quick_runs_stay_apart(tmp_path):
    assert bench_pareto.parse_args([]).results == "benchmarks/results/pareto.jsonl"
    assert "benchmarks/results" not in (Path(__file__).resolve().parents[1] / ".gitignore").read_text()
    quick = bench_pareto.parse_args(["--quick", "--out", str(tmp_path)])
    assert Path(quick.results) == tmp_path / "quick" / "results.jsonl"


def test_fingerprint_sees_one_changed_weight():
    model = _resnet20()
    mark = bench_pareto.data_lib.fingerprint(model)
    assert mark == bench_pareto.data_lib.fingerprint(_resnet20()) and len(mark) == 12
    with torch.no_grad():
        model.fc.bias[3] += 1e-3
    assert bench_pareto.data_lib.fingerprint(model) != mark


def test_a_retrained_baseline_is_recorded_beside_the_first_and_found_again(tmp_path, monkeypatch, capsys):
    model = _fake_data_and_baseline(monkeypatch)
    monkeypatch.setattr(bench_pareto, "measure", lambda *a, **k: {
        "macs": 1000, "macs_fraction": 1.0, "params": 5, "latency_ms_b1": 1.0, "latency_ms_b64": 9.0})
    used = []
    monkeypatch.setattr(bench_pareto, "run_one", lambda args, env, data, baseline, base, key:
                        used.append(base["details"]["fingerprint"]) or {**key, "top1_finetuned": 80.0})
    results = tmp_path / "results.jsonl"
    first = copy.deepcopy(model.state_dict())

    def run(seed):
        argv = ["--out", str(tmp_path), "--budgets", "0.5", "--methods", "paper", "--seeds", seed, "--device", "cpu"]
        bench_pareto.run_grid(bench_pareto.parse_args(argv), results)

    run("0")
    with torch.no_grad():  # the next clone trains a baseline that differs in one weight
        model[0].bias[0] += 1.0
    run("1")
    records = report.read_results(results)
    marks = [r["details"]["fingerprint"] for r in records if r["method"] == "baseline"]
    assert len(marks) == 2 and marks[0] != marks[1] and used == marks  # each row used its own clone's baseline
    assert "warning: this baseline" in capsys.readouterr().out
    assert f"fingerprints {marks[0]}, {marks[1]}" in report.baseline_line(records, "resnet_20")
    model.load_state_dict(first)  # back on the first clone's weights: its record is found, not written again
    run("2")
    assert [r["method"] for r in report.read_results(results)].count("baseline") == 2
    assert used[-1] == marks[0] and "warning" not in capsys.readouterr().out


def test_merge_brings_another_machines_rows_home_once(tmp_path):
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    base = {**_key("baseline", 1.0), "details": {"fingerprint": "aaa"}}
    for record in (base, _record("auto", 0.5, 0, 92.0)):
        report.append_result(record, here)
    for record in ({**base, "details": {"fingerprint": "bbb"}}, _record("auto", 0.5, 0, 93.0),
                   _record("auto", 0.5, 1, 93.5)):
        report.append_result(record, there)
    assert bench_pareto.merge_results(there, here) == 2  # the other baseline and seed 1; seed 0 was measured here
    assert bench_pareto.merge_results(there, here) == 0
    records = report.read_results(here)
    assert [(r["method"], r["seed"], r["details"]["fingerprint"] if r["method"] == "baseline" else r["top1_finetuned"])
            for r in records[2:]] == [("baseline", 0, "bbb"), ("auto", 1, 93.5)]
    with pytest.raises(UserError, match="--merge: .* not found"):
        bench_pareto.merge_results(tmp_path / "missing.jsonl", here)


def test_dense_runs_at_1_first_and_latency_budgets_after_the_macs_ones(tmp_path, monkeypatch):
    _fake_data_and_baseline(monkeypatch)
    monkeypatch.setattr(bench_pareto, "measure", lambda *a, **k: {"macs": 1000})
    calls = []
    monkeypatch.setattr(bench_pareto, "run_one", lambda args, env, data, baseline, base, key:
                        calls.append((key["method"], key["budget"])) or {**key, "top1_finetuned": 80.0})
    argv = ["--out", str(tmp_path), "--budgets", "0.5,0.3", "--methods", "paper,dense", "--latency-budgets", "0.8,0.6",
            "--seeds", "0", "--device", "cpu"]
    bench_pareto.run_grid(bench_pareto.parse_args(argv), tmp_path / "results.jsonl")
    # the dense control once, at budget 1 whatever --budgets says
    assert calls == [("dense", 1.0), ("paper", 0.5), ("paper", 0.3), ("auto-latency", 0.8), ("auto-latency", 0.6)]
    assert "auto-latency" not in bench_pareto.parse_args([]).methods  # MACs budgets never go to it by default


def test_no_grid_options_run_the_issues_protocol_and_any_grid_option_runs_that_piece_only():
    args = bench_pareto.parse_args([])
    assert args.protocol and (args.seeds, args.epochs) == ([0], 1)
    assert bench_pareto.parse_args(["--budgets", "0.2"]).protocol  # --budgets narrows the protocol
    for piece in (["--seeds", "0"], ["--methods", "auto"], ["--epochs", "1"], ["--quick"]):
        assert not bench_pareto.parse_args(piece).protocol, piece
    assert bench_pareto.parse_args(["--methods", "auto"]).seeds == [0, 1, 2]


def test_protocol_runs_every_method_once_then_the_finalists_with_three_seeds_then_with_5_epochs(tmp_path, monkeypatch):
    _fake_data_and_baseline(monkeypatch)
    monkeypatch.setattr(bench_pareto, "measure", lambda *a, **k: {"macs": 1000})
    # the best Torch-Pruning setting differs by budget, so the finalists do too
    best = {0.5: "tp-l1-uniform", 0.2: "tp-lamp-global"}
    calls = []

    def fake_run_one(args, env, data, baseline, base, key):
        calls.append((key["method"], key["budget"], key["seed"], key["epochs"]))
        return {**key, "top1_finetuned": 90.0 if best.get(key["budget"]) == key["method"] else 80.0}

    monkeypatch.setattr(bench_pareto, "run_one", fake_run_one)
    argv = ["--out", str(tmp_path), "--budgets", "0.5,0.2", "--device", "cpu", "--results", str(tmp_path / "r.jsonl")]
    args = bench_pareto.parse_args(argv)
    bench_pareto.run_grid(args, tmp_path / "r.jsonl")
    first = [c for c in calls if c[2] == 0 and c[3] == 1]
    assert {(m, b) for m, b, _, _ in first} == {("dense", 1.0)} | {(m, b) for m in bench_pareto.MACS_METHODS
                                                                   if m != "dense" for b in (0.5, 0.2)}
    later = calls[len(first):]
    expected = [(m, b, s, e) for e in (1, 5) for b in (0.5, 0.2) for m in ("auto", "paper", best[b]) for s in (0, 1, 2)
                if (s, e) != (0, 1)]  # seed 0 at 1 epoch ran in the first stage
    assert later == expected
    bench_pareto.run_grid(args, tmp_path / "r.jsonl")  # everything done: a second run trains nothing
    assert len(calls) == len(first) + len(expected)


def test_one_run_fine_tunes_for_its_keys_epochs_not_the_command_lines(monkeypatch):
    # The protocol's 5-epoch stage runs in a process whose --epochs is 1: each model must train for its key's.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 10))
    trained = []

    def fake_fit(net, loaders, *, epochs, **kwargs):
        trained.append(epochs)
        return type("Result", (), {"test": {"top1": 50.0}})()

    monkeypatch.setattr(bench_pareto.norton, "fit", fake_fit)
    monkeypatch.setitem(bench_pareto.METHODS, "paper", lambda base, example, budget, calibration, seed: (base, {}))
    monkeypatch.setattr(bench_pareto, "macs_fraction", lambda *a: 0.5)
    monkeypatch.setattr(bench_pareto.data_lib, "calibration_batches", lambda *a, **k: [])
    monkeypatch.setattr(bench_pareto.data_lib, "loaders_for", lambda *a: type("L", (), {"test": None})())
    monkeypatch.setattr(bench_pareto, "top1", lambda *a: 10.0)
    monkeypatch.setattr(bench_pareto, "measure", lambda *a, **k: {"macs": 1000})
    data = type("D", (), {"input_size": (1, 8, 8), "splits": type("S", (), {"train": [0] * 3})()})()
    base = {"macs": 2000, "top1_finetuned": 90.0, "details": {"fingerprint": "f"}}
    args = bench_pareto.parse_args(["--device", "cpu"])
    assert args.epochs == 1
    record = bench_pareto.run_one(args, {}, data, model, base, bench_pareto._key(args, "paper", 0.5, 0, 5))
    assert trained == [5] and record["epochs"] == 5


def test_auto_latency_times_at_batch_64_and_records_the_report(monkeypatch):
    seen = {}

    def fake_auto_compress(model, example, **kwargs):
        seen.update(shape=tuple(example.shape), **kwargs)
        small = torch.nn.Sequential()
        small.norton_auto_report = type("R", (), {"target_latency_ms": 5.0, "latency_before_ms": 10.0,
                                                  "latency_after_ms": 5.2, "latency_passes": [{"goal_ms": 5.0}]})()
        return small

    monkeypatch.setattr(norton, "auto_compress", fake_auto_compress)
    _, details = methods.METHODS["auto-latency"](_resnet20(), torch.zeros(1, 1, 32, 32), 0.6, _calibration(), 0)
    assert seen["shape"] == (64, 1, 32, 32) and seen["target_latency"] == 0.6
    assert all(isinstance(x, torch.Tensor) for x in seen["calibration"])  # images only, no labels
    assert details["latency_after_ms"] == 5.2 and details["target_latency_ms"] == 5.0


def test_distill_fine_tunes_every_model_with_a_frozen_copy_of_the_baseline():
    baseline = _resnet20()
    assert bench_pareto.finetune_kwargs(bench_pareto.parse_args(["--device", "cpu"]), baseline) == {}
    args = bench_pareto.parse_args(["--device", "cpu", "--distill", "--distill-alpha", "0.7",
                                    "--distill-temperature", "2"])
    kwargs = bench_pareto.finetune_kwargs(args, baseline)
    teacher = kwargs["teacher"]
    assert (kwargs["distill_alpha"], kwargs["distill_temperature"]) == (0.7, 2.0)
    assert teacher is not baseline and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in baseline.parameters())  # the baseline itself is left as it was
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(teacher(x), baseline.eval()(x))
    assert bench_pareto.main(["--distill", "--distill-alpha", "1.5"]) == 2  # checked like the CLI's


def test_bad_options_are_one_line_errors(capsys):
    for argv, expected in ((["--budgets", "0.5,1.5"], "--budgets"), (["--methods", "tp-foo"], "unknown method"),
                           (["--seeds", "a"], "--seeds"), (["--epochs", "0"], "--epochs"),
                           (["--latency-budgets", "1.2"], "--latency-budgets"),
                           (["--methods", "auto-latency"], "--latency-budgets")):
        assert bench_pareto.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


# ------------------------------------------------------------------ rendering
def _record(method, budget, seed, top1, before=10.0, epochs=1):
    return {**_key(method, budget, seed, epochs), "top1_compressed": before, "top1_finetuned": top1,
            "macs_fraction": budget - 0.004, "params": 120_000, "latency_ms_b1": 2.0 + seed,
            "latency_ms_b64": 40.0, "speedup_b64": 1.5 + seed / 10, "compress_seconds": 3.0}


def test_table_shows_mean_and_std_over_seeds():
    records = [_record("paper", 0.5, 0, 91.0), _record("paper", 0.5, 1, 92.0), _record("paper", 0.5, 2, 93.0),
               _record("tp-l1-uniform", 0.5, 0, 92.5), _record("tp-l1-uniform", 0.3, 0, 90.0, before=None),
               {**_record("paper", 0.5, 0, 50.0), "model": "resnet_56"}]
    expected = (
        "**0.5 of the baseline's MACs**\n"
        "\n"
        "| method | fine-tuning epochs | n | top-1 after compression (%) | top-1 after fine-tuning (%) | MACs (fraction) "
        "| params | latency b=1 (ms) | latency b=64 (ms) | speed-up b=64 (x) | compression (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| tp-l1-uniform | 1 | 1 | 10.00 | 92.50 | 0.496 | 120.0k | 2.00 | 40.0 | 1.50 | 3.0 |\n"
        "| paper | 1 | 3 | 10.00 ± 0.00 | 92.00 ± 1.00 | 0.496 ± 0.000 | 120.0k ± 0 | 3.00 ± 1.00 | 40.0 ± 0.0 "
        "| 1.60 ± 0.10 | 3.0 ± 0.0 |\n"
        "\n"
        "**0.3 of the baseline's MACs**\n"
        "\n"
        "| method | fine-tuning epochs | n | top-1 after compression (%) | top-1 after fine-tuning (%) | MACs (fraction) "
        "| params | latency b=1 (ms) | latency b=64 (ms) | speed-up b=64 (x) | compression (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| tp-l1-uniform | 1 | 1 | — | 90.00 | 0.296 | 120.0k | 2.00 | 40.0 | 1.50 | 3.0 |"
    )
    assert report.render_tables(records, "resnet_20") == expected


def test_latency_budgets_get_their_own_tables():
    records = [_record("tp-l1-uniform", 0.5, 0, 92.5), _record("auto-latency", 0.5, 0, 93.0)]
    text = report.render_tables(records, "resnet_20")
    macs, latency = text.split("**0.5 of the baseline's batch-64 latency**")
    assert "| tp-l1-uniform |" in macs and "auto-latency" not in macs
    assert "| auto-latency |" in latency and "tp-l1" not in latency


def test_frontier_keeps_only_points_no_faster_point_beats():
    points = [(1.0, 93.0), (1.2, 92.0), (1.3, 92.5), (1.6, 91.0), (1.5, 90.0), (2.0, 89.0)]
    assert report.frontier(points) == [(1.0, 93.0), (1.3, 92.5), (1.6, 91.0), (2.0, 89.0)]
    envelope = report.frontier(points)
    assert report.at_speedup(envelope, 1.45) == pytest.approx(91.75)
    assert report.at_speedup(envelope, 1.3) == pytest.approx(92.5)
    assert report.at_speedup(envelope, 0.9) is None and report.at_speedup(envelope, 2.1) is None


def test_same_latency_table_compares_with_the_frontier_and_the_best_faster_peer():
    def point(method, budget, speed, top1, seed=0):
        return {**_record(method, budget, seed, top1), "speedup_b64": speed}

    records = [point("tp-l1-uniform", 0.5, 1.2, 92.0), point("tp-l1-global", 0.3, 1.6, 91.0),
               point("tp-lamp-global", 0.3, 1.7, 90.0), point("auto-latency", 0.7, 1.4, 92.0),
               point("auto-latency", 0.7, 1.4, 91.8, seed=1), point("paper", 0.5, 1.3, 99.0),
               point("auto", 0.2, 3.0, 88.0)]
    rows = [line for line in report.render_same_latency(records, "resnet_20").splitlines() if line.startswith("| auto")]
    latency = next(r for r in rows if r.startswith("| auto-latency"))
    cells = [c.strip() for c in latency.strip("|").split("|")]
    # frontier at 1.4x: halfway between (1.2, 92.0) and (1.6, 91.0) -> 91.5; auto-latency's mean 91.9
    assert cells[1:7] == ["1", "2", "1.40", "91.90", "91.50", "+0.40"]
    assert cells[7] == "tp-l1-global at 0.3 of the MACs: 91.00 (1.60x, n=1)" and cells[8] == "+0.90"
    beyond = next(r for r in rows if r.startswith("| auto at"))
    assert "| none |" in beyond and "| — |" in beyond  # faster than every Torch-Pruning model: nothing to compare
    assert not any(r.startswith("| paper") for r in report.render_same_latency(records, "resnet_20").splitlines())


def test_goals_table_compares_auto_with_the_best_peer_under_the_same_recipe():
    records = [_record("auto", 0.5, 0, 92.6, before=92.5), _record("auto", 0.5, 1, 92.4, before=92.7),
               _record("tp-l1-uniform", 0.5, 0, 92.3), _record("tp-l1-uniform", 0.5, 1, 92.1),
               _record("tp-l1-global", 0.5, 0, 92.0),
               _record("auto", 0.1, 0, 90.0), _record("tp-l1-global", 0.1, 0, 88.0),
               _record("auto", 0.4, 0, 95.0), _record("tp-l1-global", 0.4, 0, 80.0),  # no goal at 0.4
               _record("paper", 0.3, 0, 99.0),  # no auto and no peer at 0.3
               {**_record("auto", 0.5, 0, 92.9), "distill": True}, {**_record("tp-l1-global", 0.5, 0, 92.8), "distill": True},
               _record("dense", 1.0, 0, 93.2), _record("dense", 1.0, 1, 93.0)]  # the control: 1 epoch, no distillation
    rows = [line for line in report.render_goals(records, "resnet_20").splitlines() if line.startswith("| 0")]
    assert rows == [
        "| 0.5 | 1 | no | 92.50 ± 0.14 (n=2) | 92.20 ± 0.14 (`tp-l1-uniform`, n=2) | +0.30 | +0.3: met | 92.60 ± 0.14 "
        "| 93.10 ± 0.14 (n=2) |",
        "| 0.1 | 1 | no | 90.00 (n=1) | 88.00 (`tp-l1-global`, n=1) | +2.00 | +3: missed by 1.00 | 10.00 | 93.10 ± 0.14 (n=2) |",
        "| 0.5 | 1 | yes | 92.90 (n=1) | 92.80 (`tp-l1-global`, n=1) | +0.10 | +0.3: missed by 0.20 | 10.00 | — |",
    ]
    assert report.render_goals([_record("tp-l1-global", 0.5, 0, 92.0)], "resnet_20") == ""


def test_best_peer_prefers_the_setting_with_the_most_seeds_then_the_highest_mean():
    records = [_record("tp-l1-uniform", 0.2, seed, top1) for seed, top1 in enumerate((92.7, 92.5, 92.6))]
    records += [_record("tp-l1-global", 0.2, 0, 92.9),  # one lucky seed of a dropped setting
                _record("tp-lamp-global", 0.2, 0, 91.0), _record("tp-lamp-global", 0.2, 1, 91.2),
                _record("tp-taylor-uniform", 0.1, 0, 99.0)]  # another budget
    name, group, mean = report.best_peer(report.grouped(records, "resnet_20"), 0.2, 1, False)
    assert (name, len(group), mean) == ("tp-l1-uniform", 3, pytest.approx(92.6))
    single = [_record("tp-l1-uniform", 0.2, 0, 92.7), _record("tp-l1-global", 0.2, 0, 92.9)]
    assert report.best_peer(report.grouped(single, "resnet_20"), 0.2, 1, False)[0] == "tp-l1-global"
    assert report.best_peer(report.grouped(single, "resnet_20"), 0.3, 1, False) is None


def test_document_section_is_replaced_between_its_markers_only(tmp_path):
    doc = tmp_path / "pareto.md"
    doc.write_text("# Pareto\n\nintro\n")
    report.write_document(doc, "resnet_20", "first")
    report.write_document(doc, "resnet_56", "other model")
    report.write_document(doc, "resnet_20", "second")
    text = doc.read_text()
    assert text.startswith("# Pareto\n\nintro\n") and "first" not in text
    assert text.count("second") == 1 and text.count("other model") == 1
    assert text.index("second") < text.index("other model")


def test_plots_are_small_pngs(tmp_path):
    records = [_record("paper", b, s, 90.0 + b + s) for b in (0.5, 0.3) for s in (0, 1)]
    records.append({**_record("baseline", 1.0, 0, 92.6), "details": {"train_seconds": 60.0}})
    paths = report.plot(records, "resnet_20", tmp_path)
    assert [p.name for p in paths] == ["pareto_macs.png", "pareto_latency.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000


def test_plots_leave_out_the_methods_asked(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    drawn = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *a, **k: labels.append(k["label"]) or drawn(self, *a, **k))
    records = [_record(m, b, 0, 90.0 + b) for m in ("auto", "auto-cp-filter") for b in (0.5, 0.3)]
    report.plot(records, "resnet_20", tmp_path, leave_out=("auto-cp-filter",))
    assert labels == ["auto, 1 ep"] * 2  # one line per plot
    labels.clear()
    report.plot(records, "resnet_20", tmp_path)
    assert sorted(labels) == ["auto, 1 ep"] * 2 + ["auto-cp-filter, 1 ep"] * 2


def test_dense_control_is_an_untouched_copy_of_the_baseline():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    copy, details = methods.METHODS["dense"](model, torch.zeros(1, 1, 8, 8), 1.0, [], 0)
    assert copy is not model and details == {}
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(), strict=True))


def test_auto_variants_offer_all_four_decompositions_or_none(monkeypatch):
    seen = []

    def fake_auto_compress(model, example, **kwargs):
        seen.append(kwargs.get("methods", "default"))
        small = torch.nn.Sequential()
        small.norton_auto_report = type("R", (), {"methods": {"a": "svd", "b": "cp-layer", "c": "svd"}})()
        return small

    monkeypatch.setattr(norton, "auto_compress", fake_auto_compress)
    calls = {name: methods.METHODS[name](_resnet20(), torch.zeros(1, 1, 32, 32), 0.3, _calibration(), 0)[1]
             for name in ("auto", "auto-all", "auto-prune")}
    assert seen == ["default", ("cp-filter", "tucker2", "cp-layer", "svd"), ()]
    assert calls["auto"]["decomposed_layers"] == {"cp-layer": 1, "svd": 2}
    default = bench_pareto.parse_args([]).methods
    assert "auto" in default and not set(methods.VARIANTS) & set(default)


def test_auto_option_variants_change_one_option_each(monkeypatch):
    seen = {}

    def fake_auto_compress(model, example, **kwargs):
        small = torch.nn.Sequential()
        small.norton_auto_report = type("R", (), {"methods": {}, "distillation": {"steps": kwargs.get("distill_steps")}})()
        seen[len(seen)] = {k: v for k, v in kwargs.items() if k not in ("target_macs", "calibration", "progress")}
        return small

    monkeypatch.setattr(norton, "auto_compress", fake_auto_compress)
    details = {}
    for name in ("auto-cp-filter", "auto-tucker2-svd", "auto-sensitivity-512", "auto-fine-fractions",
                 "auto-calibration-distill"):
        details[name] = methods.METHODS[name](_resnet20(), torch.zeros(1, 1, 32, 32), 0.2, _calibration(), 0)[1]
    assert list(seen.values()) == [{"methods": ("cp-filter",)}, {"methods": ("tucker2", "svd")},
                                   {"sensitivity_images": 512},
                                   {"fractions": (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)},
                                   {"distill_steps": 200}]
    assert details["auto-calibration-distill"]["calibration_distillation"] == {"steps": 200}
    assert set(methods.VARIANTS) <= set(methods.METHODS)
