"""Prune records: what a structural prune removed, as plain JSON data, and how to replay it.

A record lists, per layer name, the output channels removed (``"removed"``) and
the input channels removed (``"removed_inputs"``), as indices into the layer's
channels *before* the prune::

    {"op": "prune",
     "removed": {"features.conv0": [3, 17], "features.norm0": [3, 17]},
     "removed_inputs": {"features.conv1": [3, 17]},
     "criterion": "pabs", "amount": {"ratio": 0.5}}

``"calibration_images": n`` says the weights were then refitted on ``n`` calibration
images (``prune(calibration=...)``); it is informational, replay does not use it.

Every affected layer is listed (convolutions, CPDBlocks, batch norms, depthwise
convolutions, linear layers), so :func:`replay_prune` is plain slicing: it needs
no dependency graph, no example input and no criterion, and it rebuilds the
same structure on a freshly built model before a state dict loads.

Importing this module registers the ``"prune"`` operation in :mod:`norton.plan`
(its record check, replay, one-line description and example).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from norton.errors import UserError
from norton.limits import MAX_RECORD_INDICES, MAX_STEPS, check_int
from norton.plan import PlanOperation, append_record, record_original, register_operation
from norton.pruning.surgery import IN, OUT, kept_indices, layer_pruner, side_sizes

PRUNE_OP = "prune"
_INDEX_FIELDS = (("removed", OUT), ("removed_inputs", IN))


# ------------------------------------------------------------------ the record
class RemovalLog:
    """Removed channels per (layer, side) in the coordinates the layers had when the log started.

    Pruning in several steps (iterative schedules, concatenations pruned group by
    group) removes indices relative to the layer's current width; the log maps
    them back so one record describes the whole prune.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], Tensor] = {}  # original indices still present
        self._size: dict[tuple[str, str], int] = {}

    def remove(self, name: str, side: str, current_size: int, idxs: Sequence[int]) -> None:
        key = (name, side)
        if key not in self._kept:
            self._kept[key] = torch.arange(current_size)
            self._size[key] = current_size
        kept = self._kept[key]
        mask = torch.ones(kept.numel(), dtype=torch.bool)
        mask[torch.as_tensor(list(idxs), dtype=torch.long)] = False
        self._kept[key] = kept[mask]

    def removed(self, side: str) -> dict[str, list[int]]:
        """``{layer name: sorted removed original indices}`` for one side."""
        out = {}
        for (name, key_side), kept in self._kept.items():
            if key_side != side:
                continue
            removed = kept_indices(self._size[(name, side)], kept.tolist())  # complement of the kept ones
            if removed.numel():
                out[name] = removed.tolist()
        return out

    def record(self, **info: Any) -> dict[str, Any]:
        """The plain-data ``{"op": "prune", ...}`` record; ``info`` adds descriptive fields."""
        return {"op": PRUNE_OP, "removed": self.removed(OUT), "removed_inputs": self.removed(IN), **info}



# ------------------------------------------------------------- check and replay
def check_prune_record(record: Mapping[str, Any]) -> None:
    """Schema and bounds of a prune record (no model needed); ``UserError`` on the first problem."""
    if not isinstance(record, Mapping) or record.get("op") != PRUNE_OP:
        raise UserError(f"not a prune record: {str(record)[:80]}")
    total = 0
    for field, _ in _INDEX_FIELDS:
        entries = record.get(field, {})
        if not isinstance(entries, Mapping):
            raise UserError(f"prune record field {field!r} must map layer names to lists of channel indices")
        for name, idxs in entries.items():
            if not isinstance(name, str):
                raise UserError(f"prune record field {field!r} has a layer name {name!r} that is not text")
            if not isinstance(idxs, Sequence) or isinstance(idxs, (str, bytes)):
                raise UserError(f"prune record for {name!r} must list channel indices, got {type(idxs).__name__}")
            total += len(idxs)
            if total > MAX_RECORD_INDICES:
                raise UserError(f"prune record lists more than {MAX_RECORD_INDICES:,} channel indices")
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idxs):
                raise UserError(f"prune record for {name!r} must list non-negative integer channel indices")
    criterion = record.get("criterion")
    if criterion is not None and not isinstance(criterion, str):
        raise UserError(f"prune record's criterion must be a name, got {type(criterion).__name__}")
    steps = record.get("iterative_steps")
    if steps is not None:
        check_int(steps, "prune record's iterative_steps", maximum=MAX_STEPS)
    images = record.get("calibration_images")  # weights refitted on this many images (no effect on replay)
    if images is not None:
        check_int(images, "prune record's calibration_images")


def replay_prune(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Apply a ``{"op": "prune", ...}`` record to ``model`` in place (structure and slicing only).

    The record's schema and every index are checked before anything changes, so a
    record that does not fit the model raises ``UserError`` and leaves it untouched.
    The record is appended to ``model.norton_plan``.
    """
    check_prune_record(record)
    modules = dict(model.named_modules())
    work: list[tuple[nn.Module, str, list[int]]] = []
    for field, side in _INDEX_FIELDS:
        for name, idxs in record.get(field, {}).items():
            module = modules.get(name)
            if module is None:
                raise UserError(f"prune record names layer {name!r}, which the model does not have")
            size = side_sizes(module).get(side)
            if size is None:
                kind = type(module).__name__
                raise UserError(f"prune record removes {side}put channels of {name!r}, a {kind} that has none")
            bad = [i for i in idxs if not 0 <= i < size]
            if bad or len(set(idxs)) != len(idxs):
                what = f"index {bad[0]} outside [0, {size})" if bad else "repeated indices"
                raise UserError(f"prune record for {name!r} ({side}put channels) has {what}: it fits another model")
            if len(idxs) >= size:
                raise UserError(f"prune record removes all {size} {side}put channels of {name!r}")
            work.append((module, side, sorted(idxs)))
    record_original(model)  # before the first change: MACs fractions refer to the model as it was
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    for module, side, idxs in work:
        pruner = layer_pruner(module)
        if idxs and pruner is not None:
            (pruner.prune_out_channels if side == OUT else pruner.prune_in_channels)(module, idxs)
    for name, parameter in model.named_parameters():  # sliced parameters are new objects: keep them frozen
        if name in frozen:
            parameter.requires_grad_(False)
    append_record(model, record)
    return model


# ---------------------------------------------------------- the plan operation
def _describe_amount(amount: Any) -> str:
    if not isinstance(amount, Mapping) or len(amount) != 1:
        return ""
    (key, value), = amount.items()
    if isinstance(value, Mapping):
        return f"{key} for {len(value)} layer pattern(s)"
    if isinstance(value, list):
        shown = ", ".join(f"{v:g}" for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{key} [{shown}]"
    return f"{key} {value}"


def describe_prune_record(record: Mapping[str, Any]) -> str:
    """One line for ``norton info``: "prune 120 output channels in 14 layers (criterion pabs, ratio 0.5)"."""
    removed = record.get("removed", {})
    details = [f"criterion {record['criterion']}"] if record.get("criterion") else []
    amount = _describe_amount(record.get("amount"))
    if amount:
        details.append(amount)
    if record.get("iterative_steps"):
        details.append(f"{record['iterative_steps']} steps")
    if record.get("calibration_images"):
        details.append(f"recovered on {record['calibration_images']} images")
    suffix = f" ({', '.join(details)})" if details else ""
    return f"prune {sum(len(v) for v in removed.values())} output channels in {len(removed)} layers{suffix}"


def _example_prune(model: nn.Module, example_inputs: Tensor) -> nn.Module:
    from norton.pruning.engine import prune

    return prune(model, example_inputs, ratio=0.5)


register_operation(PlanOperation(
    name=PRUNE_OP, check=check_prune_record, replay=replay_prune, describe=describe_prune_record,
    example=_example_prune,
))
