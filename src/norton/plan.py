"""The plan: what norton did to a model, as plain data, and the one registry of its operations.

Every compression step appends a record ``{"op": name, ...}`` to ``model.norton_plan``
(a list of JSON-plain dicts). An operation (``decompose``, ``prune``, ``optimize``, and
every one to come) registers itself once, in its stage's module, with

* ``check(record)``: the record's schema and bounds, checked before anything is built;
* ``replay(model, record)``: rebuild the structure the record describes, in place
  (no CP-ALS, no criterion, no timing: a state dict loads next);
* ``describe(record)``: one line for ``norton info``;
* ``example(model, example_inputs)``: apply the operation with its defaults (the tests
  iterate the registry with it, so a new operation is tested by save -> load at once).

:func:`norton.save`, :func:`norton.load`, ``norton info`` and :func:`replay_plan` go
through this registry only; a file naming an operation this norton does not know
fails with the operation's name and the version that wrote the file.

The *original* model is the model before its first norton operation; fractions of
MACs (``target_macs``) refer to it. A zoo model rebuilds it from
``model.norton_architecture``; any other model gets a shape-only (meta-device) copy
taken by :func:`record_original` when its first operation starts.
"""
from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from norton.errors import UserError

Record = dict[str, Any]
# Packages whose import registers the built-in operations (each stage registers its own).
_STAGES = ("norton.decomposition", "norton.pruning", "norton.deploy")


@dataclass(frozen=True)
class PlanOperation:
    """One kind of plan record and everything norton needs to store, rebuild and show it."""

    name: str
    check: Callable[[Mapping[str, Any]], None]
    replay: Callable[[nn.Module, Mapping[str, Any]], nn.Module]
    describe: Callable[[Mapping[str, Any]], str]
    example: Callable[[nn.Module, torch.Tensor], nn.Module]


_OPERATIONS: dict[str, PlanOperation] = {}


def register_operation(operation: PlanOperation) -> PlanOperation:
    """Add ``operation`` to the registry; a second operation of the same name is an error."""
    if operation.name in _OPERATIONS and _OPERATIONS[operation.name] is not operation:
        raise ValueError(f"a plan operation named {operation.name!r} is already registered")
    _OPERATIONS[operation.name] = operation
    return operation


def _load_stages() -> None:
    for package in _STAGES:
        importlib.import_module(package)


def list_operations() -> list[str]:
    """Names of the registered operations, in registration order."""
    _load_stages()
    return list(_OPERATIONS)


def get_operation(name: Any, *, position: int | None = None, written_by: str | None = None) -> PlanOperation:
    """The registered operation ``name``; ``UserError`` naming it (and the file's norton version) if unknown."""
    _load_stages()
    if isinstance(name, str) and name in _OPERATIONS:
        return _OPERATIONS[name]
    from norton import __version__

    where = f"plan step {position} " if position is not None else ""
    source = f"the file was written by norton {written_by}; " if written_by else ""
    raise UserError(
        f"{where}has operation {name!r}, which norton {__version__} does not know ({source}"
        f"known: {', '.join(_OPERATIONS)}): upgrade norton to read it"
    )


# ----------------------------------------------------------------- records
def plain_record(record: Mapping[str, Any]) -> Record:
    """A JSON-plain deep copy of ``record`` (``UserError`` if it holds anything else)."""
    try:
        return json.loads(json.dumps(dict(record), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise UserError(f"plan records must be plain JSON data (lists, dicts, numbers, text): {error}") from None


def check_plan(plan: Any, *, written_by: str | None = None) -> list[Record]:
    """Every record of ``plan`` checked by its operation (schema and bounds); a plain copy."""
    if not isinstance(plan, Sequence) or isinstance(plan, (str, bytes)):
        raise UserError(f"a plan must be a list of records, got {type(plan).__name__}")
    checked = []
    for position, record in enumerate(plan):
        if not isinstance(record, Mapping):
            raise UserError(f"plan step {position} must be a dict with an 'op', got {type(record).__name__}")
        operation = get_operation(record.get("op"), position=position, written_by=written_by)
        try:
            operation.check(record)
        except UserError as error:
            raise UserError(f"plan step {position} ({operation.name}): {error}") from None
        checked.append(plain_record(record))
    return checked


def replay_plan(model: nn.Module, plan: Sequence[Mapping[str, Any]], *, written_by: str | None = None) -> nn.Module:
    """Rebuild, in place, the structure ``plan`` describes on a freshly built ``model``."""
    for position, record in enumerate(check_plan(plan, written_by=written_by)):
        get_operation(record["op"], position=position).replay(model, record)
    return model


def describe_plan(plan: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per record, as ``norton info`` prints them."""
    return [get_operation(record.get("op"), position=i).describe(record) for i, record in enumerate(plan)]


def plan_of(model: nn.Module) -> list[Record]:
    """A plain copy of ``model.norton_plan`` (empty for a model norton has not touched)."""
    return [plain_record(record) for record in getattr(model, "norton_plan", None) or []]


def append_record(model: nn.Module, record: Mapping[str, Any]) -> None:
    """Append a plain copy of ``record`` to ``model.norton_plan`` (the caller's dict stays the caller's)."""
    plan = getattr(model, "norton_plan", None)
    if plan is None:
        plan = []
        object.__setattr__(model, "norton_plan", plan)  # plain data, not a submodule or parameter
    plan.append(plain_record(record))


# ----------------------------------------------------------- the original model
def record_original(model: nn.Module) -> None:
    """Before the first operation on a model that cannot be rebuilt by name, keep its shapes.

    A zoo model (``norton_architecture``) needs nothing; any other model gets a
    meta-device copy (no memory for weights) in ``model.norton_original``.
    """
    if getattr(model, "norton_plan", None) or getattr(model, "norton_architecture", None) is not None:
        return
    if getattr(model, "norton_original", None) is not None:
        return
    try:
        snapshot = copy.deepcopy(model).to("meta")
    except Exception:  # noqa: BLE001 - a model that cannot be copied just has no recorded original
        return
    # In the instance dict, not as a submodule: it must not run, train or appear in the state dict.
    model.__dict__["norton_original"] = snapshot


def original_model(model: nn.Module) -> nn.Module:
    """The model before its first norton operation (on the meta device when rebuilt), for MACs fractions."""
    if not getattr(model, "norton_plan", None):
        return model
    architecture = getattr(model, "norton_architecture", None)
    if isinstance(architecture, Mapping) and isinstance(architecture.get("name"), str):
        from norton.models import create_model

        with torch.device("meta"):
            return create_model(architecture["name"], **dict(architecture.get("kwargs", {})))
    snapshot = getattr(model, "norton_original", None)
    if snapshot is None:
        raise UserError(
            "the model's original (before its first norton operation) is unknown, so a fraction of its MACs "
            "cannot be computed: build it with norton.create_model, or decompose/prune it with norton"
        )
    return snapshot
