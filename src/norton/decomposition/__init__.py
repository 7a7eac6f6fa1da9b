"""Stage 1 of NORTON, filter decomposition: CP tensors, batched CP-ALS, the CPDBlock and model-level ``decompose``.

Reading order: :mod:`~norton.decomposition.cp_tensor` (the data type),
:mod:`~norton.decomposition.cp_als` (the algorithm), :mod:`~norton.decomposition.cpd_block`
(the layer), :mod:`~norton.decomposition.decompose` (the model-level operation, which
registers the ``"decompose"`` plan operation).
"""
from __future__ import annotations

# ``cp_als`` and ``decompose`` share their modules' names: importing the functions
# here, eagerly, makes the package attributes the functions for good.
from norton.decomposition.cp_als import cp_als, cp_als_many
from norton.decomposition.cp_tensor import cp_to_tensor, relative_error
from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.decompose import MaxError, decompose, eligible_convs, replay_decompose

__all__ = [
    "CPDBlock", "MaxError", "cp_als", "cp_als_many", "cp_to_tensor", "decompose", "eligible_convs",
    "relative_error", "replay_decompose",
]
