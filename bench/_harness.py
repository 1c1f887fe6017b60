"""Shared benchmark plumbing: environment, peak memory, and the extra_info every row carries.

Each benchmark row records the device, torch/triton versions, the median time in µs, achieved
GB/s or TFLOP/s, % of the roofline floor (ROOFLINE.md, H100 SXM; only meaningful on that GPU),
and peak extra memory during one call. On CPU the Triton interpreter's timings mean nothing,
so `skip_if_interpreted` drops the Triton rows there.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import pytest
import torch

from selfsup.kernels._triton import HAS_TRITON
from selfsup.kernels._utils import interpreting

IMPLS = ("ref", "torch", "triton")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def versions() -> dict:
    info = {"device": device_name(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    return info


def skip_if_interpreted(impl: str) -> None:
    """Triton rows only where Triton compiles for real (CUDA)."""
    if impl == "triton" and (not torch.cuda.is_available() or interpreting()):
        pytest.skip("Triton timings need CUDA; the CPU interpreter's timings mean nothing")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call of `fn` above what was live before it."""
    if torch.cuda.is_available():
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: replay the profiler's allocation events ([memory], signed nbytes) in time order.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def run(benchmark, fn: Callable[[], object], *, impl: str, shape: str, bytes_moved: float = 0,
        flops: float = 0, floor_us: float = 0, rounds: int | None = None, **extra) -> None:
    """Time `fn` (synchronized), then record a full row in benchmark.extra_info."""

    def timed():
        out = fn()
        synchronize()
        return out

    if rounds is None:
        benchmark(timed)
    else:
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    info = benchmark.extra_info
    info.update(versions())
    info.update(impl=impl, shape=shape, **extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        us = stats.stats.median * 1e6
        info["median_us"] = round(us, 2)
        if bytes_moved:
            info["GB/s"] = round(bytes_moved / us / 1e3, 2)
        if flops:
            info["TFLOP/s"] = round(flops / us / 1e6, 3)
        if floor_us:
            info["floor_us"] = floor_us
            info["pct_of_floor"] = round(100 * floor_us / us, 2)
    info["peak_mb"] = round(peak_memory(fn) / 2**20, 2)
