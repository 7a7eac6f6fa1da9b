"""Self-describing model files: ``save(model, path, **metadata)`` / ``load(path)``.

A norton file is a dict that ``torch.load(path, weights_only=True)`` accepts::

    {"format": "norton", "format_version": 1,
     "architecture": {"name": "resnet_56", "kwargs": {...}},   # how create_model built it
     "plan": [{"op": "decompose", "ranks": {...}}, {"op": "prune", ...}],
     "state_dict": {...},
     "metadata": {...}}                                         # anything else: epoch, optimizer, ...

:func:`load` needs none of the code that made the model: it calls
``create_model(**architecture)``, replays the plan on it (structure only: no
CP-ALS, no criterion) and loads the state dict strictly. The trainer embeds the
same record in its own checkpoints with :func:`model_state` / :func:`model_from_state`.

:func:`load_reference_checkpoint` reads the NORTON authors' released files
(``{"state_dict": ...}`` for ``create_model(arch, rank=..., compress_rate=...)``).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from norton import __version__
from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.io import atomic_save, read_torch_file
from norton.limits import check_architecture_kwargs
from norton.plan import check_plan, plan_of, replay_plan

FORMAT = "norton"
FORMAT_VERSION = 1
_MODEL_KEYS = ("architecture", "plan", "state_dict")
# The keyword arguments of norton.models.create_model a file's architecture may carry.
ARCHITECTURE_ARGUMENTS = ("compress_rate", "rank", "num_classes", "in_channels")
# Plain values torch.load(weights_only=True) rebuilds, besides containers and tensors.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


# --------------------------------------------------------------------- model record
def model_state(model: nn.Module, *, architecture: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"architecture", "plan", "state_dict"}``: everything :func:`model_from_state` needs.

    ``architecture`` overrides ``model.norton_architecture`` (``{"name": ..., "kwargs": {...}}``).
    """
    architecture = architecture if architecture is not None else getattr(model, "norton_architecture", None)
    if architecture is None:
        raise UserError(
            "the model does not say how to rebuild it (no norton_architecture): build it with "
            "norton.models.create_model, or pass architecture={'name': ..., 'kwargs': {...}}"
        )
    architecture = _check_architecture(architecture)
    plan = check_plan(plan_of(model))  # plain copies of known operations' records
    return {"architecture": architecture, "plan": plan, "state_dict": OrderedDict(model.state_dict())}


def model_from_state(state: Mapping[str, Any], *, written_by: str | None = None) -> nn.Module:
    """Rebuild a model from :func:`model_state`'s dict: build, replay the plan, load the weights strictly."""
    missing = [key for key in _MODEL_KEYS if key not in state]
    if missing:
        raise UserError(f"the model record lacks {missing[0]!r}; it was not written by norton.save / model_state")
    model = build_from_plan(state["architecture"], state["plan"], written_by=written_by)
    _load_strict(model, state["state_dict"], source="the file")
    return model


def build_from_plan(
    architecture: Mapping[str, Any], plan: Sequence[Mapping[str, Any]], *, written_by: str | None = None
) -> nn.Module:
    """``create_model(**architecture)`` with ``plan`` replayed on it (fresh weights, final structure).

    The architecture's arguments and every plan record are checked (names, bounds) before
    anything is built; the records are replayed through the plan registry (:mod:`norton.plan`).
    """
    from norton.models import create_model

    architecture = _check_architecture(architecture)
    plan = check_plan(plan, written_by=written_by)
    model = create_model(architecture["name"], **architecture["kwargs"])
    return replay_plan(model, plan, written_by=written_by)


def _check_architecture(architecture: Any) -> dict[str, Any]:
    if (
        not isinstance(architecture, Mapping)
        or not isinstance(architecture.get("name"), str)
        or not isinstance(architecture.get("kwargs", {}), Mapping)
    ):
        raise UserError(f"architecture must be {{'name': str, 'kwargs': dict}}, got {architecture!r:.80}")
    plain = {"name": architecture["name"], "kwargs": dict(architecture.get("kwargs", {}))}
    try:
        plain = json.loads(json.dumps(plain, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise UserError(f"architecture kwargs must be plain JSON data: {error}") from None
    if plain["name"] in _detector_names():  # a detector's own arguments (norton.detection.models)
        from norton.detection.models import check_detector_architecture

        check_detector_architecture(plain["name"], plain["kwargs"])
        check_architecture_kwargs({"num_classes": plain["kwargs"].get("num_classes")}, f"architecture {plain['name']!r}")
        return plain
    unknown = sorted(set(plain["kwargs"]) - set(ARCHITECTURE_ARGUMENTS))
    if unknown:
        raise UserError(
            f"architecture {plain['name']!r} has argument {unknown[0]!r}, which create_model does not take "
            f"(it takes {', '.join(ARCHITECTURE_ARGUMENTS)}): the file was written for another model builder"
        )
    check_architecture_kwargs(plain["kwargs"], f"architecture {plain['name']!r}")
    return plain


def _detector_names() -> tuple[str, ...]:
    from norton.detection.models import detector_names

    return detector_names()


# ---------------------------------------------------------------------- save / load
def save(
    model: nn.Module, path: str | os.PathLike, /, *, architecture: Mapping[str, Any] | None = None, **metadata: Any
) -> Path:
    """Write ``model`` to ``path`` atomically as a self-describing norton file.

    ``metadata`` is stored as given (epoch, accuracy, ``optimizer=opt.state_dict()``, ...; any
    key, ``model=`` and ``path=`` too: the two arguments are positional-only);
    it must hold only tensors and plain data so the file loads with ``weights_only=True``.
    """
    _check_plain(metadata, "metadata")
    checkpoint = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "norton_version": __version__,
        **model_state(model, architecture=architecture),
    }
    checkpoint["metadata"] = metadata
    return atomic_save(checkpoint, path)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """The whole norton file as a dict (format, architecture, plan, state_dict, metadata), checked."""
    return _check_norton_file(read_torch_file(path, map_location=map_location), path)


def _check_norton_file(checkpoint: Any, path: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a norton model file (no 'format': 'norton'); for the authors' released "
            "checkpoints use norton.load_reference_checkpoint(path, arch, rank, compress_rate)"
        )
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {version!r}; this norton reads <= {FORMAT_VERSION}: upgrade norton")
    missing = [key for key in (*_MODEL_KEYS, "metadata") if key not in checkpoint]
    if missing:
        raise UserError(f"{path} is a damaged norton file: it lacks {missing[0]!r}")
    return dict(checkpoint)


def load(path: str | os.PathLike, *, map_location: Any = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (architecture + plan + weights), in eval mode."""
    checkpoint = load_checkpoint(path, map_location=map_location)
    model = model_from_state(checkpoint, written_by=_written_by(checkpoint))
    return model.eval()


def _written_by(checkpoint: Mapping[str, Any]) -> str | None:
    version = checkpoint.get("norton_version")
    return version if isinstance(version, str) else None


def _check_plain(value: Any, where: str) -> None:
    """Raise ``UserError`` naming the first entry ``torch.load(weights_only=True)`` could not rebuild."""
    if isinstance(value, Tensor) or isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise UserError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise UserError(
        f"{where} is a {type(value).__name__}, which a weights-only load cannot rebuild; "
        "store tensors and plain data (e.g. optimizer.state_dict(), not the optimizer)"
    )


def _load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line message naming the first mismatch."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise UserError(f"{source} lacks {key!r} that the model expects (shape {tuple(tensor.shape)})")
        got = state_dict[key]
        if not isinstance(got, Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise UserError(f"{source} has {key!r} with shape {shape} but the model expects {tuple(tensor.shape)}")
    extra = [key for key in state_dict if key not in expected]
    if extra:
        raise UserError(f"{source} has {extra[0]!r} ({len(extra)} unexpected keys), which the model does not have")
    model.load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------- any model file
FILE_KINDS = ("norton model file", "training checkpoint", "reference checkpoint")


@dataclass
class ModelFile:
    """A model read from any file norton understands, with what the file says about it.

    Attributes:
        model: the rebuilt model (eval mode for model files, as stored for checkpoints).
        kind: one of :data:`FILE_KINDS`.
        trained_with: what the model was trained with: a training checkpoint's ``args``,
            a norton file's ``metadata`` (e.g. ``{"dataset": ...}``), ``{}`` for the authors' files.
        details: small extra facts (a training checkpoint's ``epoch`` and ``best``).
    """

    model: nn.Module
    kind: str
    trained_with: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def file_kind(content: Any) -> str | None:
    """Which of :data:`FILE_KINDS` a loaded file's content is, or ``None`` if norton cannot tell."""
    from norton.training.checkpoint import is_training_checkpoint

    if is_training_checkpoint(content):
        return "training checkpoint"
    if isinstance(content, Mapping) and content.get("format") == FORMAT:
        return "norton model file"
    if isinstance(content, Mapping) and (
        isinstance(content.get("state_dict"), Mapping) or (content and all(isinstance(v, Tensor) for v in content.values()))
    ):
        return "reference checkpoint"
    return None


def read_model_file(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    rank: int = 0,
    compress_rate: str | Sequence[float] | None = None,
) -> ModelFile:
    """Read a norton model file, a training checkpoint (``best.pt``/``last.pt``) or, with ``arch``,
    the authors' released ``{"state_dict": ...}`` file of ``create_model(arch, rank=, compress_rate=)``.

    The format is detected from the content (read once, ``weights_only``); a bare state
    dict without ``arch`` is refused with a message saying to describe its model.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check the path")
    if arch is not None:
        return ModelFile(load_reference_checkpoint(path, arch, rank, compress_rate), "reference checkpoint")
    content = read_torch_file(path)
    kind = file_kind(content)
    if kind == "training checkpoint":
        from norton.training.checkpoint import model_from_checkpoint

        details = {"epoch": content.get("epoch"), "best": content.get("best")}
        return ModelFile(model_from_checkpoint(content), kind, dict(content.get("args") or {}), details)
    if kind == "reference checkpoint":
        raise UserError(f"{path} holds a bare state_dict (the reference's format): describe its model with "
                        "--arch, -r and -cpr (arch=, rank=, compress_rate=)")
    if kind is None:
        raise UserError(f"{path} is not a model file norton knows (a norton file, a training checkpoint, or "
                        "the authors' {'state_dict': ...} checkpoint)")
    checkpoint = _check_norton_file(content, path)
    model = model_from_state(checkpoint, written_by=_written_by(checkpoint)).eval()
    metadata = checkpoint.get("metadata")
    return ModelFile(model, kind, dict(metadata) if isinstance(metadata, Mapping) else {})


def load_model_file(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    rank: int = 0,
    compress_rate: str | Sequence[float] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, trained_with)`` from any model file; see :func:`read_model_file`."""
    loaded = read_model_file(path, arch=arch, rank=rank, compress_rate=compress_rate)
    return loaded.model, loaded.trained_with


# --------------------------------------------------------------- reference checkpoints
def load_reference_checkpoint(
    path: str | os.PathLike,
    arch: str,
    rank: int,
    compress_rate: str | Sequence[float] | None,
    *,
    num_classes: int | None = None,
    trusted: bool = False,
    map_location: Any = "cpu",
) -> nn.Module:
    """Load one of the NORTON authors' released checkpoints into ``create_model(arch, ...)``, in eval mode.

    Accepts ``{"state_dict": ...}`` (other keys ignored) or a bare state dict, with
    or without DataParallel's ``module.`` prefixes. ``rank`` and ``compress_rate``
    are the ``-r``/``-cpr`` the checkpoint was made with (its file name says them).
    A file that needs full unpickling (objects beyond tensors) loads only with
    ``trusted=True``: unpickling can run code, so do it for files you trust.
    """
    from norton.models import create_model

    hint = "; if you trust the file, pass trusted=True"
    checkpoint = read_torch_file(path, map_location=map_location, weights_only=not trusted, hint=hint)
    state_dict = _reference_state_dict(checkpoint, path)
    model = create_model(arch, compress_rate=compress_rate, rank=rank, num_classes=num_classes)
    _explain_reference_mismatch(model, state_dict, checkpoint, rank, compress_rate)
    _load_strict(model, state_dict, source=f"checkpoint {Path(path).name}")
    return model.eval()


def _reference_state_dict(checkpoint: Any, path: str | os.PathLike) -> dict[str, Tensor]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        state_dict = checkpoint["state_dict"]
    elif isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        keys = list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise UserError(f"{path} holds no state dict (expected {{'state_dict': ...}}, found {keys})")
    prefix = "module."
    if all(key.startswith(prefix) for key in state_dict):  # saved from nn.DataParallel
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _explain_reference_mismatch(
    model: nn.Module, state_dict: Mapping[str, Tensor], checkpoint: Any, rank: int, compress_rate: Any
) -> None:
    """Turn the usual wrong ``-r``/``-cpr`` into one line that names the right value."""
    modules = dict(model.named_modules())
    blocks = [name for name, m in modules.items() if isinstance(m, CPDBlock)]
    ckpt_blocks = sorted({key.rsplit(".feature.", 1)[0] for key in state_dict if ".feature.pointwise." in key})
    if rank == 0 and ckpt_blocks:
        ranks = _checkpoint_ranks(state_dict, ckpt_blocks, modules)
        raise UserError(
            f"checkpoint has {len(ckpt_blocks)} decomposed conv layers (CPDBlocks) of rank "
            f"{_describe_ranks(ranks)} but rank=0 was given; pass that rank"
        )
    if blocks and not ckpt_blocks:
        raise UserError(f"checkpoint has dense convolutions (rank 0) but rank={rank} was given; pass rank=0")
    if blocks:
        ranks = _checkpoint_ranks(state_dict, [name for name in blocks if name in ckpt_blocks], modules)
        if any(r is not None and r != rank for r in ranks.values()):
            raise UserError(
                f"checkpoint has {len(ranks)} conv layers of rank {_describe_ranks(ranks)} but rank={rank} was given"
            )
    for key, tensor in model.state_dict().items():
        got = state_dict.get(key)
        if isinstance(got, Tensor) and got.shape != tensor.shape:
            saved = checkpoint.get("compress_rate") if isinstance(checkpoint, Mapping) else None
            hint = f" (the file says compress_rate={saved!r})" if saved is not None else ""
            raise UserError(
                f"checkpoint's {key} has shape {tuple(got.shape)} but compress_rate={compress_rate!r} builds "
                f"{tuple(tensor.shape)}: check the compress rate{hint}"
            )


def _checkpoint_ranks(
    state_dict: Mapping[str, Tensor], names: Sequence[str], modules: Mapping[str, nn.Module]
) -> dict[str, int | None]:
    """Per CPDBlock name, the rank its checkpoint tensors imply: ``R*N`` pointwise rows over ``N`` filters.

    ``N`` comes from the block's bias in the checkpoint when it has one, else from
    the model's layer of that name (right whenever the compress rate is).
    """
    ranks: dict[str, int | None] = {}
    for name in names:
        rows = state_dict[f"{name}.feature.pointwise.weight"].shape[0]  # R*N
        bias = state_dict.get(f"{name}.bias")
        layer = modules.get(name)
        filters = bias.shape[0] if isinstance(bias, Tensor) else getattr(layer, "out_channels", None)
        ranks[name] = rows // filters if filters and rows % filters == 0 else None
    return ranks


def _describe_ranks(ranks: Mapping[str, int | None]) -> str:
    known = sorted({r for r in ranks.values() if r is not None})
    if not known:
        return "unknown"
    return str(known[0]) if len(known) == 1 else "/".join(map(str, known))
