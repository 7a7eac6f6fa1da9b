"""The training checkpoint format (``last.pt``, ``best.pt``) and the run folder's rules.

A training checkpoint is a dict of tensors and plain data, readable with
``torch.load(path, weights_only=True)`` (docs/training.md lists its keys)::

    {"format": "norton.training_checkpoint", "format_version": 1, "epoch", "best", "metrics",
     "recipe", "args", "model": {"architecture", "plan", "state_dict"},
     # last.pt only: what a resume needs
     "best_state_dict", "optimizer", "scheduler", "scaler", "rng", "history"}

The model record is :func:`norton.serialization.model_state`'s, so a checkpoint rebuilds
its model without the code that made it (:func:`model_from_checkpoint`).
"""
from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from norton.errors import UserError
from norton.io import read_torch_file
from norton.plan import plan_of
from norton.serialization import model_from_state, model_state

CHECKPOINT_FORMAT = "norton.training_checkpoint"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- the model and plain data


def model_record(model: nn.Module) -> dict[str, Any]:
    """The model as plain data: ``{"architecture", "plan", "state_dict"}`` (docs/design.md).

    Models built by ``create_model`` get :func:`norton.serialization.model_state`'s record,
    which rebuilds them; a plain ``nn.Module`` gets ``architecture=None`` (weights only).
    """
    if getattr(model, "norton_architecture", None) is not None:
        return model_state(model)
    return {"architecture": None, "plan": plan_of(model), "state_dict": model.state_dict()}


def model_from_record(record: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model described by :func:`model_record` (in training mode, on the CPU)."""
    if record.get("architecture") is None:
        raise UserError("the checkpoint holds weights without an architecture (a plain nn.Module): "
                        "build the model yourself and load checkpoint['model']['state_dict'] into it")
    return model_from_state(record)


def plain(value: Any) -> Any:
    """``value`` as JSON-like plain data (what ``torch.load(weights_only=True)`` accepts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


# --------------------------------------------------------------------------- random generator states


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state on the CPU (the best epoch's weights, kept while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def rng_state() -> dict[str, Any]:
    """This process's random generator states as tensors and plain numbers."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # ("MT19937", keys, ...)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded (CUDA states only on a machine with as many GPUs)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


# --------------------------------------------------------------------------- reading checkpoints


def is_training_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) is a norton training checkpoint."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (``last.pt``/``best.pt``) with ``weights_only=True`` and check its format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check the path")
    checkpoint = read_torch_file(path, map_location=map_location)
    if not is_training_checkpoint(checkpoint):
        raise UserError(f"{path} is not a norton training checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    if checkpoint.get("format_version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by a newer norton (format version {checkpoint['format_version']}): "
                        "upgrade norton to read it")
    return checkpoint


def model_from_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """The model stored in a training checkpoint, given as a path or as the loaded dict.

    ``best.pt`` holds the best epoch's weights, ``last.pt`` the last epoch's.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(checkpoint)
    return model_from_record(checkpoint["model"])


# --------------------------------------------------------------------------- the run folder


def check_output_dir(output_dir: str | os.PathLike | None, *, resume: bool) -> None:
    """``UserError`` unless ``output_dir`` suits a new run (no ``last.pt``) or a resumed one (a ``last.pt``)."""
    if output_dir is None:
        if resume:
            raise UserError("resume needs the output folder of the run to continue")
        return
    last = Path(output_dir).expanduser() / "last.pt"
    if resume and not last.is_file():
        raise UserError(f"nothing to resume: {last} not found; start the run without --resume")
    if not resume and last.exists():
        raise UserError(f"{last.parent} already holds a training run (last.pt): pass --resume to continue it "
                        "or choose another --output")


def check_same_recipe(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """``UserError`` naming the first setting of ``current`` that differs from the checkpoint's."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise UserError(f"cannot resume {path}: it was started with {key}={saved.get(key)!r}, "
                            f"now {key}={value!r}; rerun with the original settings or start a new --output")
