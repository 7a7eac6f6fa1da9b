"""The compression commands end to end, on a small Fashion-MNIST subset, and their user errors."""
import json

import pytest
import torch

import norton
from norton.cli.main import build_parser, main
from norton.training.readers import find_fashion_mnist

QUICK = ["--limit", "96", "--val_size", "48", "--batch_size", "32", "--workers", "0", "--no-progress", "--device", "cpu"]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.slow
def test_compress_runs_end_to_end_on_fashion_mnist_and_resumes(tmp_path, capsys):
    assert find_fashion_mnist() is not None, "Debian's dataset-fashion-mnist must be installed (make setup does it)"
    out = tmp_path / "run"
    argv = ["compress", "--arch", "resnet_20", "--dataset", "fashion-mnist", "-r", "3", "--target-macs", "0.33",
            "--baseline-epochs", "1", "--decompose-epochs", "1", "--prune-epochs", "1", "--output", str(out), *QUICK]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "pruned" in printed and "report:" in printed

    summary = json.loads((out / "summary.json").read_text())
    names = [stage["name"] for stage in summary["stages"]]
    assert names == ["baseline", "decomposed", "pruned"]
    baseline, final = summary["stages"][0], summary["stages"][-1]
    assert final["macs"] == pytest.approx(0.33 * baseline["macs"], rel=0.03)
    assert final["latency_ms"] > 0 and baseline["latency_ms"] > 0
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    model = norton.load(out / "compressed.pt")
    assert any(isinstance(m, norton.CPDBlock) for m in model.modules())
    assert norton.count_complexity(model, (3, 32, 32)).macs == final["macs"]

    # a run killed during the last stage continues from the finished stages
    (out / "pruned" / "final.pt").unlink()
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "decomposed: finished in an earlier run" in printed
    again = json.loads((out / "summary.json").read_text())
    assert again["stages"][1] == summary["stages"][1]


@pytest.mark.slow
def test_prune_then_decompose_order_meets_the_target(tmp_path, capsys):
    argv = ["compress", "--arch", "resnet_20", "--dataset", "synthetic", "-r", "4", "--target-macs", "0.4",
            "--order", "prune-decompose", "--baseline-epochs", "1", "--decompose-epochs", "0", "--prune-epochs", "0",
            "--output", str(tmp_path / "r"), "--json", *QUICK]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["stages"]] == ["baseline", "pruned", "decomposed"]
    assert summary["stages"][-1]["macs"] / summary["stages"][0]["macs"] == pytest.approx(0.4, abs=0.04)


@pytest.mark.slow
def test_decompose_prune_and_info_commands_on_a_checkpoint(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--arch", "resnet_20", "--dataset", "synthetic", "--epochs", "1",
                 "--output", str(base), *QUICK]) == 0
    capsys.readouterr()
    assert main(["decompose", "--ckpt", str(base / "best.pt"), "-r", "2", "--epochs", "0",
                 "--output", str(tmp_path / "d"), *QUICK]) == 0
    assert main(["prune", "--ckpt", str(tmp_path / "d" / "compressed.pt"), "--ratio", "0.5", "--epochs", "0",
                 "--criterion", "l1", "--round-to", "5", "--output", str(tmp_path / "p"), *QUICK]) == 0
    capsys.readouterr()
    assert main(["info", "--ckpt", str(tmp_path / "p" / "compressed.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"]["name"] == "resnet_20"
    assert [step.split()[0] for step in info["plan"]] == ["decompose", "prune"]
    model = norton.load(tmp_path / "p" / "compressed.pt")
    assert info["macs"] == norton.count_complexity(model, (3, 32, 32)).macs
    # --round-to 5: every pruned width (16, 32, 64 halved) is rounded to a multiple of 5
    from norton.pipeline import output_channels

    widths = output_channels(model)
    baseline_widths = output_channels(norton.load(tmp_path / "d" / "compressed.pt"))
    pruned = {name: width for name, width in widths.items() if width != baseline_widths[name]}
    assert pruned and all(width % 5 == 0 for width in pruned.values()), pruned


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command loads data, trains, decomposes or prunes: its checks must come first."""
    import norton.pipeline
    import norton.training.datasets
    import norton.training.loop

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    build_parser()  # import every command first: none may bind the forbidden stand-ins for good

    monkeypatch.setattr(norton.training.datasets, "build_datasets", forbidden)
    monkeypatch.setattr(norton.training.loop, "fit", forbidden)
    monkeypatch.setattr(norton.pipeline, "decompose", forbidden)
    monkeypatch.setattr(norton.pipeline, "_prune", forbidden)


@pytest.fixture
def model_file(tmp_path):
    """A small norton file, and a function saying whether it is unchanged."""
    path = tmp_path / "model.pt"
    norton.save(norton.create_model("resnet_20"), path, dataset="synthetic")
    content = path.read_bytes()
    return path, lambda: path.read_bytes() == content


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--target-macs", "1.5"], "target_macs is the fraction of the original model's MACs"),
        (["--target-macs", "0"], "(0, 1]"),
        (["--ratio", "1.0"], "ratio is the fraction of filters removed"),
        (["--criterion", "nope", "--ratio", "0.2"], "nope"),
        (["-r", "-2"], "-r/--rank must be in [0, 65,536], got -2"),
        (["-r", "1000000"], "-r/--rank must be in [0, 65,536], got 1,000,000"),
        (["-r", "10"], "rank for layer 'conv1' 10 is above 9"),  # C_in x k of the 3-channel stem
        (["-r", "2", "-cpr", "[0.1]*99999999999"], "more than 10,000 rates"),
        (["--decompose-epochs", "-1", "-r", "2"], "decompose fine-tuning epochs"),
        (["--finetune-lr", "nan", "-r", "2"], "decompose fine-tuning learning rate must be a finite number, got nan"),
        (["--finetune-lr", "nan", "--ratio", "0.5"], "fine-tuning learning rate must be a finite number"),
        (["--lr", "nan", "-r", "2"], "baseline learning rate must be a finite number"),
        (["--baseline-epochs", "0", "-r", "2"], "baseline_epochs must be in [1, 100,000], got 0"),
        (["--round-to", "0", "--ratio", "0.2"], "round_to must be in [1, 4,096], got 0"),
        (["--round-to", "8", "-r", "1", "-cpr", "[0.2]*9"], "round_to applies to ratio and target_macs"),
        (["-r", "2", "--distill-alpha", "0.5"], "--distill-alpha applies to knowledge distillation: add --distill"),
        (["-r", "2", "--distill-temperature", "2"], "--distill-temperature applies to knowledge distillation"),
        (["-r", "2", "--distill", "--distill-alpha", "1.5"], "distillation alpha is the weight of the teacher's term "
                                                            "and must lie in [0, 1], got 1.5"),
        (["-r", "2", "--distill", "--distill-temperature", "0"], "distillation temperature must be positive, got 0.0"),
        (["-r", "2", "--calibration-distill-steps", "5"], "calibration distillation steps are part of auto_compress"),
        (["--target-macs", "0.5", "--calibration-distill-steps", "-5"], "calibration distillation steps must be"),
        (["--target-macs", "0.5", "--prune-ranks"], "prune_ranks prunes the ranks of decomposed layers"),
        (["-r", "2", "--prune-ranks"], "with a single ratio or target_macs on NORTON's path"),
    ],
)
def test_compress_user_errors_are_one_line_and_come_before_any_work(capsys, tmp_path, no_work, extra, expected):
    err = one_line_error(capsys, ["compress", "--arch", "resnet_20", "--dataset", "synthetic",
                                  "--output", str(tmp_path / "x"), *QUICK, *extra])
    assert expected in err
    assert not (tmp_path / "x").exists()


def test_compress_passes_distillation_to_both_fine_tuning_stages(capsys, monkeypatch):
    import norton.cli.compress
    from norton.compress_arguments import FineTune

    calls = []
    monkeypatch.setattr(norton.cli.compress, "run_compression", lambda **kwargs: calls.append(kwargs) or {})
    argv = ["compress", "--arch", "resnet_20", "-r", "2", "--ratio", "0.3", "--json", "--finetune-lr", "0.02"]
    assert main([*argv, "--distill", "--distill-alpha", "0.7", "--distill-temperature", "3"]) == 0
    assert main(argv) == 0
    capsys.readouterr()
    kd = FineTune(epochs=1, lr=0.02, distill=True, distill_alpha=0.7, distill_temperature=3.0)
    assert calls[0]["decompose_finetune"] == calls[0]["prune_finetune"] == kd
    assert calls[1]["decompose_finetune"] == FineTune(epochs=1, lr=0.02)  # distill=False by default


@pytest.mark.slow
def test_compress_distill_fine_tunes_with_the_uncompressed_model_as_teacher(tmp_path, capsys):
    out = tmp_path / "kd"
    argv = ["compress", "--arch", "resnet_20", "--dataset", "synthetic", "-r", "2", "--distill",
            "--distill-temperature", "2", "--baseline-epochs", "1", "--decompose-epochs", "1",
            "--output", str(out), "--json", *QUICK]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decompose_finetune"]["distill"] is True
    assert summary["decompose_finetune"]["distill_temperature"] == 2.0
    kinds = [json.loads(line).get("train_loss_kind") for line in (out / "decomposed" / "metrics.jsonl").open()]
    assert kinds == ["distillation", None]  # the epoch, then the test line
    recipe = torch.load(out / "decomposed" / "last.pt", weights_only=True)["recipe"]
    assert (recipe["distill_alpha"], recipe["distill_temperature"]) == (0.5, 2.0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["decompose", "-r", "1000000"], "rank must be in [1, 65,536], got 1,000,000"),
        (["decompose", "-r", "0"], "rank must be in [1, 65,536], got 0"),
        (["decompose", "-r", "10"], "rank for layer 'conv1' 10 is above 9"),  # C_in x k of the 3-channel stem
        (["decompose", "-r", "2", "--lr", "nan"], "decompose fine-tuning learning rate"),
        (["prune", "--ratio", "0.5", "--lr", "nan"], "prune fine-tuning learning rate must be a finite number"),
        (["prune", "--ratio", "0.5", "--epochs", "-1"], "prune fine-tuning epochs"),
        (["prune", "--target-macs", "1.01"], "(0, 1]"),
        (["prune", "-cpr", "[0.1]*99999999999"], "more than 10,000 rates"),
        (["prune", "--ratio", "0.5", "--round-to", "100000"], "round_to must be in [1, 4,096]"),
    ],
)
def test_decompose_and_prune_refuse_before_any_work_and_leave_the_file(capsys, tmp_path, no_work, model_file,
                                                                        argv, expected):
    path, unchanged = model_file
    err = one_line_error(capsys, [*argv, "--ckpt", str(path), "--output", str(tmp_path / "out"), *QUICK])
    assert expected in err
    assert unchanged() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_refused_prune_leaves_nothing_that_blocks_the_corrected_rerun(capsys, tmp_path, model_file):
    path, unchanged = model_file
    out = tmp_path / "out"
    argv = ["prune", "--ckpt", str(path), "--ratio", "0.5", "--criterion", "l1", "--output", str(out), *QUICK]
    one_line_error(capsys, [*argv, "--lr", "nan"])
    assert main([*argv, "--epochs", "0", "--json"]) == 0  # no "pass --resume": nothing was left behind
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["stages"]] == ["baseline", "pruned"]
    assert summary["stages"][1]["macs"] < summary["stages"][0]["macs"]
    assert unchanged()


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, ["prune", "--ckpt", str(tmp_path / "missing.pt"), "--ratio", "0.3"])
    assert "missing.pt" in err


def test_info_on_a_file_that_is_not_a_model(capsys, tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"hello": 1}, path)
    err = one_line_error(capsys, ["info", "--ckpt", str(path)])
    assert "junk.pt" in err


DEMO_QUICK = ["--limit", "96", "--val_size", "48", "--batch_size", "32", "--baseline-epochs", "1",
              "--decompose-epochs", "0", "--prune-epochs", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_demo_without_fashion_mnist_says_so_and_uses_the_builtin_data(tmp_path, capsys, monkeypatch):
    import norton.training.readers

    monkeypatch.setattr(norton.training.readers, "find_fashion_mnist", lambda data_dir=None: None)
    assert main(["demo", "--output", str(tmp_path / "demo"), *DEMO_QUICK]) == 0
    captured = capsys.readouterr()
    assert "Fashion-MNIST not found" in captured.err and "synthetic" in captured.err
    assert "top-1 %" in captured.out and "ms@32" in captured.out  # the before/after table
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["dataset"] == "synthetic" and summary["command"] == "norton demo"
    baseline, final = summary["stages"][0], summary["stages"][-1]
    assert final["macs"] == pytest.approx(0.33 * baseline["macs"], rel=0.03)


def test_demo_with_an_incomplete_data_dir_names_the_missing_file(tmp_path, capsys):
    # An explicit --data_dir is used or refused: never the built-in data, never Debian's copy.
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-images-idx3-ubyte").write_bytes(b"")
    err = one_line_error(capsys, ["demo", "--data_dir", str(tmp_path / "fm"), "--output", str(tmp_path / "d"),
                                  *DEMO_QUICK])
    assert "Fashion-MNIST" in err and "missing" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "--ckpt", "m.pt", "--ratio", "0.5", "--lr", "nan"],
        ["compress", "--arch", "resnet_20", "--ratio", "1.5"],
        ["compress", "--arch", "resnet_20", "--target-latency", "12"],
        ["compress", "--arch", "resnet_20", "-r", "2", "--distill", "--distill-alpha", "2"],
        ["decompose", "--ckpt", "m.pt", "-r", "1000000"],
        ["prune", "--ckpt", "missing.pt", "--ratio", "0.5"],
    ],
)
def test_refused_compression_commands_do_not_import_torch(tmp_path, argv):
    # The arguments are checked before the library (and torch) is imported: a typo costs ~0.1 s, not seconds.
    import subprocess
    import sys

    (tmp_path / "m.pt").write_bytes(b"not read")
    code = (f"import sys; from norton.cli.main import main; code = main({argv!r}); "
            "sys.exit(10 + code if 'torch' in sys.modules else code)")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("command", ["prune", "decompose", "demo"])
def test_distillation_options_reach_every_fine_tuning_command(command, monkeypatch, tmp_path):
    import norton.cli.decompose
    import norton.cli.demo
    import norton.cli.prune

    seen = {}

    def fake_run_compression(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    for module in (norton.cli.prune, norton.cli.decompose, norton.cli.demo):
        monkeypatch.setattr(module, "run_compression", fake_run_compression)
    argv = {
        "prune": ["prune", "--ckpt", "m.pt", "--ratio", "0.5"],
        "decompose": ["decompose", "--ckpt", "m.pt", "-r", "2"],
        "demo": ["demo", "--output", str(tmp_path / "d")],
    }[command]
    with pytest.raises(SystemExit):
        main([*argv, "--distill", "--distill-temperature", "3"])
    recipes = [value for key, value in seen.items() if key.endswith("_finetune") and value is not None]
    assert recipes and all(r.distill and r.distill_temperature == 3 for r in recipes)


@pytest.mark.parametrize(("value", "expected"), [
    ("2", "target_latency is a fraction of the model's latency in (0, 1)"),
    ("12", "target_latency is a fraction"),
    ("fast", "target_latency must be a fraction in (0, 1) or milliseconds such as '12ms'"),
    ("0ms", "target_latency in milliseconds must be positive"),
])
def test_bad_target_latency_is_one_line_before_any_work(capsys, tmp_path, no_work, value, expected):
    err = one_line_error(capsys, ["compress", "--arch", "resnet_20", "--dataset", "synthetic",
                                  "--output", str(tmp_path / "x"), *QUICK, "--target-latency", value])
    assert expected in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", ["0.5", "12ms"])
def test_target_latency_reaches_the_compression_run(monkeypatch, capsys, value):
    import norton.cli.compress

    calls = []
    monkeypatch.setattr(norton.cli.compress, "run_compression", lambda **kwargs: calls.append(kwargs) or {})
    assert main(["compress", "--arch", "resnet_20", "--target-latency", value, "--json"]) == 0
    capsys.readouterr()
    assert calls[0]["target_latency"] == value and calls[0]["target_macs"] is None
    assert calls[0]["calibration_distill_steps"] == 0
    assert main(["compress", "--arch", "resnet_20", "--target-macs", "0.5", "--calibration-distill-steps", "5",
                 "--json"]) == 0
    capsys.readouterr()
    assert calls[1]["calibration_distill_steps"] == 5
    with pytest.raises(SystemExit):  # one budget only (argparse says so)
        main(["compress", "--arch", "resnet_20", "--target-latency", value, "--target-macs", "0.5"])
    assert "not allowed with argument --target-latency" in capsys.readouterr().err


def test_target_latency_arguments_are_checked_without_a_model():
    from norton.compress_arguments import check_compress_arguments, resolve_order
    from norton.errors import UserError

    common = dict(compress_rate=None, ratio=None, target_macs=None, criterion="l1", round_to=None,
                  decompose_finetune=None, prune_finetune=None)
    assert resolve_order(None, rank=None, compress_rate=None, ratio=None, target_macs=None,
                         target_latency="5ms") == "auto"
    assert check_compress_arguments(rank=None, order="auto", target_latency="5ms", **common) == {"target_latency": "5ms"}
    with pytest.raises(UserError, match="order 'auto'"):
        check_compress_arguments(rank=None, order="decompose-prune", target_latency=0.5, **common)
    with pytest.raises(UserError, match="no rank"):
        check_compress_arguments(rank=2, order="auto", target_latency=0.5, **common)
    with pytest.raises(UserError, match="one way"):
        check_compress_arguments(rank=None, order="auto", target_latency=0.5, **{**common, "target_macs": 0.5})


def test_prune_prunes_only_and_passes_prune_ranks(monkeypatch):
    """``norton prune --target-macs`` prunes: without the explicit order it would mean auto_compress."""
    import norton.cli.compress
    import norton.cli.prune

    calls = []
    monkeypatch.setattr(norton.cli.prune, "run_compression", lambda **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(norton.cli.prune, "print_summary", lambda *a, **k: None)
    assert main(["prune", "--ckpt", "m.pt", "--target-macs", "0.3"]) == 0
    assert main(["prune", "--ckpt", "m.pt", "--target-macs", "0.3", "--prune-ranks"]) == 0
    assert [(c["order"], c["prune_ranks"]) for c in calls] == [("decompose-prune", False), ("decompose-prune", True)]
    monkeypatch.setattr(norton.cli.compress, "run_compression", lambda **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(norton.cli.compress, "print_summary", lambda *a, **k: None)
    assert main(["compress", "--ckpt", "m.pt", "-r", "2", "--target-macs", "0.3", "--prune-ranks"]) == 0
    assert calls[-1]["prune_ranks"] is True


def test_prune_with_a_macs_target_prunes_and_never_decomposes(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--arch", "resnet_20", "--dataset", "synthetic", "--epochs", "1",
                 "--output", str(base), *QUICK]) == 0
    assert main(["prune", "--ckpt", str(base / "best.pt"), "--target-macs", "0.5", "--epochs", "0",
                 "--criterion", "l1", "--output", str(tmp_path / "p"), "--json", *QUICK]) == 0
    capsys.readouterr()
    model = norton.load(tmp_path / "p" / "compressed.pt")
    assert [step["op"] for step in model.norton_plan] == ["prune"]
