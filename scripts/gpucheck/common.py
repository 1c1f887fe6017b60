"""What every section shares: the case model, the device context, timers and peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# Nominal H100 SXM ceilings from ROOFLINE.md, used when nothing was measured (CPU dry run).
NOMINAL = {"copy_gbs": 3000.0, "bf16_tflops": 790.0, "fp32_tflops": 66.9}


@dataclass
class Case:
    """One unit of work. `run()` returns a JSON-able row; its "status" defaults to "ok".

    `timeout` is the hard limit the supervisor enforces by killing the worker; `min_s` is
    what the case needs at least, so it is skipped rather than started when less is left.
    """

    id: str
    run: Callable[[], dict]
    timeout: float = 60.0
    min_s: float = 1.0
    meta: dict = field(default_factory=dict)  # merged into the row (also an error's row)


@dataclass
class Context:
    dry_run: bool
    device: torch.device
    results: dict = field(default_factory=dict)  # section -> case id -> row (so far)
    section_end: float | None = None  # wall-clock end of the running section's budget

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def ceilings(self) -> dict:
        """Bandwidth and peaks for the floors: measured by bench's first case, else nominal."""
        row = self.results.get("bench", {}).get("ceilings", {})
        measured = row.get("measured", {}) if row.get("status") == "ok" else {}
        return {k: measured.get(k, v) for k, v in NOMINAL.items()} | {
            "source": {k: ("measured" if k in measured else "nominal") for k in NOMINAL}}


@contextlib.contextmanager
def kernels_backend(name: str | None):
    """Force a selfsup.kernels path (read at call time from SELFSUP_KERNELS)."""
    old = os.environ.get("SELFSUP_KERNELS")
    if name is None:
        os.environ.pop("SELFSUP_KERNELS", None)
    else:
        os.environ["SELFSUP_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SELFSUP_KERNELS", None)
        else:
            os.environ["SELFSUP_KERNELS"] = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, *, dry_run: bool,
            warmup_ms: float = 10.0, rep_ms: float = 60.0) -> float:
    """Median time of `fn` in microseconds.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed before every repetition, median),
    falling back to our own event loop if its signature differs. CPU: wall clock, median of 3.
    """
    if device.type != "cuda":
        fn()
        reps = 1 if dry_run else 3
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)
    try:
        from triton.testing import do_bench

        return 1e3 * float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:
        return 1e3 * _event_median_ms(fn, device, warmup_ms, rep_ms)


def _event_median_ms(fn, device, warmup_ms, rep_ms) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    fn()
    torch.cuda.synchronize(device)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(3):
        fn()
    t1.record()
    torch.cuda.synchronize(device)
    est = max(t0.elapsed_time(t1) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(3, min(1000, int(rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory one call of `fn` allocates beyond what was live before (MB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 1e6


def error_row(e: BaseException) -> dict:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": "".join(tb)[-3000:]}


def fatal_cuda_error(e: BaseException) -> bool:
    """Errors after which the CUDA context is unusable: the worker must restart."""
    text = str(e)
    return any(s in text for s in ("illegal memory access", "device-side assert",
                                   "unspecified launch failure", "CUDA error: an illegal",
                                   "misaligned address", "CUDA error: unknown error",
                                   "when stream is capturing", "previous error during capture"))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git checkout here; pass --commit)"


def environment(ctx: Context, commit: str | None) -> dict:
    """What ran where: device, versions, the settings that change kernel numerics."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        triton_version = f"not importable ({type(e).__name__})"
    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": commit or git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "dry_run": ctx.dry_run,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   driver=_nvidia_smi("driver_version"))
    else:
        env["gpu"] = "none (CPU)"
    return env


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "missing"


def _nvidia_smi(field_name: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def slug(name: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown-gpu"
