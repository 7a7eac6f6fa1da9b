"""How far an optimized model may drift from the original: the tolerance rule, by dtype and TF32.

``optimize_for_inference`` folds BatchNorms, re-associates the CPD sums (forms) and may
cast to bfloat16 / float16. All of that changes float rounding, never the function, so
its end-to-end check raises "this is a bug in norton" only beyond the rounding the
arithmetic itself allows. The error is measured normwise, relative to the output's
largest magnitude (``max |optimized - original| / max |original|``, per output tensor):
elementwise relative errors are meaningless for outputs near zero.

The rule is one pure function, :func:`equivalence_tolerance`; the values are a margin
over the unit roundoff ``u`` of the arithmetic the optimized model runs in:

* float32, no TF32 (CPU, or CUDA with TF32 off): ``u = 2**-24 = 6e-8``. Re-associating
  sums of a few thousand products leaves ~1e-6; 1e-4 is the limit norton always used.
* float32 with TF32 (CUDA; cuDNN convolutions use TF32 by default): the products'
  inputs are rounded to 10 mantissa bits, ``u = 2**-11 = 4.9e-4``; an optimized
  ResNet-50 drifted 1.0e-4 on an H200 (issue #12), over the old fixed 1e-4. 5e-3 is 10 u.
* float16: 10 mantissa bits like TF32, and every activation is also *stored* at that
  precision, so rounding accumulates layer after layer: 2e-2 (40 u).
* bfloat16: 7 mantissa bits, ``u = 2**-8 = 3.9e-3``: 5e-2 (13 u).

Measured here (CPU, torch 2.14.1, random weights, batch 2 at 224x224): casting a
torchvision model to the dtype, with nothing optimized, moves its logits by
3.7e-3 / 5.0e-3 / 5.3e-3 (bfloat16: resnet18 / resnet50 / mobilenet_v2) and
3.1e-3 / 3.7e-3 (float16: resnet18 / resnet50) of their maximum, so the values leave
a 4-10x margin. (mobilenet_v2 in float16 drifts by 1.0: its random-weight activations
fall below float16's normal range, 6e-5. ``optimize_for_inference`` checks the plain
cast first and refuses such a dtype with a ``UserError``, not "a bug in norton".)

A real bug (a BatchNorm folded into the wrong channels, a permuted rank sum, a lost
bias) moves outputs by O(1) of their maximum, far beyond every value here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from norton.deploy._helpers import tensors_in
from norton.errors import UserError

# The dtypes an optimized model may run in, by the name a plan record stores.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

FP32_TOLERANCE = 1e-4
TF32_TOLERANCE = 5e-3
FP16_TOLERANCE = 2e-2
BF16_TOLERANCE = 5e-2


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` -> ``"bfloat16"``; ``UserError`` for any other dtype."""
    if isinstance(dtype, torch.dtype):
        for name, known in DTYPES.items():
            if known == dtype:
                return name
    elif isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
        if name in DTYPES:
            return name
    raise UserError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype!r}")


def tf32_enabled() -> bool:
    """True when CUDA float32 convolutions or matmuls may run in TF32 (cuDNN convolutions do by default)."""
    backends = torch.backends
    conv = getattr(getattr(backends.cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(getattr(backends.cuda, "matmul", None), "fp32_precision", None)
    if conv == "tf32" or matmul == "tf32":
        return True
    return bool(backends.cudnn.allow_tf32 or backends.cuda.matmul.allow_tf32)


def equivalence_tolerance(dtype: torch.dtype, device_type: str, tf32: bool) -> float:
    """The largest allowed ``max |optimized - original| / max |original|`` (see the module docstring).

    ``device_type`` is ``"cpu"``, ``"cuda"``, ...; ``tf32`` whether TF32 is on
    (:func:`tf32_enabled`); it matters only for float32 on CUDA.
    """
    name = dtype_name(dtype)
    if name == "bfloat16":
        return BF16_TOLERANCE
    if name == "float16":
        return FP16_TOLERANCE
    return TF32_TOLERANCE if device_type == "cuda" and tf32 else FP32_TOLERANCE


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float32 (NaN when ``actual`` holds NaN)."""
    scale = max(expected.float().abs().max().item(), 1e-12)
    return (actual.float() - expected.float()).abs().max().item() / scale


def check_close(expected: Any, actual: Any, tolerance: float, what: str, setting: str = "") -> None:
    """Raise ``RuntimeError`` if any output tensor of ``actual`` drifts from ``expected`` beyond ``tolerance``.

    ``setting`` names the arithmetic in the message (e.g. ``"bfloat16 on cuda"``). NaN counts as far.
    """
    for a, b in zip(tensors_in(actual), tensors_in(expected), strict=True):
        if not b.numel():
            continue
        relative = relative_difference(a, b)
        if not relative <= tolerance:  # `not <=`: a NaN difference fails too
            where = f" for {setting}" if setting else ""
            raise RuntimeError(
                f"{what}: outputs differ from the original by {relative:.3g} of their largest magnitude "
                f"(tolerance {tolerance:g}{where}); this is a bug in norton, please report it"
            )
