"""Stage 3 of NORTON, deployment: fast equivalent forms of CPDBlocks, BatchNorm folding, timing and export.

Reading order: :mod:`~norton.deploy.forms` (the equivalent forms of a CPDBlock, for
inference and for training), :mod:`~norton.deploy.batchnorm` (folding eval-mode
BatchNorms), :mod:`~norton.deploy.fused_cpd` (a Triton kernel for the depthwise + rank-sum
chain, CUDA only), :mod:`~norton.deploy.choice` (which form, by timing or by a MACs rule),
:mod:`~norton.deploy.tolerance` (how close an optimized model must stay, by dtype and TF32),
:mod:`~norton.deploy.optimize` (``optimize_for_inference`` / ``optimize_for_training``;
registers the ``"optimize"`` plan operation), :mod:`~norton.deploy.export` (ONNX and
TorchScript, checked against eager PyTorch), :mod:`~norton.deploy.timing` (a leaf:
interleaved timing and peak memory) and :mod:`~norton.deploy.benchmark` (whole models
side by side, for ``norton benchmark``).
"""
from __future__ import annotations

# Importing optimize registers the "optimize" plan operation (norton.plan imports this package).
from norton.deploy.export import export_onnx, export_torchscript
from norton.deploy.optimize import optimize_for_inference, optimize_for_training, replay_optimize

__all__ = ["export_onnx", "export_torchscript", "optimize_for_inference", "optimize_for_training", "replay_optimize"]
