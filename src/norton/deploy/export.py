"""Export to ONNX and TorchScript, checked numerically against eager PyTorch.

Every export is written to a temporary file beside the target, run on random
inputs (batch 1 and another batch size when the batch is dynamic) and compared
with the eager model; only a file that passes is renamed into place, so a
failed or mismatching export never leaves a file behind. NaN and inf never pass:
a model whose own outputs are not finite is refused before anything is written
(``UserError``), and a file that returns them where eager is finite is an
:class:`ExportCheckError`.

ONNX goes through ``torch.onnx.export``. torch 2.14 offers two exporters:
``exporter="torchscript"`` (the legacy tracer, ``dynamo=False``; the default here)
writes opset 17 exactly, in a fraction of a second, and handles every model of the
zoo; ``exporter="dynamo"`` (``torch.export``-based) takes seconds, prints progress,
and has no opset below 18 (asking for 17 ends in a failed down-conversion), so
with it the opset is raised to at least 18. See docs/speed.md.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from norton.deploy._helpers import all_finite, non_finite_message
from norton.errors import UserError

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_METHODS = ("trace", "script")
RELATIVE_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "output"


class ExportCheckError(RuntimeError):
    """The exported model's outputs differ from eager PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and how it compared with eager PyTorch."""

    path: Path
    format: str  # "onnx" or "torchscript"
    opset: int | None  # ONNX only
    checked_batch_sizes: tuple[int, ...]  # empty when check=False
    max_relative_difference: float | None  # max |exported - eager| / max |eager| over the checks

    def summary(self) -> str:
        """One line for people: path, format, check result."""
        if not self.checked_batch_sizes:
            check = "not checked"
        else:
            sizes = ", ".join(str(b) for b in self.checked_batch_sizes)
            check = f"matches eager PyTorch at batch {sizes} (max relative difference {self.max_relative_difference:.2e})"
        opset = f" opset {self.opset}" if self.opset is not None else ""
        return f"{self.path} ({self.format}{opset}): {check}"


# ======================================================================== ONNX
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    exporter: str = "torchscript",
    tolerance: float = RELATIVE_TOLERANCE,
) -> ExportResult:
    """Export ``model`` (eval mode) to ONNX at ``path`` and check it in onnxruntime.

    Args:
        example_inputs: one input batch ``(B, C, H, W)``; its shape apart from the
            batch is fixed in the graph.
        opset: ONNX opset, at least 17.
        dynamic_batch: make dimension 0 of the input and output symbolic (``"batch"``).
        check: run the file in onnxruntime on random inputs at batch 1 and 3 (only
            ``B`` when the batch is fixed) and raise :class:`ExportCheckError` if the
            relative max difference to eager exceeds ``tolerance``.
        exporter: ``"torchscript"`` (legacy, ``dynamo=False``) or ``"dynamo"``.
    """
    example = _check_example(example_inputs)
    if not isinstance(opset, int) or opset < 17:
        raise UserError(f"opset must be an integer >= 17, got {opset!r}")
    if exporter not in EXPORTERS:
        raise UserError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter == "dynamo":
        opset = max(opset, 18)  # the dynamo exporter implements no opset below 18
    if check:  # before any file or folder is made
        _check_eager_finite(model, example, "ONNX export")
    path = _target(path, ".onnx")
    batches = _check_batches(example, dynamic_batch) if check else ()
    with _eval_mode(model), _temporary_beside(path) as tmp:
        _onnx_export(model, example, tmp, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter)
        difference = None
        if check:
            session = onnxruntime_session(tmp)
            difference = _compare(model, lambda x: session.run(None, {INPUT_NAME: x.cpu().numpy()})[0], example, batches)
            _raise_if_far(difference, tolerance, "ONNX")
        _publish(tmp, path)
    return ExportResult(path, "onnx", opset, batches, difference)


def onnx_bytes(model: nn.Module, example: Tensor, *, opset: int = 17) -> bytes:
    """``model`` as an in-memory ONNX file (legacy exporter, fixed batch, unchecked): for timing a layer."""
    buffer = io.BytesIO()
    with _eval_mode(model):
        _onnx_export(model, example, buffer, opset=opset, dynamic_batch=False, exporter="torchscript")
    return buffer.getvalue()


def _onnx_export(
    model: nn.Module, example: Tensor, path: Path | io.BytesIO, *, opset: int, dynamic_batch: bool, exporter: str,
) -> None:
    common: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices are not the user's concern
        if exporter == "torchscript":
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            # the legacy exporter writes to a file object too (the stub names paths only)
            target: Any = path if isinstance(path, io.BytesIO) else str(path)
            torch.onnx.export(model, (example,), target, dynamo=False, dynamic_axes=axes, **common)
        else:
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - progress lines
                torch.onnx.export(
                    model, (example,), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False, **common
                )


def onnxruntime_session(
    path: str | os.PathLike | bytes, *, threads: int | None = None, optimization_level: str = "all", spinning: bool = False,
) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (or an ONNX file's bytes; ``threads`` intra-op
    threads, default torch's).

    ``spinning``: let the session's idle worker threads busy-wait for the next run (onnxruntime's
    default). Off here: several sessions in one process (a benchmark) would otherwise burn the
    cores each other needs (docs/speed.md, "ONNX Runtime").

    ``optimization_level``: onnxruntime's graph optimizations, ``"basic"`` (constant folding,
    Conv+BatchNorm fusion), ``"extended"`` (+ fused activations, ...) or ``"all"`` (+ the NCHWc
    layout: MLAS's blocked convolutions; onnxruntime's default).
    """
    import onnxruntime

    levels = {"disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization_level not in levels:
        raise UserError(f"optimization_level must be one of {', '.join(levels)}, got {optimization_level!r}")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = levels[optimization_level]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only
    model = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnxruntime_runner(session: Any, inputs: Tensor) -> Callable[[], Any]:
    """A no-argument callable running ``session`` on ``inputs`` (converted to numpy once)."""
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().contiguous().numpy()}
    return lambda: session.run(None, feed)


# ================================================================= TorchScript
def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor,
    *,
    method: str = "trace",
    check: bool = True,
    tolerance: float = RELATIVE_TOLERANCE,
) -> ExportResult:
    """Save ``model`` (eval mode) as TorchScript at ``path``, reloaded and checked against eager.

    ``method="trace"`` (default) records one forward of ``example_inputs`` (batch
    sizes stay symbolic); ``"script"`` compiles the Python code. torch 2.14 marks
    TorchScript deprecated, but it is still the format C++/mobile runtimes load.
    """
    example = _check_example(example_inputs)
    if method not in TORCHSCRIPT_METHODS:
        raise UserError(f"method must be one of {', '.join(TORCHSCRIPT_METHODS)}, got {method!r}")
    if check:  # before any file or folder is made
        _check_eager_finite(model, example, "TorchScript export")
    path = _target(path, ".pt")
    batches = _check_batches(example, dynamic_batch=True) if check else ()
    with _eval_mode(model), _temporary_beside(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.* is deprecated"
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the numerical check decides
        with torch.no_grad():
            # check_trace=False: our own check below compares outputs at two batch sizes instead
            scripted = (
                torch.jit.trace(model, (example,), check_trace=False) if method == "trace" else torch.jit.script(model)
            )
        torch.jit.save(scripted, str(tmp))
        difference = None
        if check:
            loaded = torch.jit.load(str(tmp), map_location=example.device)
            difference = _compare(model, loaded, example, batches)
            _raise_if_far(difference, tolerance, "TorchScript")
        _publish(tmp, path)
    return ExportResult(path, "torchscript", None, batches, difference)


# ===================================================================== helpers
def _check_example(example_inputs: Any) -> Tensor:
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() < 1:
        raise UserError("example_inputs must be one input batch tensor, e.g. torch.randn(1, 3, 32, 32)")
    return example_inputs


def _check_batches(example: Tensor, dynamic_batch: bool) -> tuple[int, ...]:
    return (1, 3) if dynamic_batch else (int(example.shape[0]),)


def _target(path: str | os.PathLike, suffix: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a folder; give a file name such as {path / ('model' + suffix)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file name in ``path``'s folder (same filesystem, so the final rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful os.replace


def _publish(tmp: Path, path: Path) -> None:
    """Give the checked file the permissions a plain ``open()`` would (mkstemp makes it 0600), then rename."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_eager_finite(model: nn.Module, example: Tensor, what: str) -> None:
    """``UserError`` before anything is exported if eager PyTorch itself returns NaN or inf."""
    with _eval_mode(model), torch.no_grad():
        if not all_finite(model(example)):
            raise UserError(non_finite_message(model, what) + "; no file was written")


def _compare(model: nn.Module, exported: Callable[[Tensor], Any], example: Tensor, batches: Sequence[int]) -> float:
    """The largest relative max difference between ``exported`` and eager over random batches.

    Non-finite outputs never compare: NaN or inf from eager is a ``UserError`` (the model is
    broken), from the exported file alone an :class:`ExportCheckError` (``max(0.0, nan)`` is
    0.0 in Python, so a NaN must never reach the running maximum).
    """
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in batches:
        x = torch.randn((batch, *example.shape[1:]), generator=generator, dtype=example.dtype).to(example.device)
        with torch.no_grad():
            expected = _first_tensor(model(x)).float().cpu()
            actual = exported(x)
        actual = torch.as_tensor(_first_tensor(actual)).float().cpu()
        if actual.shape != expected.shape:
            raise ExportCheckError(
                f"exported model returns shape {tuple(actual.shape)} at batch {batch}, eager returns {tuple(expected.shape)}"
            )
        if not all_finite(expected):
            raise UserError(non_finite_message(model, "export") + "; no file was written")
        if not all_finite(actual):
            raise ExportCheckError(
                f"exported model returns NaN or inf at batch {batch} where eager PyTorch is finite; no file was written"
            )
        scale = max(expected.abs().max().item(), 1e-12)
        worst = max(worst, (actual - expected).abs().max().item() / scale)
    return worst


def _first_tensor(value: Any) -> Any:
    while isinstance(value, (tuple, list)):
        value = value[0]
    if isinstance(value, dict):
        return _first_tensor(next(iter(value.values())))
    return value


def _raise_if_far(difference: float, tolerance: float, what: str) -> None:
    if not difference <= tolerance:  # also catches NaN
        raise ExportCheckError(
            f"{what} export differs from eager PyTorch: max relative difference {difference:.3g} > {tolerance:g}; "
            "no file was written"
        )
