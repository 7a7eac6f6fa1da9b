"""Tests for norton.training.loop: metrics on known answers, fit, its files, resume and divergence."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from norton.errors import UserError
from norton.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint
from norton.training.datasets import build_datasets
from norton.training.loaders import build_loaders
from norton.training.loop import evaluate, fit, train_one_epoch
from norton.training.recipes import TrainingRecipe, build_optimizer


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


def test_evaluate_moves_the_model_to_the_device_and_to_eval_mode():
    class Recording(ScoreTable):
        def to(self, *args, **kwargs):
            self.moved_to = args
            return super().to(*args, **kwargs)

    model = Recording(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).train()
    loader = DataLoader(TensorDataset(torch.arange(2), torch.tensor([0, 1])), batch_size=2)
    evaluate(model, loader, device="cpu")
    assert model.moved_to == (torch.device("cpu"),) and not model.training


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


def strict_json_lines(path) -> list[dict]:
    """The lines of a .jsonl file, refusing NaN and Infinity (not JSON)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_with_one_line_and_valid_json(loaders, tmp_path):
    with pytest.raises(UserError, match=r"^training diverged in epoch 1: the training loss is nan; lower --lr "
                                        r"\(it is 1e\+30\)$"):
        fit(tiny_cnn(), loaders, epochs=2, lr=1e30, output_dir=tmp_path, verbose=False)
    [line] = strict_json_lines(tmp_path / "metrics.jsonl")
    assert line["kind"] == "diverged" and line["epoch"] == 1 and line["train_loss"] is None
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "result.json").exists()


class NanAfterOneEpoch(nn.Module):
    """Trains like ``tiny_cnn``, but once an epoch has completed it scores NaN in eval mode:
    from epoch 2 on, a finite training loss and a NaN validation loss.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()
        self.epochs_done = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.net(x)
        return scores if self.training or self.epochs_done == 0 else scores * math.nan


def test_a_nan_validation_loss_stops_the_run_after_the_last_good_checkpoint(loaders, tmp_path):
    model = NanAfterOneEpoch()

    def count(record: dict) -> None:
        model.epochs_done = record["epoch"]

    with pytest.raises(UserError, match=r"training diverged in epoch 2: the validation loss is nan; lower --lr "
                                        r"\(it is 0.05\) and start a new --output"):
        fit(model, loaders, epochs=3, lr=0.05, output_dir=tmp_path, verbose=False, callbacks=[count])
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    assert [(line["kind"], line["epoch"]) for line in lines] == [("epoch", 1), ("diverged", 2)]
    assert lines[1]["val_loss"] is None and math.isfinite(lines[1]["train_loss"])
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_without_validation_non_finite_weights_stop_the_run():
    loaders = build_loaders(build_datasets("synthetic", limit=32, val_size=0), batch_size=16)
    model = tiny_cnn()
    model.register_parameter("unused", nn.Parameter(torch.full((2,), math.inf)))
    with pytest.raises(UserError, match="training diverged in epoch 1: parameter unused holds non-finite values"):
        fit(model, loaders, epochs=1, lr=0.05, verbose=False)


def test_fit_takes_a_recipe_and_keyword_overrides(loaders, tmp_path):
    recipe = TrainingRecipe(epochs=5, lr=0.5, warmup_epochs=1)
    fit(tiny_cnn(), loaders, recipe, epochs=1, lr=0.05, warmup_epochs=0, output_dir=tmp_path, verbose=False)
    saved = load_checkpoint(tmp_path / "last.pt")["recipe"]
    assert (saved["epochs"], saved["lr"], saved["warmup_epochs"], saved["momentum"]) == (1, 0.05, 0, 0.9)
    with pytest.raises(UserError, match="fit needs a recipe, or epochs= and lr="):
        fit(tiny_cnn(), loaders, epochs=1)


def test_without_validation_the_last_epoch_is_best(tmp_path):
    loaders = build_loaders(build_datasets("synthetic", limit=32, val_size=0), batch_size=16)
    result = fit(tiny_cnn(), loaders, epochs=2, lr=0.05, verbose=False)
    assert result.best_epoch == 2 and result.best_val_top1 is None
    assert all(record["val_top1"] is None for record in result.history)


def test_plain_module_checkpoint_cannot_be_rebuilt(loaders, tmp_path):
    fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path, verbose=False)
    with pytest.raises(UserError, match="without an architecture"):
        model_from_checkpoint(tmp_path / "best.pt")


def test_amp_on_cpu_warns_and_trains_in_float32(loaders):
    with pytest.warns(UserWarning, match="amp"):
        result = fit(tiny_cnn(), loaders, epochs=1, lr=0.05, amp=True, device="cpu", verbose=False)
    assert math.isfinite(result.history[0]["train_loss"])


def frozen_teacher() -> nn.Module:
    return tiny_cnn(seed=5).eval()


def test_a_distilled_run_resumes_to_the_result_of_an_uninterrupted_one(loaders, tmp_path):
    settings = {"epochs": 3, "lr": 0.05, "seed": 7, "verbose": False, "distill_alpha": 0.7, "distill_temperature": 3.0}
    straight = tiny_cnn(seed=0)
    expected = fit(straight, loaders, output_dir=tmp_path / "straight", teacher=frozen_teacher(), **settings)
    plain = fit(tiny_cnn(seed=0), loaders, **{**settings, "distill_alpha": None, "distill_temperature": None})
    assert expected.history[0]["train_loss"] != plain.history[0]["train_loss"]  # the teacher changed the loss
    assert load_checkpoint(tmp_path / "straight" / "last.pt")["recipe"]["distill_alpha"] == 0.7

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cnn(seed=0), loaders, output_dir=tmp_path / "killed", teacher=frozen_teacher(),
            callbacks=[StopAfter(1)], **settings)
    resumed = tiny_cnn(seed=123)
    result = fit(resumed, loaders, output_dir=tmp_path / "killed", resume=True, teacher=frozen_teacher(), **settings)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(result.history) == strip(expected.history) and result.test == expected.test


def test_a_distilled_run_resumes_only_with_the_same_teacher_settings(loaders, tmp_path):
    fit(tiny_cnn(), loaders, epochs=1, lr=0.05, teacher=frozen_teacher(), distill_temperature=2.0,
        output_dir=tmp_path / "kd", verbose=False)
    common = {"epochs": 1, "lr": 0.05, "resume": True, "verbose": False}
    with pytest.raises(UserError, match=r"^cannot resume .*: it was started with distill_temperature=2.0, now "
                                        r"distill_temperature=4.0; rerun with the original settings"):
        fit(tiny_cnn(), loaders, teacher=frozen_teacher(), output_dir=tmp_path / "kd", **common)
    with pytest.raises(UserError, match="started with distill_alpha=0.5, now distill_alpha=0.9"):
        fit(tiny_cnn(), loaders, teacher=frozen_teacher(), distill_alpha=0.9, distill_temperature=2.0,
            output_dir=tmp_path / "kd", **common)
    with pytest.raises(UserError, match=r"it was trained with a teacher \(knowledge distillation\), now without"):
        fit(tiny_cnn(), loaders, distill_temperature=2.0, output_dir=tmp_path / "kd", **common)
    fit(tiny_cnn(), loaders, epochs=1, lr=0.05, output_dir=tmp_path / "plain", verbose=False)
    with pytest.raises(UserError, match="it was trained without a teacher .*, now with"):
        fit(tiny_cnn(), loaders, teacher=frozen_teacher(), output_dir=tmp_path / "plain", **common)
    # a run without a teacher records no distillation settings, so other values do not block its resume
    assert load_checkpoint(tmp_path / "plain" / "last.pt")["recipe"]["distill_alpha"] is None
    fit(tiny_cnn(), loaders, distill_alpha=0.1, output_dir=tmp_path / "plain", **common)


# ------------------------------------------------------------------ training forms of CPDBlocks
def cpd_cnn(seed: int = 0) -> nn.Module:
    from norton.decomposition.cpd_block import CPDBlock

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        CPDBlock(8, 16, 2, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        CPDBlock(16, 16, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def test_cpd_blocks_train_in_the_dense_form_with_the_same_result_and_are_switched_back(loaders):
    from norton.decomposition.cpd_block import CPDBlock
    from norton.deploy.forms import set_training_form

    settings = {"epochs": 2, "lr": 0.05, "seed": 3, "verbose": False}
    written = cpd_cnn()
    fit(written, loaders, training_form=None, **settings)
    model = cpd_cnn()
    set_training_form(model[7], "grouped")  # a form chosen before (optimize_for_training) is kept
    seen = []
    fit(model, loaders, callbacks=[lambda record: seen.append(
        (type(model[4]).__name__, getattr(model[4], "training_form", "cpd"), model[7].training_form))], **settings)
    assert seen == [("TrainingFormCPDBlock", "dense", "grouped")] * 2
    assert type(model[4]) is CPDBlock and model[7].training_form == "grouped"  # only fit's own switch is undone
    for key, value in written.state_dict().items():  # the same function and gradients: the same training
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-3, atol=1e-4)


def test_a_killed_run_leaves_its_blocks_as_written_and_a_bad_form_is_refused(loaders, tmp_path):
    from norton.decomposition.cpd_block import CPDBlock

    model = cpd_cnn()
    with pytest.raises(KeyboardInterrupt):
        fit(model, loaders, epochs=2, lr=0.05, verbose=False, callbacks=[StopAfter(1)])
    assert all(type(m) is CPDBlock for m in (model[4], model[7]))
    with pytest.raises(UserError, match="unknown training_form 'fast'"):
        fit(model, loaders, epochs=1, lr=0.05, training_form="fast")
