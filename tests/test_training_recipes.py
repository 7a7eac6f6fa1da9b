"""Tests for norton.training.recipes: the recipe's checks, the defaults, the optimiser and the schedule."""
from __future__ import annotations

import dataclasses
import math

import pytest
from torch import nn

from norton.errors import UserError
from norton.training.datasets import build_datasets
from norton.training.loaders import build_loaders
from norton.training.loop import train_one_epoch
from norton.training.recipes import (
    RECIPES,
    TrainingRecipe,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    check_recipe,
    recipe_for,
)


@pytest.mark.parametrize(
    "bad, message",
    [({"lr": 0.0}, "learning rate must be positive"), ({"lr": float("nan")}, "learning rate must be a finite"),
     ({"lr": math.inf}, "learning rate must be a finite"), ({"lr": "0.1"}, "learning rate must be a finite"),
     ({"epochs": 0}, r"epochs must be in \[1, "), ({"epochs": 2.5}, "epochs must be a whole number"),
     ({"epochs": True}, "epochs must be a whole number"), ({"epochs": 10**9}, r"epochs must be in \[1, 100,000\]"),
     ({"momentum": 1.0}, r"momentum must lie in \[0, 1\)"), ({"momentum": -0.1}, "momentum must be >= 0"),
     ({"weight_decay": float("nan")}, "weight decay must be a finite"), ({"warmup_epochs": 5}, "warmup epochs"),
     ({"warmup_start_factor": 0}, "warmup start factor must be positive"),
     ({"label_smoothing": 1.0}, "label smoothing"), ({"amp": "yes"}, "amp must be True or False")],
)
def test_a_bad_setting_is_a_one_line_user_error(bad, message):
    with pytest.raises(UserError, match=message) as error:
        TrainingRecipe(**{"epochs": 2, "lr": 0.1, **bad})
    assert "\n" not in str(error.value)


def test_recipe_defaults_and_replace():
    recipe = TrainingRecipe(epochs=3, lr=0.05)
    assert (recipe.momentum, recipe.weight_decay, recipe.warmup_epochs, recipe.amp) == (0.9, 5e-4, 0.0, False)
    assert recipe.replace(lr=None, epochs=4) == dataclasses.replace(recipe, epochs=4)  # None keeps a field
    with pytest.raises(UserError, match="learning rate"):
        recipe.replace(lr=-1)
    with pytest.raises(TypeError, match="no field"):
        recipe.replace(learning_rate=0.1)
    assert recipe.to_dict()["lr"] == 0.05 and set(recipe.to_dict()) == {f.name for f in dataclasses.fields(recipe)}


def test_recipe_for_picks_the_dataset_group_and_stage():
    assert recipe_for("cifar100") == RECIPES[("cifar", "train")]
    assert recipe_for("fashion-mnist", stage="finetune").epochs == 400
    imagenet = recipe_for("imagenet", stage="finetune")
    assert (imagenet.lr, imagenet.momentum, imagenet.label_smoothing) == (0.01, 0.99, 0.1)
    with pytest.raises(UserError, match="unknown training stage"):
        recipe_for("cifar10", stage="pretrain")


def test_recipe_for_shortens_the_warm_up_of_short_runs_unless_it_is_given():
    assert recipe_for("cifar10", stage="finetune", epochs=10).warmup_epochs == 1.0
    assert recipe_for("cifar10", stage="finetune", epochs=1).warmup_epochs == pytest.approx(0.1)
    assert recipe_for("cifar10", stage="finetune", epochs=10, warmup_epochs=3).warmup_epochs == 3
    assert recipe_for("cifar10", stage="finetune").warmup_epochs == 5
    with pytest.raises(UserError, match="epochs must be in"):
        recipe_for("cifar10", stage="finetune", epochs=0)


def test_check_recipe_ignores_other_keys_and_needs_epochs_and_lr():
    assert check_recipe(epochs=2, lr=0.1, seed=3) == TrainingRecipe(epochs=2, lr=0.1)
    with pytest.raises(UserError, match="needs epochs and lr"):
        check_recipe(lr=0.1)


def test_warmup_cosine_factor():
    factor = WarmupCosine(total_steps=110, warmup_steps=10, start_factor=0.01)
    assert factor(0) == pytest.approx(0.01) and factor(5) == pytest.approx(0.505)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
    after = [factor(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert WarmupCosine(total_steps=4)(0) == 1.0  # no warm-up: start at the full rate


def test_scheduler_steps_per_iteration():
    loaders = build_loaders(build_datasets("synthetic", limit=96, val_size=40), batch_size=32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimizer = build_optimizer(model, lr=0.2)
    scheduler = build_scheduler(optimizer, epochs=2, steps_per_epoch=len(loaders.train), warmup_epochs=1)
    metrics = train_one_epoch(model, loaders.train, optimizer, scheduler, device="cpu", progress=False)
    assert scheduler.last_epoch == len(loaders.train) == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)  # warm-up over, cosine at its start
    assert metrics["samples"] == 96 and metrics["lr"] == pytest.approx(0.2 * (0.01 + 0.99 * 2 / 3))
