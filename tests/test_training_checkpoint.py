"""Tests for norton.training.checkpoint: reading checkpoints, rebuilding models, random states, run folders."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from norton.errors import UserError
from norton.models import create_model
from norton.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_output_dir,
    is_training_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    model_record,
    plain,
    rng_state,
    set_rng_state,
)


def checkpoint_of(model: nn.Module, **extra) -> dict:
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": model_record(model), **extra}


def test_a_zoo_model_is_rebuilt_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet_20")
    torch.save(checkpoint_of(model, epoch=3), tmp_path / "best.pt")
    assert is_training_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    rebuilt = model_from_checkpoint(tmp_path / "best.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_plain_module_checkpoint_cannot_be_rebuilt(tmp_path):
    torch.save(checkpoint_of(nn.Linear(2, 2)), tmp_path / "best.pt")
    with pytest.raises(UserError, match="without an architecture"):
        model_from_checkpoint(tmp_path / "best.pt")


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read .*garbage.pt as a PyTorch file"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a norton training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="newer norton"):
        load_checkpoint(tmp_path / "new.pt")


def test_checkpoints_refuse_code(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT, "model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="objects other than tensors"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_rng_state_round_trip_restores_every_generator():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_plain_makes_loadable_data(tmp_path):
    value = plain({"path": tmp_path, "device": torch.device("cpu"), "items": (1, 2.5, None), 3: object})
    assert value["path"] == str(tmp_path) and value["device"] == "cpu" and value["items"] == [1, 2.5, None]
    assert value["3"].startswith("<class")


def test_check_output_dir(tmp_path):
    check_output_dir(None, resume=False)
    check_output_dir(tmp_path, resume=False)
    with pytest.raises(UserError, match="resume needs the output folder"):
        check_output_dir(None, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        check_output_dir(tmp_path, resume=True)
    (tmp_path / "last.pt").write_bytes(b"")
    check_output_dir(tmp_path, resume=True)
    with pytest.raises(UserError, match="already holds a training run"):
        check_output_dir(tmp_path, resume=False)
