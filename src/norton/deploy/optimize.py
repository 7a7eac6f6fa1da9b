"""``optimize_for_inference`` / ``optimize_for_training`` and the ``"optimize"`` plan operation.

:func:`optimize_for_inference` returns an eval-mode copy of a model with eval-mode
BatchNorms folded into the layer before them (:mod:`norton.deploy.batchnorm`), each
CPDBlock in its fastest equivalent form (:mod:`norton.deploy.forms`, chosen by
:mod:`norton.deploy.choice`), and the memory format (NCHW or channels-last) that
runs the whole model fastest. What it chose is appended to ``model.norton_plan`` as::

    {"op": "optimize", "forms": {layer: form}, "fold_bn": [[producer, batchnorm], ...],
     "memory_format": "contiguous" | "channels_last",
     "dtype": "float32" | "bfloat16" | "float16", "compile": bool,
     "measured_on": {"device": ..., "batch_size": ..., "measure": ...[, "runtime": "onnxruntime"]}}

(records written before ``dtype`` and ``compile`` existed replay as float32, eager.)

and :func:`replay_optimize` rebuilds that structure before a state dict loads (this
module registers the operation with :mod:`norton.plan`, so ``norton.save`` /
``norton.load`` / ``norton info`` handle optimized models).

:func:`optimize_for_training` switches, per layer and in place, how a CPDBlock
computes its forward (e.g. rebuild the dense kernel from the factors each step and
run one conv). Parameters and state-dict keys stay those of the CPDBlock, so
optimizers, checkpoints and results are unchanged; only the speed differs.
"""
from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy._helpers import (
    Inputs,
    all_finite,
    as_tuple,
    model_device,
    non_finite_message,
    set_submodule,
    tensors_in,
    to_memory_format,
)
from norton.deploy.batchnorm import PRODUCERS, find_batchnorm_pairs, fold_batchnorm, fold_structure
from norton.deploy.choice import (
    block_signature,
    choose_forms,
    fastest_model,
    fastest_training_form,
)
from norton.deploy.forms import (
    GPU_FORMS,
    INFERENCE_FORMS,
    RECORDED_FORMS,
    TRAINING_FORMS,
    as_written,
    build_form,
    is_layer_block,
    is_plain_block,
    set_training_form,
)
from norton.deploy.tolerance import (
    DTYPES,
    check_close,
    dtype_name,
    equivalence_tolerance,
    relative_difference,
    tf32_enabled,
)
from norton.errors import UserError
from norton.example_inputs import module_input_shapes
from norton.limits import check_repeats
from norton.plan import PlanOperation, append_record, record_original, register_operation

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
# Where the optimized model will run, so where its forms are timed.
RUNTIMES = ("torch", "onnxruntime")
# Formats a record can hold: "auto" is resolved before anything is recorded.
RECORDED_MEMORY_FORMATS = MEMORY_FORMATS[1:]


# ================================================================ inference
def optimize_for_inference(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    device: torch.device | str | None = None,
    forms: Sequence[str] | None = None,
    fold_bn: bool = True,
    memory_format: str = "auto",
    measure: bool = True,
    warmup: int = 1,
    repeats: int = 7,
    check: bool = True,
    dtype: torch.dtype | str = torch.float32,
    compile: bool = False,
    runtime: str = "torch",
) -> nn.Module:
    """An eval-mode copy of ``model`` with each CPDBlock in its fastest equivalent form.

    ``model`` itself is not modified (it is deep-copied first).

    Args:
        model: any module, e.g. from ``norton.create_model``, after decompose/prune.
        example_inputs: a batch like the ones the model will serve (its batch size
            matters: the fastest form at batch 1 is not always the fastest at 32).
            Floating-point inputs are cast to ``dtype`` for timing.
        device: where to run and measure; default: the model's device.
        forms: the candidate forms, from ``"cpd", "merged", "grouped", "dense"`` and, on
            CUDA with Triton, ``"fused"``; default: all that run on ``device``.
        fold_bn: fold eval-mode BatchNorms into the layer before them (in float32).
        memory_format: ``"contiguous"``, ``"channels_last"``, or ``"auto"`` (time the
            whole model in both and keep the faster; ``"contiguous"`` when ``measure=False``).
        measure: time candidates per layer; ``False`` uses a MACs rule instead (fast, deterministic).
        warmup, repeats: per-layer timing (interleaved rounds, median).
        check: compare outputs with the float32 original on ``example_inputs``, raising
            ``RuntimeError`` beyond :func:`~norton.deploy.tolerance.equivalence_tolerance`
            (by dtype and TF32); a model whose own outputs are not finite (NaN or inf)
            cannot be checked: ``UserError``.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (or their names):
            BatchNorms are folded in float32, then the model is cast; the returned
            model takes inputs of this dtype.
        compile: choose forms (and the memory format) by timing them under
            ``torch.compile``; the returned model is not compiled: call ``torch.compile``
            on it (it stays an ``nn.Module`` that ``norton.save`` can write).
        runtime: ``"torch"``, or ``"onnxruntime"`` to choose the forms for a model that will be
            exported to ONNX and run by onnxruntime on CPU: each form is timed exported, in an
            onnxruntime session (float32, NCHW; onnxruntime picks its own layout).

    On CUDA the timing runs with ``torch.backends.cudnn.benchmark`` on (restored after).
    The choice is appended to ``model.norton_plan`` (see the module docstring);
    :func:`replay_optimize` rebuilds it.
    """
    precision = dtype_name(dtype)
    if not isinstance(compile, bool):
        raise UserError(f"compile must be True or False, got {compile!r}")
    if runtime not in RUNTIMES:
        raise UserError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if memory_format not in MEMORY_FORMATS:
        raise UserError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    if not isinstance(model, nn.Module):
        raise UserError(f"expected an nn.Module, got {type(model).__name__}")
    check_repeats(warmup, "warmup", minimum=0)
    check_repeats(repeats, "repeats")
    device = torch.device(device) if device is not None else model_device(model)
    if runtime == "onnxruntime" and (device.type != "cpu" or precision != "float32" or compile):
        raise UserError("runtime='onnxruntime' chooses forms for onnxruntime's CPU provider: "
                        "use device='cpu', dtype=torch.float32 and compile=False")
    forms = _inference_forms(forms, device)
    cast = DTYPES[precision]
    inputs = tuple(t.to(device) for t in as_tuple(example_inputs))
    model = copy.deepcopy(model).to(device).float().eval()  # the caller's model stays as it is; folds in fp32
    record_original(model)
    as_written(model)  # a training-time forward is no inference form
    fp32_inputs = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    reference = _run(model, fp32_inputs) if check else None
    if reference is not None and not all_finite(reference):
        raise UserError(non_finite_message(model, "optimize_for_inference"))
    device_tf32 = device.type == "cuda" and tf32_enabled()
    tolerance = equivalence_tolerance(cast, device.type, device_tf32)
    if reference is not None and cast != torch.float32:
        _check_dtype_suits(model, inputs, reference, cast, tolerance)

    pairs = find_batchnorm_pairs(model, fp32_inputs) if fold_bn else []
    modules = dict(model.named_modules())
    for producer, bn in pairs:
        fold_batchnorm(modules[producer], modules[bn])
        set_submodule(model, bn, nn.Identity())
    model.to(cast)
    inputs = tuple(t.to(cast) if t.is_floating_point() else t for t in inputs)

    # CPDBlocks and layer-level decomposed blocks (Tucker-2, layer-wise CP, SVD: "factored" or "dense")
    blocks = [name for name, m in model.named_modules() if isinstance(m, CPDBlock) or is_layer_block(m)]
    if runtime == "onnxruntime":  # an ONNX graph is NCHW; onnxruntime chooses its own blocked layout
        formats: tuple[str, ...] = ("contiguous",)
    elif memory_format != "auto":
        formats = (memory_format,)
    else:  # without measuring there is nothing to compare formats by: keep the default layout
        formats = ("contiguous", "channels_last") if measure else ("contiguous",)
    # onnxruntime fuses and re-lays-out the whole graph (Conv+ReLU, NCHWc blocks), which a layer timed
    # alone does not show: the per-layer choice must also beat every layer dense, timed whole
    all_dense = copy.deepcopy(model) if runtime == "onnxruntime" and measure and "dense" in forms \
        and len(forms) > 1 else None
    candidates: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    with _cudnn_benchmark(device):
        for fmt in formats:
            candidate = model if len(formats) == 1 else copy.deepcopy(model)
            try:
                chosen = choose_forms(candidate, blocks, inputs, forms, fmt, measure, warmup, repeats,
                                      compile=compile, runtime=runtime)
            except RuntimeError:  # e.g. a .view() in the model that channels-last strides do not allow
                if len(formats) == 1:
                    raise
                continue
            candidates[fmt] = (candidate, chosen)
        if not candidates:
            raise RuntimeError("optimize_for_inference: the model runs in no memory format tried")
        if len(candidates) == 1:
            fmt = next(iter(candidates))
        else:
            fmt = fastest_model({key: module for key, (module, _) in candidates.items()}, inputs, device,
                                compile=compile)
    model, chosen = candidates[fmt]
    if all_dense is not None:
        dense_forms = choose_forms(all_dense, blocks, inputs, ("dense",), fmt, False, warmup, repeats)
        if fastest_model({"chosen": model, "dense": all_dense}, inputs, device, runtime=runtime) == "dense":
            model, chosen = all_dense, dense_forms

    if reference is not None:
        setting = f"{precision}{' (TF32)' * (device_tf32 and precision == 'float32')} on {device.type}"
        check_close(reference, _run(model, inputs), tolerance, "optimize_for_inference", setting)
    append_record(model, {
        "op": "optimize",
        "forms": dict(chosen),
        "fold_bn": [[producer, bn] for producer, bn in pairs],
        "memory_format": fmt,
        "dtype": precision,
        "compile": compile,
        "measured_on": {"device": str(device), "batch_size": int(inputs[0].shape[0]) if inputs[0].dim() else 1,
                        "measure": bool(measure), **({"runtime": runtime} if runtime != "torch" else {})},
    })
    return model


def _inference_forms(forms: Sequence[str] | None, device: torch.device) -> tuple[str, ...]:
    """The candidate forms: those given (checked), else every form that runs on ``device``."""
    from norton.deploy.fused_cpd import fused_available

    if forms is None:
        return (*INFERENCE_FORMS, *GPU_FORMS) if fused_available(device) else INFERENCE_FORMS
    checked = _check_forms(forms, (*INFERENCE_FORMS, *GPU_FORMS), "inference")
    if "fused" in checked and not fused_available(device):
        raise UserError(f"the 'fused' form needs Triton and a CUDA device, not {device}; "
                        f"choose from {', '.join(INFERENCE_FORMS)}")
    return checked


def _check_dtype_suits(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: Any, dtype: torch.dtype, tolerance: float
) -> None:
    """``UserError`` when the model merely cast to ``dtype`` (nothing optimized) already misses ``tolerance``.

    Then the drift is the dtype's (e.g. activations below float16's normal range), not norton's,
    and no optimized form could pass the check.
    """
    probe = copy.deepcopy(model).to(dtype)
    outputs = _run(probe, tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs))
    worst = max((relative_difference(a, b) for a, b in zip(tensors_in(outputs), tensors_in(reference), strict=True)
                 if b.numel()), default=0.0)
    hint = "dtype=torch.bfloat16 (float32's range) or torch.float32" if dtype == torch.float16 else "dtype=torch.float32"
    if not worst <= tolerance:
        raise UserError(
            f"the model itself, cast to {dtype_name(dtype)} and not optimized, differs from float32 by {worst:.3g} "
            f"of its outputs' largest magnitude (> {tolerance:g}): its activations leave {dtype_name(dtype)}'s "
            f"range or precision; use {hint}"
        )


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """cuDNN picks its fastest algorithm per shape while forms are timed (restored after)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def replay_optimize(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Rebuild, in place, the structure an ``{"op": "optimize", ...}`` record describes.

    BatchNorms named in ``fold_bn`` become ``nn.Identity`` (their producer gains
    a bias), CPDBlocks become their recorded form, and the memory format is set.
    Weights are placeholders: load the optimized model's state dict next. The
    record is appended to ``model.norton_plan``.
    """
    check_optimize_record(record)
    forms, folds = record.get("forms", {}), record.get("fold_bn", [])
    modules = dict(model.named_modules())
    for producer, bn in folds:  # every layer checked before the model changes
        for name, kinds, what in ((producer, PRODUCERS, "a Conv2d or CPDBlock"), (bn, _BatchNorm, "a BatchNorm")):
            if name not in modules:
                raise UserError(f"optimize record names layer {name!r}, which the model does not have")
            if not isinstance(modules[name], kinds):
                raise UserError(f"optimize record folds {name!r} as {what}, but the model has "
                                f"{type(modules[name]).__name__} there")
    for name, form in forms.items():
        module = modules.get(name)
        found = type(module).__name__ if module is not None else "nothing"
        if form == "factored" or is_layer_block(module):
            if not is_layer_block(module) or form not in ("factored", "dense"):
                raise UserError(f"optimize record gives {name!r} the form {form!r}, but the model has {found} there")
        elif not isinstance(module, CPDBlock):
            raise UserError(f"optimize record names {name!r} as a CPDBlock, but the model has {found} there")
    record_original(model)
    for producer, bn in folds:
        fold_structure(modules[producer])
        set_submodule(model, bn, nn.Identity())
    for name, form in forms.items():
        if form not in ("cpd", "factored"):
            set_submodule(model, name, build_form(modules[name], form))
    model.to(DTYPES[record.get("dtype", "float32")])  # before the state dict loads: it keeps this dtype
    to_memory_format(model, record.get("memory_format", "contiguous"))
    model.eval()
    append_record(model, record)
    return model


def check_optimize_record(record: Mapping[str, Any]) -> None:
    """Schema of an optimize record: known forms per layer name, ``[producer, batchnorm]`` name pairs, a format."""
    if not isinstance(record, Mapping) or record.get("op") != "optimize":
        raise UserError(f"not an optimize record: {str(record)[:80]}")
    forms = record.get("forms", {})
    if not isinstance(forms, Mapping):
        raise UserError(f"optimize record: 'forms' must be {{layer name: form}}, got {type(forms).__name__}")
    for name, form in forms.items():
        if not isinstance(name, str):
            raise UserError(f"optimize record: layer names must be strings, got {name!r}")
        if form not in RECORDED_FORMS:
            raise UserError(
                f"optimize record: unknown form {form!r} for layer {name!r}; known: {', '.join(RECORDED_FORMS)}"
            )
    folds = record.get("fold_bn", [])
    if not isinstance(folds, (list, tuple)):
        raise UserError(f"optimize record: 'fold_bn' must be a list of [producer, batchnorm], got {folds!r:.60}")
    for pair in folds:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(n, str) for n in pair):
            raise UserError(f"optimize record: fold_bn entries must be [producer, batchnorm] name pairs, got {pair!r:.60}")
    fmt = record.get("memory_format", "contiguous")
    if fmt not in RECORDED_MEMORY_FORMATS:
        raise UserError(
            f"optimize record: memory_format must be one of {', '.join(RECORDED_MEMORY_FORMATS)}, got {fmt!r:.40}"
        )
    if record.get("dtype", "float32") not in DTYPES:
        raise UserError(f"optimize record: dtype must be one of {', '.join(DTYPES)}, got {record.get('dtype')!r:.40}")
    if not isinstance(record.get("compile", False), bool):
        raise UserError(f"optimize record: 'compile' must be true or false, got {record.get('compile')!r:.40}")
    measured_on = record.get("measured_on", {})
    if not isinstance(measured_on, Mapping):
        raise UserError(f"optimize record: 'measured_on' must be a dict, got {type(measured_on).__name__}")


def describe_optimize_record(record: Mapping[str, Any]) -> str:
    """``optimize: 12 layers as dense, 3 as merged; 20 BatchNorms folded; channels_last; bfloat16 (timed on cpu at batch 1)``."""
    counts = Counter(record.get("forms", {}).values()).most_common()
    forms = ", ".join(
        f"{count} layer{'s' * (count != 1)} as {form}" if i == 0 else f"{count} as {form}"
        for i, (form, count) in enumerate(counts)
    ) or "no decomposed blocks"
    folds = len(record.get("fold_bn", []))
    line = (f"optimize: {forms}; {folds} BatchNorm{'s' * (folds != 1)} folded; "
            f"{record.get('memory_format', 'contiguous')}")
    if record.get("dtype", "float32") != "float32":
        line += f"; {record['dtype']}"
    if record.get("compile"):
        line += "; forms chosen under torch.compile"
    measured_on = record.get("measured_on") or {}
    if measured_on.get("measure") is False:
        return line + " (chosen by the MACs rule)"
    if "device" in measured_on:
        where = " in onnxruntime" if measured_on.get("runtime") == "onnxruntime" else ""
        return line + f" (timed{where} on {measured_on['device']} at batch {measured_on.get('batch_size', '?')})"
    return line


register_operation(PlanOperation(
    name="optimize",
    check=check_optimize_record,
    replay=replay_optimize,
    describe=describe_optimize_record,
    example=lambda model, example_inputs: optimize_for_inference(model, example_inputs, measure=False),
))


# ================================================================ training
def optimize_for_training(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    forms: Sequence[str] = TRAINING_FORMS,
    measure: bool = True,
    warmup: int = 2,
    repeats: int = 7,
) -> dict[str, str]:
    """Pick, in place, each CPDBlock's fastest forward+backward implementation.

    Parameters, state-dict keys and outputs are unchanged, so it can be called
    on a model already wrapped by an optimizer. Returns ``{layer: form}``.
    ``measure=False`` picks ``"dense"`` where it is allowed (on CPU and GPU the
    dense conv's backward is the best-tuned kernel), else the first form given.
    """
    forms = _check_forms(forms, TRAINING_FORMS, "training")
    check_repeats(warmup, "warmup", minimum=0)
    check_repeats(repeats, "repeats")
    blocks = {name: m for name, m in model.named_modules() if is_plain_block(m)}
    if not blocks:
        return {}
    shapes = module_input_shapes(model, blocks, as_tuple(example_inputs), grad=True)
    chosen: dict[str, str] = {}
    cache: dict[tuple, str] = {}
    for name, block in blocks.items():
        if name not in shapes:
            continue
        if not measure:
            chosen[name] = "dense" if "dense" in forms else forms[0]
        else:
            key = (block_signature(block), tuple(shapes[name]))
            if key not in cache:
                cache[key] = fastest_training_form(block, shapes[name], forms, warmup, repeats)
            chosen[name] = cache[key]
        set_training_form(block, chosen[name])
    return chosen


# ================================================================ helpers
def _check_forms(forms: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(forms, str):
        forms = (forms,)
    forms = tuple(forms)
    if not forms:
        raise UserError(f"need at least one {what} form; choose from {', '.join(allowed)}")
    for form in forms:
        if form not in allowed:
            raise UserError(f"unknown {what} form {form!r}; choose from {', '.join(allowed)}")
    return forms


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad():
        return model(*inputs)
