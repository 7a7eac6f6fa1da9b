"""Tests for norton.training.loop: metrics on known answers, the schedule, fit, checkpoints and resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from norton.errors import UserError
from norton.training.data import build_datasets, build_loaders
from norton.training.loop import (
    CHECKPOINT_FORMAT,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    load_checkpoint,
    model_from_checkpoint,
    train_one_epoch,
)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def loaders():
    return build_loaders(build_datasets("synthetic", limit=96, val_size=40), batch_size=32)


class ScoreTable(nn.Module):
    """Returns row ``i`` of a fixed score table for input ``i``: a model with known predictions."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scores", scores)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.scores[index]


def test_evaluate_counts_top1_and_top5_exactly():
    # 6 classes; sample i ranks the classes 0 > 1 > ... > 5.
    scores = torch.arange(6, 0, -1, dtype=torch.float32).repeat(4, 1)  # (4, 6)
    labels = torch.tensor([0, 4, 5, 2])  # hits: top-1 for sample 0; top-5 for samples 0, 1, 3
    loader = DataLoader(TensorDataset(torch.arange(4), labels), batch_size=3)
    metrics = evaluate(ScoreTable(scores), loader, device="cpu")
    assert metrics["top1"] == pytest.approx(25.0) and metrics["top5"] == pytest.approx(75.0)
    expected_loss = nn.functional.cross_entropy(scores, labels).item()
    assert metrics["loss"] == pytest.approx(expected_loss) and metrics["samples"] == 4


def test_evaluate_with_fewer_than_five_classes_uses_all_of_them():
    loader = DataLoader(TensorDataset(torch.arange(2), torch.tensor([0, 1])), batch_size=2)
    metrics = evaluate(ScoreTable(torch.tensor([[1.0, 0.0], [1.0, 0.0]])), loader, device="cpu")
    assert (metrics["top1"], metrics["top5"]) == (50.0, 100.0)


def test_warmup_cosine_factor():
    factor = WarmupCosine(total_steps=110, warmup_steps=10, start_factor=0.01)
    assert factor(0) == pytest.approx(0.01) and factor(5) == pytest.approx(0.505)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
    after = [factor(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert WarmupCosine(total_steps=4)(0) == 1.0  # no warm-up: start at the full rate


def test_scheduler_steps_per_iteration(loaders):
    model = tiny_cnn()
    optimizer = build_optimizer(model, lr=0.2)
    scheduler = build_scheduler(optimizer, epochs=2, steps_per_epoch=len(loaders.train), warmup_epochs=1)
    metrics = train_one_epoch(model, loaders.train, optimizer, scheduler, device="cpu", progress=False)
    assert scheduler.last_epoch == len(loaders.train) == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)  # warm-up over, cosine at its start
    assert metrics["samples"] == 96 and metrics["lr"] == pytest.approx(0.2 * (0.01 + 0.99 * 2 / 3))


def test_train_one_epoch_lowers_the_loss(loaders):
    model = tiny_cnn()
    optimizer = build_optimizer(model, lr=0.05)
    before = evaluate(model, loaders.train, device="cpu")["loss"]
    for _ in range(3):
        train_one_epoch(model, loaders.train, optimizer, None, device="cpu", progress=False)
    assert evaluate(model, loaders.train, device="cpu")["loss"] < before


def test_fit_writes_metrics_and_self_describing_checkpoints(loaders, tmp_path):
    model = tiny_cnn()
    result = fit(model, loaders, epochs=2, lr=0.05, output_dir=tmp_path, verbose=False, args={"note": "x"})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["epoch", "epoch", "test"]
    assert [line["val_samples"] for line in lines[:2]] == [40, 40] and lines[2]["test_samples"] == 96
    best_line = max(lines[:2], key=lambda line: line["val_top1"])
    assert result.best_epoch == best_line["epoch"] and result.best_val_top1 == best_line["val_top1"]

    last = torch.load(tmp_path / "last.pt", weights_only=True)  # plain data and tensors only
    assert last["format"] == CHECKPOINT_FORMAT and last["epoch"] == 2 and last["args"] == {"note": "x"}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "best", "history", "recipe"} <= set(last)
    assert set(last["model"]) >= {"architecture", "plan", "state_dict"}
    assert isinstance(last["rng"]["torch"], torch.Tensor)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == result.best_epoch
    # fit leaves the model holding the best epoch's weights; the test metrics are theirs.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, best["model"]["state_dict"][key])
    assert result.test == pytest.approx(evaluate(model, loaders.test, device="cpu"))
    assert json.loads((tmp_path / "result.json").read_text())["best_epoch"] == result.best_epoch


class StopAfter:
    """A callback that kills the run after ``epoch`` (after its checkpoints are written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, record: dict) -> None:
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resume_gives_the_result_of_an_uninterrupted_run(loaders, tmp_path):
    settings = {"epochs": 3, "lr": 0.05, "warmup_epochs": 1, "seed": 7, "verbose": False}
    straight = tiny_cnn(seed=0)
    expected = fit(straight, loaders, output_dir=tmp_path / "straight", **settings)

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cnn(seed=0), loaders, output_dir=tmp_path / "killed", callbacks=[StopAfter(1)], **settings)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1
    resumed = tiny_cnn(seed=123)  # its own initial weights are overwritten by last.pt
    result = fit(resumed, loaders, output_dir=tmp_path / "killed", resume=True, **settings)

    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(result.history) == strip(expected.history)
    assert result.test == expected.test and result.best_epoch == expected.best_epoch
    last_straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]["state_dict"]
    last_resumed = load_checkpoint(tmp_path / "killed" / "last.pt")["model"]["state_dict"]
    for key, value in last_straight.items():
        torch.testing.assert_close(last_resumed[key], value, rtol=0, atol=1e-6)
    epochs_logged = [json.loads(line).get("epoch") for line in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert epochs_logged == [1, 2, 3, expected.best_epoch]


def test_resume_refuses_a_different_recipe_or_a_missing_run(loaders, tmp_path):
    fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path, verbose=False)
    with pytest.raises(UserError, match="started with lr=0.05, now lr=0.1"):
        fit(tiny_cnn(), loaders, epochs=1, lr=0.1, output_dir=tmp_path, resume=True, verbose=False)
    with pytest.raises(UserError, match="already holds a training run"):
        fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path, verbose=False)
    with pytest.raises(UserError, match="not found"):
        fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path / "new", resume=True, verbose=False)


def test_resume_refuses_a_different_model(loaders, tmp_path):
    fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path, verbose=False)
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(UserError, match="holds a different model"):
        fit(other, loaders, epochs=1, lr=0.05, output_dir=tmp_path, resume=True, verbose=False)


@pytest.mark.parametrize(
    "bad, message",
    [({"lr": 0.0}, "learning rate"), ({"lr": float("nan")}, "learning rate"), ({"epochs": 0}, "epochs"),
     ({"momentum": 1.0}, "momentum"), ({"warmup_epochs": 5}, "warmup"), ({"label_smoothing": 1.0}, "smoothing")],
)
def test_fit_rejects_bad_hyperparameters(loaders, bad, message):
    settings = {"epochs": 2, "lr": 0.1, **bad}
    with pytest.raises(UserError, match=message):
        fit(tiny_cnn(), loaders, **settings)


def test_diverging_training_is_a_user_error(loaders):
    with pytest.raises(UserError, match="diverged"):
        fit(tiny_cnn(), loaders, epochs=1, lr=1e30, verbose=False)


def test_without_validation_the_last_epoch_is_best(tmp_path):
    loaders = build_loaders(build_datasets("synthetic", limit=32, val_size=0), batch_size=16)
    result = fit(tiny_cnn(), loaders, epochs=2, lr=0.05, verbose=False)
    assert result.best_epoch == 2 and result.best_val_top1 is None
    assert all(record["val_top1"] is None for record in result.history)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a norton training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_plain_module_checkpoint_cannot_be_rebuilt(loaders, tmp_path):
    fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path, verbose=False)
    with pytest.raises(UserError, match="without an architecture"):
        model_from_checkpoint(tmp_path / "best.pt")


def test_amp_on_cpu_warns_and_trains_in_float32(loaders):
    with pytest.warns(UserWarning, match="amp"):
        result = fit(tiny_cnn(), loaders, epochs=1, lr=0.05, amp=True, device="cpu", verbose=False)
    assert math.isfinite(result.history[0]["train_loss"])
