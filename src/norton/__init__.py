"""norton: make convolutional networks smaller and faster with NORTON.

Filter-wise CP decomposition (:class:`CPDBlock`, :func:`decompose`) followed by
structured pruning driven by the similarity of the filters' factors
(:func:`prune`), then fine-tuning. The public API is re-exported here and loaded
lazily, so ``import norton`` stays cheap.
"""
from __future__ import annotations

from norton._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CPDBlock": "norton.decomposition.cpd_block",
    "Tucker2Conv": "norton.decomposition.tucker2_conv",
    "LayerCPConv": "norton.decomposition.layer_cp_conv",
    "SpatialSVDConv": "norton.decomposition.low_rank_layers",
    "LowRankConv1x1": "norton.decomposition.low_rank_layers",
    "LowRankLinear": "norton.decomposition.low_rank_layers",
    "cp_als": "norton.decomposition.cp_als",
    "cp_als_many": "norton.decomposition.cp_als",
    "tucker2": "norton.decomposition.tucker2",
    "low_rank_matrix": "norton.decomposition.svd",
    "spatial_svd": "norton.decomposition.svd",
    "evbmf_rank": "norton.decomposition.rank_selection",
    "layer_cp": "norton.decomposition.layer_cp",
    "cp_to_tensor": "norton.decomposition.cp_tensor",
    "decompose": "norton.decomposition.decompose",
    "MaxError": "norton.decomposition.decompose",
    "replay_decompose": "norton.decomposition.decompose",
    "create_model": "norton.models",
    "create_detector": "norton.detection.models",
    "list_models": "norton.models",
    "get_model_entry": "norton.models",
    "parse_compress_rate": "norton.compress_rate",
    "format_compress_rate": "norton.compress_rate",
    "count_complexity": "norton.complexity",
    "Complexity": "norton.complexity",
    "detector_complexity": "norton.detection.complexity",
    "train_detector": "norton.detection.train",
    "prune": "norton.pruning.engine",
    "plan_prune": "norton.pruning.engine",
    "coupled_groups": "norton.pruning.engine",
    "replay_prune": "norton.pruning.plan",
    "filter_removal_order": "norton.pruning.criteria",
    "register_criterion": "norton.pruning.criteria",
    "list_criteria": "norton.pruning.criteria",
    "calibration_inputs": "norton.calibration",
    "recalibrate_batchnorm": "norton.recovery",
    "refit_pruned_consumers": "norton.recovery",
    "refit_cp_blocks": "norton.recovery",
    "recover": "norton.recovery",
    "save": "norton.serialization",
    "load": "norton.serialization",
    "load_checkpoint": "norton.serialization",
    "load_reference_checkpoint": "norton.serialization",
    "model_state": "norton.serialization",
    "model_from_state": "norton.serialization",
    "build_datasets": "norton.training.datasets",
    "build_loaders": "norton.training.loaders",
    "fit": "norton.training.loop",
    "evaluate": "norton.training.loop",
    "train_one_epoch": "norton.training.loop",
    "distillation_loss": "norton.training.distillation",
    "Distillation": "norton.training.distillation",
    "compress": "norton.pipeline",
    "auto_compress": "norton.auto.compress",
    "AutoReport": "norton.auto.compress",
    "run_compression": "norton.workflow",
    "list_operations": "norton.plan",
    "replay_plan": "norton.plan",
    "optimize_for_inference": "norton.deploy.optimize",
    "optimize_for_training": "norton.deploy.optimize",
    "export_onnx": "norton.deploy.export",
    "UserError": "norton.errors",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
