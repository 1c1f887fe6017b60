"""Shared plumbing for the kernel files: backend dispatch and input validation.

Every public op in `selfsup.kernels` has three implementations:

- ``"ref"``    plain torch written like the paper's pseudocode (the test oracle);
- ``"torch"``  the portable path: chunked torch with a custom autograd.Function, any device;
- ``"triton"`` the fused Triton kernels: on CUDA, or on CPU under ``TRITON_INTERPRET=1``.

`choose_backend` picks one per call. ``SELFSUP_KERNELS=triton|torch|ref`` forces a path; it is
read at call time so tests and benchmarks can flip it.

Nothing here imports triton eagerly: `import selfsup.kernels` must work without it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch

BACKENDS = ("triton", "torch", "ref")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ENV_BACKEND = "SELFSUP_KERNELS"


@functools.cache
def have_triton() -> bool:
    """True when `import triton` succeeds (it is absent on macOS / ARM wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the Triton path can run on these tensors: CUDA, or CPU under the interpreter."""
    if not have_triton():
        return False
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if devices == {"cuda"}:
        return True
    return devices <= {"cpu"} and interpreting()


def forced_backend() -> str | None:
    """The backend named by ``SELFSUP_KERNELS``, or None when unset."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not one of {BACKENDS}")
    return value


def choose_backend(*tensors: torch.Tensor | None) -> str:
    """Pick "triton", "torch" or "ref" for an op whose inputs are `tensors`.

    Default: Triton when it can run on these inputs, else the portable torch path.
    A forced "triton" that cannot run raises instead of silently falling back.
    """
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    forced = forced_backend()
    if forced == "triton" and not triton_usable(ts):
        devices = sorted({t.device.type for t in ts})
        why = "triton is not installed" if not have_triton() else (
            f"inputs are on {devices}; Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors"
        )
        raise RuntimeError(f"{ENV_BACKEND}=triton was requested but {why}")
    if forced is not None:
        return forced
    return "triton" if triton_usable(ts) else "torch"


# ----------------------------------------------------------------------------- validation
def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """Raise ValueError naming `name` unless `t` is a tensor of the expected rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError listing every tensor's device unless they all share one."""
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all inputs must be on one device, got {where}")
    return next(iter(devices)) if devices else torch.device("cpu")


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype | None:
    """Raise ValueError listing every tensor's dtype unless they all share one."""
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{k} is {v.dtype}" for k, v in present.items())
        raise ValueError(f"all inputs must share one dtype, got {what}")
    return next(iter(dtypes)) if dtypes else None


def check_temperature(name: str, value: object) -> float:
    """Return `value` as a float, or raise ValueError unless it is a finite number > 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a positive scalar, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (v > 0.0 and v != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


# ----------------------------------------------------------------------------- small helpers
def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, else the dtype itself (fp64 stays fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
