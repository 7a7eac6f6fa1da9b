"""File input and output: atomic writes (a crash or a full disk never leaves a half-written
checkpoint), strict JSON, and :func:`read_torch_file`, the one place ``torch.load`` is called.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from norton.errors import UserError


def _default_mode() -> int:
    # mkstemp creates 0600 files; give the final file what a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder, then ``os.replace``.

    The rename is atomic on POSIX, so readers see the old file or the new one,
    never a partial one. Parent folders are created.
    """
    import torch  # here, not at the top: the CLI's argument checks import this module without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_torch_file(
    path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True, hint: str = ""
) -> Any:
    """``torch.load(path)`` (``weights_only`` by default) with every failure as one ``UserError`` line.

    A missing file, a file that is not a ``torch.save`` archive, a truncated one, or one
    holding objects beyond tensors and plain data each get a message saying which;
    ``hint`` is appended to the last (e.g. how to load a trusted file).
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise UserError(f"cannot read {path} as a PyTorch file: it is not a torch.save archive")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message is a paragraph; the line naming the offending global is the useful one.
        useful = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line]
        reason = (useful or lines or [""])[0]
        raise UserError(f"{path} holds objects other than tensors and plain data ({reason[:160]}){hint}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {path} as a PyTorch file: {first[:200]}") from None


# ------------------------------------------------------------------ strict JSON
# Python's json writes NaN and Infinity by default, which no other JSON reader accepts:
# every JSON file norton writes goes through json_text, where they become null.
def json_text(value: Any, *, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """Strict JSON of plain ``value``: tensors and numpy scalars as numbers, paths as strings, NaN and
    infinities as ``null``; anything else through ``default`` (``TypeError`` without it)."""
    return json.dumps(_json_plain(value, default), indent=indent, allow_nan=False)


def _json_plain(value: Any, default: Callable[[Any], Any] | None) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_plain(item, default) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_plain(item, default) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):  # a one-element tensor or a numpy scalar
        return _json_plain(value.item(), default)
    if default is not None:
        return _json_plain(default(value), None)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(value: Any, path: str | os.PathLike) -> Path:
    """``value`` as indented strict JSON, written atomically."""
    return atomic_write_text(json_text(value, indent=2) + "\n", path)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """One strict JSON object per line, written atomically."""
    return atomic_write_text("".join(json_text(record) + "\n" for record in records), path)


def append_jsonl(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Append one strict JSON line (a log that grows epoch by epoch)."""
    with open(path, "a") as handle:
        handle.write(json_text(record) + "\n")
