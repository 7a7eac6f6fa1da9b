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

# Eager, because these functions share their module's name: once the submodule
# is imported anywhere, the package attribute would otherwise be the module.
from norton.cp_als import cp_als  # noqa: E402
from norton.decompose import decompose  # noqa: E402

# public name -> module that defines it
_EXPORTS = {
    "CPDBlock": "norton.cpd_block",
    "cp_als": "norton.cp_als",
    "cp_als_many": "norton.cp_als",
    "cp_to_tensor": "norton.cp_tensor",
    "decompose": "norton.decompose",
    "MaxError": "norton.decompose",
    "replay_decompose": "norton.decompose",
    "create_model": "norton.models",
    "list_models": "norton.models",
    "get_model_entry": "norton.models",
    "parse_compress_rate": "norton.compress_rate",
    "format_compress_rate": "norton.compress_rate",
    "count_complexity": "norton.complexity",
    "Complexity": "norton.complexity",
    "prune": "norton.pruning.engine",
    "plan_prune": "norton.pruning.engine",
    "coupled_groups": "norton.pruning.engine",
    "replay_prune": "norton.pruning.plan",
    "filter_removal_order": "norton.pruning.criteria",
    "register_criterion": "norton.pruning.criteria",
    "list_criteria": "norton.pruning.criteria",
    "save": "norton.serialization",
    "load": "norton.serialization",
    "load_checkpoint": "norton.serialization",
    "load_reference_checkpoint": "norton.serialization",
    "model_state": "norton.serialization",
    "model_from_state": "norton.serialization",
    "build_datasets": "norton.data",
    "build_loaders": "norton.data",
    "fit": "norton.engine",
    "evaluate": "norton.engine",
    "train_one_epoch": "norton.engine",
    "compress": "norton.pipeline",
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
