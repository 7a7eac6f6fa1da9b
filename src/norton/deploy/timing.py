"""Timing utilities: warm up, run many times, report the median and the spread.

A leaf module (it imports nothing from norton but the error type), used by
:mod:`norton.deploy.optimize` (per-layer form choice), :mod:`norton.deploy.benchmark`
(whole models, ``norton benchmark``) and the scripts in ``benchmarks/``. Timings on a shared
machine are noisy, so callables that are compared are timed *interleaved*
(one run of each per round, in a rotating order) and judged by their medians:
a burst of load from another process then hits every candidate alike.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from norton.errors import UserError


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float  # 25th percentile
    q3_ms: float  # 75th percentile
    min_ms: float
    max_ms: float
    runs: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @classmethod
    def from_seconds(cls, times: Sequence[float]) -> LatencyStats:
        if not times:
            raise ValueError("no timings to summarise")
        ms = sorted(t * 1e3 for t in times)
        if len(ms) >= 2:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q1 = q3 = ms[0]
        return cls(statistics.median(ms), q1, q3, ms[0], ms[-1], len(ms))

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so a wall-clock timing covers it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    max_time_s: float | None = None,
    device: torch.device | str | None = None,
) -> LatencyStats:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    ``max_time_s`` stops early (after at least 3 timed runs) once the timed runs
    have taken that long, so slow models keep benchmarks bounded.
    """
    return compare_callables({"fn": fn}, warmup=warmup, repeats=repeats, max_time_s=max_time_s, device=device)["fn"]


def compare_callables(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    max_time_s: float | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LatencyStats]:
    """Time several callables interleaved: each round runs every one once, in a rotating order.

    Returns ``{name: LatencyStats}``. ``max_time_s`` bounds the total timed
    duration (at least 3 rounds always run).
    """
    if warmup < 0 or repeats < 1:
        raise UserError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    spent = 0.0
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate: no candidate always runs first
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if max_time_s is not None and round_index >= 2 and spent >= max_time_s:
            break
    return {name: LatencyStats.from_seconds(values) for name, values in times.items()}


# ------------------------------------------------------------------ memory
def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand memory that malloc keeps for reuse back to the OS (glibc only), so the next peak is real growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False where unsupported."""
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> int | None:
    """Extra memory at the peak of one ``fn()`` call, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
    CPU: the growth of the process's peak resident set (``VmHWM`` reset first
    on Linux; elsewhere the ``ru_maxrss`` growth, which reads 0 when an earlier
    peak was higher). ``None`` when it cannot be measured.
    """
    if device is not None and torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - allocated)
    if _reset_peak_rss():
        before = _read_status_kib("VmRSS")
        fn()
        peak = _read_status_kib("VmHWM")
        if before is not None and peak is not None:
            return max(0, peak - before) * 1024
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, after_max - before_max) * 1024 if os.name == "posix" else None


# ------------------------------------------------------------------ environment
def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), ``None`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a timing depends on: versions, threads, device name."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (os.uname().machine if hasattr(os, "uname") else "cpu")
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
    }
