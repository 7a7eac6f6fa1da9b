"""``norton train`` and ``norton evaluate`` through ``norton.cli.main.main``: exit codes and output."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

import norton
import norton.training.readers as readers
from _training_files import FASHION_STEMS, make_fashion
from norton.cli.main import build_parser, main
from norton.models import create_model

# A torchvision classifier that is cheap at 32x32: seconds per run on a CPU.
FAST = ["--arch", "torchvision.mobilenet_v3_small", "--dataset", "synthetic", "--limit", "16",
        "--batch_size", "8", "--workers", "0", "--device", "cpu"]


def train(tmp_path, *extra, capsys=None):
    return main(["train", *FAST, "--epochs", "1", "--lr", "0.05", "--output", str(tmp_path / "run"), *extra])


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_train_then_evaluate_the_best_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "result.json"}
    assert summary["arch"] == "torchvision.mobilenet_v3_small" and summary["test"]["samples"] == 16
    assert summary["recipe"]["epochs"] == 1 and summary["recipe"]["lr"] == 0.05
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["args"]["dataset"] == "synthetic" and checkpoint["args"]["limit"] == 16

    # The checkpoint remembers its dataset; the same 16 test images give the same accuracy.
    assert main(["evaluate", "--ckpt", str(run / "best.pt"), "--limit", "16", "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3})", out)
    assert match, out
    assert float(match.group(1)) == pytest.approx(summary["test"]["top1"], abs=1e-3)
    assert "synthetic test (16 images)" in out

    assert main(["evaluate", "--ckpt", str(run / "best.pt"), "--split", "val", "--limit", "16", "--workers", "0",
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and report["samples"] == 16
    assert report["top1"] == pytest.approx(summary["best_val_top1"])  # the validation images of training


def test_train_fine_tunes_a_model_file_on_its_own_dataset(tmp_path, capsys):
    assert train(tmp_path) == 0
    capsys.readouterr()
    assert main(["train", "--ckpt", str(tmp_path / "run" / "best.pt"), "--limit", "16", "--batch_size", "8",
                 "--workers", "0", "--device", "cpu", "--epochs", "1", "--output", str(tmp_path / "tuned"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stage"] == "finetune" and summary["dataset"] == "synthetic"
    # The fine-tuning recipe, its 5 warm-up epochs cut to a tenth of the single epoch asked for.
    assert (summary["recipe"]["lr"], summary["recipe"]["warmup_epochs"]) == (0.05, 0.1)
    assert summary["arch"] == "torchvision.mobilenet_v3_small"


def test_rerun_needs_resume_and_the_same_recipe(tmp_path, capsys):
    assert train(tmp_path) == 0
    assert "* Acc@1" in capsys.readouterr().out
    assert train(tmp_path) == 2
    assert "already holds a training run" in last_error(capsys)
    assert main(["train", *FAST, "--epochs", "2", "--lr", "0.05", "--output", str(tmp_path / "run"), "--resume"]) == 2
    assert "started with epochs=1, now epochs=2" in last_error(capsys)
    assert train(tmp_path, "--resume") == 0  # a finished run: only the final test evaluation again


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "learning rate must be positive"),
        (["--epochs", "0"], "epochs must be in [1, 100,000], got 0"),
        (["--dataset", "cifar10", "--data_dir", "{tmp}/nothing"], "CIFAR-10 not found in"),
        (["--limit", "0"], "limit must be a positive number"),
        (["--arch", "resnet_9000"], "unknown model 'resnet_9000'"),
    ],
)
def test_train_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", *FAST, "--output", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("norton train: error: ") and message in err[0]


def test_train_needs_a_model(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--output", str(tmp_path)]) == 2
    assert "give --arch" in last_error(capsys)


def test_evaluate_checkpoint_errors(tmp_path, capsys):
    assert main(["evaluate", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in last_error(capsys)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert main(["evaluate", "--ckpt", str(tmp_path / "text.pt")]) == 2
    assert "cannot read" in last_error(capsys)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "bare.pt")
    assert main(["evaluate", "--ckpt", str(tmp_path / "bare.pt")]) == 2
    assert "--arch, -r and -cpr" in last_error(capsys)


def test_evaluate_a_reference_format_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("resnet_56")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from nn.DataParallel
    torch.save({"state_dict": state, "rank": 0, "compress_rate": "[0.]*100"}, tmp_path / "resnet_56.pt")
    common = ["--ckpt", str(tmp_path / "resnet_56.pt"), "--dataset", "synthetic", "--limit", "8",
              "--workers", "0", "--device", "cpu"]
    assert main(["evaluate", "--arch", "resnet_56", *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "resnet_56" and report["samples"] == 8 and 0 <= report["top1"] <= 100
    assert main(["evaluate", "--arch", "resnet_56", "-r", "2", *common]) == 2
    assert "error:" in last_error(capsys)


def test_evaluate_rejects_a_dataset_the_model_does_not_fit(tmp_path, capsys):
    assert train(tmp_path) == 0
    capsys.readouterr()
    fake = tmp_path / "cifar-100-python"
    fake.mkdir()
    import pickle

    import numpy as np

    for name in ("train", "test"):
        with open(fake / name, "wb") as handle:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]}, handle)
    assert main(["evaluate", "--ckpt", str(tmp_path / "run" / "best.pt"), "--dataset", "cifar100",
                 "--data_dir", str(tmp_path), "--val_size", "1", "--workers", "0", "--device", "cpu"]) == 2
    assert "cifar100 has 100 classes" in last_error(capsys)


def test_debug_flag_shows_the_exception_instead_of_one_line(tmp_path):
    from norton.errors import UserError

    with pytest.raises(UserError, match="not found"):
        main(["--debug", "evaluate", "--ckpt", str(tmp_path / "missing.pt")])


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_diverging_run_exits_non_zero_with_one_line_and_valid_json(tmp_path, capsys):
    # lr 1e6: the training loss stays finite (~1e12) but the validation loss is NaN.
    assert main(["train", *FAST, "--epochs", "2", "--lr", "1e6", "--output", str(tmp_path / "run"), "--json"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("norton train: error: training diverged in epoch 1: ")
    assert err[0].endswith("lower --lr (it is 1e+06)") and captured.out == ""
    [line] = [strict_json(text) for text in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert line["kind"] == "diverged" and line["val_loss"] is None and not (tmp_path / "run" / "result.json").exists()


def test_a_good_run_writes_strict_json(tmp_path, capsys):
    assert train(tmp_path, "--json") == 0
    run = tmp_path / "run"
    summary = strict_json(capsys.readouterr().out)
    assert strict_json((run / "result.json").read_text())["best_epoch"] == summary["best_epoch"] == 1
    assert [strict_json(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()] == ["epoch", "test"]


@pytest.mark.parametrize(
    "argv, message",
    [(["--lr", "nan"], "learning rate must be a finite number, got nan"),
     (["--lr", "inf"], "learning rate must be a finite number, got inf"),
     (["--epochs", "0"], "epochs must be in [1, 100,000], got 0"),
     (["--momentum", "1"], "momentum must lie in [0, 1)"),
     (["--warmup_epochs", "-1"], "warmup epochs must be >= 0"),
     (["--batch_size", "0"], "batch_size must be at least 1"),
     (["--workers", "-1"], "workers must be 0 or more"),
     (["--limit", "0"], "limit must be a positive number"),
     (["--val_size", "-2"], "val_size must be 0 or a positive number"),
     (["--distill-alpha", "0.5"], "--distill-alpha applies to knowledge distillation: add --teacher FILE or drop it"),
     (["--teacher", "t.pt", "--distill-alpha", "2"], "distillation alpha is the weight of the teacher's term and "
                                                      "must lie in [0, 1], got 2.0"),
     (["--teacher", "t.pt", "--distill-temperature", "-1"], "distillation temperature must be positive, got -1.0")],
)
@pytest.mark.parametrize("model", [["--arch", "resnet_20"], ["--ckpt", "{tmp}/missing.pt"]])
def test_bad_options_are_refused_before_any_file_or_data_is_read(tmp_path, capsys, argv, message, model):
    # The data folder and the model file do not exist: the option's own error must come first.
    model = [a.replace("{tmp}", str(tmp_path)) for a in model]
    command = ["train", *model, "--dataset", "cifar10", "--data_dir", str(tmp_path / "no-data"),
               "--output", str(tmp_path / "run"), "--device", "cpu", *argv]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def system_fashion(tmp_path, monkeypatch):
    """A stand-in for Debian's Fashion-MNIST with 40 training images, so using it would be visible."""
    folder = make_fashion(tmp_path / "system", n_train=40, n_test=10)
    monkeypatch.setattr(readers, "DEBIAN_FASHION_MNIST", folder)
    monkeypatch.setattr(readers, "DEFAULT_DATA_DIR", tmp_path / "no-home-data")
    return folder


def fashion_train(tmp_path, data_dir) -> int:
    extra = [] if data_dir is None else ["--data_dir", str(data_dir)]
    return main(["train", "--arch", "resnet_20", "--dataset", "fashion-mnist", *extra, "--val_size", "2",
                 "--batch_size", "8", "--workers", "0", "--device", "cpu", "--epochs", "1", "--lr", "0.05",
                 "--output", str(tmp_path / "run"), "--json", "--no-progress"])


@pytest.mark.parametrize("state", ["missing", "empty", "incomplete"])
def test_fashion_mnist_data_dir_is_used_or_refused_never_replaced(tmp_path, capsys, system_fashion, state):
    data_dir = tmp_path / "mine"
    if state == "empty":
        data_dir.mkdir()
    if state == "incomplete":
        make_fashion(data_dir)
        (data_dir / f"{FASHION_STEMS[3]}.gz").unlink()
    assert fashion_train(tmp_path, data_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"missing": "mine does not exist", "empty": "mine holds no Fashion-MNIST idx files",
                "incomplete": f"is incomplete: {FASHION_STEMS[3]}[.gz] is missing"}[state]
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_fashion_mnist_data_dir_given_or_not(tmp_path, capsys, system_fashion):
    make_fashion(tmp_path / "mine", n_train=12, n_test=5)
    assert fashion_train(tmp_path / "a", tmp_path / "mine") == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["train_samples"] == 10  # 12 - 2 held out
    assert fashion_train(tmp_path / "b", None) == 0  # no --data_dir: the system copy
    assert json.loads(capsys.readouterr().out)["history"][0]["train_samples"] == 38


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_commands_leave_the_parsed_options_unchanged(tmp_path, capsys, command):
    assert train(tmp_path) == 0
    capsys.readouterr()
    argv = {"train": ["train", *FAST, "--epochs", "1", "--lr", "0.05", "--output", str(tmp_path / "two")],
            "evaluate": ["evaluate", "--ckpt", str(tmp_path / "run" / "best.pt"), "--limit", "8", "--workers", "0",
                         "--device", "cpu"]}[command]
    args = build_parser().parse_args(argv)
    before = copy.deepcopy({k: v for k, v in vars(args).items() if k != "func"})
    assert args.func(args) == 0
    assert {k: v for k, v in vars(args).items() if k != "func"} == before
    if command == "evaluate":
        assert args.seed is None  # still "not given", not the checkpoint's seed


def test_evaluate_refuses_bad_options_before_reading_the_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--ckpt", str(tmp_path / "missing.pt"), "--batch_size", "0"]) == 2
    assert "batch_size must be at least 1" in last_error(capsys)


def test_evaluate_json_is_strict_even_for_a_nan_model(tmp_path, capsys):
    assert train(tmp_path) == 0
    capsys.readouterr()
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    state = best["model"]["state_dict"]
    key = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
    state[key] = torch.full_like(state[key], math.nan)
    torch.save(best, tmp_path / "nan.pt")
    assert main(["evaluate", "--ckpt", str(tmp_path / "nan.pt"), "--limit", "8", "--workers", "0",
                 "--device", "cpu", "--json"]) == 0
    assert strict_json(capsys.readouterr().out)["loss"] is None


def test_train_distils_from_a_teacher_file_and_refuses_a_teacher_of_other_classes(tmp_path, capsys):
    assert train(tmp_path) == 0
    capsys.readouterr()
    best = str(tmp_path / "run" / "best.pt")
    tune = ["train", "--ckpt", best, "--limit", "16", "--batch_size", "8", "--workers", "0", "--device", "cpu",
            "--epochs", "1", "--output", str(tmp_path / "kd")]
    assert main([*tune, "--teacher", best, "--distill-alpha", "0.7", "--distill-temperature", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["teacher"] == best
    assert (summary["recipe"]["distill_alpha"], summary["recipe"]["distill_temperature"]) == (0.7, 2.0)
    assert [record["train_loss_kind"] for record in summary["history"]] == ["distillation"]
    last = torch.load(tmp_path / "kd" / "last.pt", weights_only=True)
    assert (last["recipe"]["distill_alpha"], last["args"]["teacher"]) == (0.7, best)
    # resuming with another temperature is refused in one line
    assert main([*tune, "--teacher", best, "--distill-alpha", "0.7", "--resume"]) == 2
    assert "started with distill_temperature=2.0, now distill_temperature=4.0" in last_error(capsys)

    # a teacher with 100 classes for a 10-class student: one line, before any training
    other = tmp_path / "other.pt"
    norton.save(create_model("resnet_20", num_classes=100), other)
    tune[-1] = str(tmp_path / "wrong")
    assert main([*tune, "--teacher", str(other)]) == 2
    assert last_error(capsys) == ("norton train: error: the teacher gives scores of shape (2, 100) but the student "
                                  "(2, 10): distil from a teacher trained on the same classes")
    assert not (tmp_path / "wrong" / "last.pt").exists()
    assert main([*tune, "--teacher", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in last_error(capsys)
