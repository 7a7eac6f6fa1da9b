"""benchmarks/bench_detection.py: the table's rows exist and hold positive timings."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_detection  # noqa: E402


def test_rows_for_every_batch_size(tmp_path, capsys):
    args = bench_detection.parse_args(["--size", "64", "--proposals", "10", "--batch-sizes", "1", "2",
                                       "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "rows.json")])
    rows = bench_detection.run(args)
    out = capsys.readouterr().out
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["baseline_ms"] > 0 and row["compressed_ms"] > 0 and row["speedup"] > 0
        assert row["compressed_fps"] == pytest.approx(1e3 * row["batch"] / row["compressed_ms"])
        assert row["macs_ratio"] > 1  # the compressed body has fewer MACs
    assert "threads" in out and "MACs" in out and (tmp_path / "rows.json").is_file()
    assert len([line for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]) == 2


def test_bad_rates_are_a_one_line_error(capsys):
    assert bench_detection.main(["--size", "64", "-cpr", "[0.1]*3", "--batch-sizes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_detection: error:") and err.count("\n") == 1


@pytest.mark.slow
def test_quick_mode_runs_as_a_script():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_detection.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2 and all(float(value.rstrip("x")) > 0 for row in rows for value in row[1:6])
