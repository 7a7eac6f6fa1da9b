"""norton: make convolutional networks smaller and faster with NORTON.

Filter-wise CP decomposition (:class:`CPDBlock`, :func:`decompose`) followed by
structured pruning driven by the similarity of the filters' factors
(:func:`prune`), then fine-tuning. The public API is re-exported here and loaded
lazily, so ``import norton`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CPDBlock": "norton.cpd_block",
    "cp_als": "norton.cp_als",
    "cp_to_tensor": "norton.cp_tensor",
    "decompose": "norton.decompose",
    "MaxError": "norton.decompose",
    "replay_decompose": "norton.decompose",
    "create_model": "norton.models",
    "list_models": "norton.models",
    "parse_compress_rate": "norton.compress_rate",
    "count_complexity": "norton.complexity",
    "prune": "norton.pruning.engine",
    "save": "norton.serialization",
    "load": "norton.serialization",
    "optimize_for_inference": "norton.inference",
    "optimize_for_training": "norton.inference",
    "export_onnx": "norton.export",
    "UserError": "norton.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'norton' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
