"""Whole-model timing: latency, throughput and peak memory of models side by side.

Builds on the leaf :mod:`norton.deploy.timing` and, for ``optimize=True`` or the
onnxruntime runtime, on :mod:`norton.deploy.optimize` and :mod:`norton.deploy.export`.
``norton benchmark`` and ``norton compress`` call :func:`compare_models`.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from norton.deploy.timing import LatencyStats, compare_callables, peak_memory_bytes
from norton.errors import UserError
from norton.limits import check_batch_size, check_input_size, check_repeats

RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class ModelTiming:
    """Latency, throughput and peak memory of one model at one batch size."""

    batch_size: int
    latency: LatencyStats
    peak_memory_bytes: int | None

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size / (self.latency.median_ms / 1e3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "latency": self.latency.as_dict(),
            "throughput_images_per_s": self.throughput,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def torch_runner(model: nn.Module, inputs: Tensor) -> Callable[[], Any]:
    """``model(inputs)`` under ``torch.inference_mode`` (the model is put in eval mode)."""
    model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(inputs)

    return run


def time_models(
    runners: Mapping[str, Callable[[], Any]],
    *,
    batch_size: int,
    warmup: int = 5,
    repeats: int = 30,
    max_time_s: float | None = None,
    device: torch.device | str | None = None,
    memory: bool = True,
) -> dict[str, ModelTiming]:
    """Time whole-model runners interleaved and measure each one's peak memory."""
    stats = compare_callables(runners, warmup=warmup, repeats=repeats, max_time_s=max_time_s, device=device)
    return {
        name: ModelTiming(
            batch_size, stats[name], peak_memory_bytes(runner, device=device) if memory else None
        )
        for name, runner in runners.items()
    }


def compare_models(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    device: torch.device | str = "cpu",
    runtime: str = "torch",
    optimize: bool = False,
    warmup: int = 5,
    repeats: int = 30,
    max_time_s: float | None = None,
    memory: bool = True,
    workdir: str | os.PathLike | None = None,
) -> dict[int, dict[str, ModelTiming]]:
    """Time several models side by side on random inputs ``(B, *input_shape)``, per batch size.

    Models are timed interleaved (see :func:`~norton.deploy.timing.compare_callables`), so
    their ratio is fair on a loaded machine. ``optimize`` runs
    :func:`norton.deploy.optimize.optimize_for_inference` for every model at every batch
    size (the fastest form depends on it). ``runtime="onnxruntime"`` exports each
    (checked) model to ONNX in ``workdir`` (a temporary folder by default) and times
    an onnxruntime CPU session (with ``optimize``, its forms chosen by timing them in
    onnxruntime; idle session threads do not spin, so the sessions timed side by side
    do not steal each other's cores). Returns ``{batch_size: {name: ModelTiming}}``.
    """
    if runtime not in RUNTIMES:
        raise UserError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    device = torch.device(device)
    if runtime == "onnxruntime" and device.type != "cpu":
        raise UserError("the onnxruntime runtime runs on CPU here; use --device cpu or --runtime torch")
    check_repeats(warmup, "warmup", minimum=0)
    check_repeats(repeats, "repeats")
    for batch in batch_sizes:
        check_batch_size(batch)
        check_input_size((batch, *input_shape), "input shape")  # before any random batch is allocated
    results: dict[int, dict[str, ModelTiming]] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for batch in batch_sizes:
            generator = torch.Generator().manual_seed(batch)
            inputs = torch.randn((batch, *input_shape), generator=generator).to(device)
            runners: dict[str, Callable[[], Any]] = {}
            for name, model in models.items():
                prepared = model.to(device).eval()
                if optimize:
                    from norton.deploy.optimize import optimize_for_inference

                    # for onnxruntime, forms are chosen by timing them in onnxruntime: its kernels rank them
                    # differently from PyTorch's (docs/speed.md, "ONNX Runtime")
                    prepared = optimize_for_inference(prepared, inputs, device=device, runtime=runtime)
                if runtime == "onnxruntime":
                    from norton.deploy.export import export_onnx, onnxruntime_runner, onnxruntime_session

                    path = os.path.join(tmp, f"{len(runners)}_b{batch}.onnx")
                    export_onnx(prepared.cpu(), path, inputs.cpu())
                    runners[name] = onnxruntime_runner(onnxruntime_session(path), inputs)
                else:
                    runners[name] = torch_runner(prepared, inputs)
            results[batch] = time_models(
                runners, batch_size=batch, warmup=warmup, repeats=repeats, max_time_s=max_time_s,
                device=device, memory=memory,
            )
    return results
