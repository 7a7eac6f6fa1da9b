"""``norton train`` and ``norton evaluate`` through ``norton.cli.main.main``: exit codes and output."""
from __future__ import annotations

import json
import re

import pytest
import torch

from norton.cli.main import main
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
        (["--lr", "-1"], "learning rate must be a positive number"),
        (["--epochs", "0"], "epochs must be a whole number"),
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
