"""Shared plumbing for the kernel files: backend dispatch and input validation.

Every public op in `selfsup.kernels` has three implementations:

- ``"ref"``    plain torch written like the paper's pseudocode (the test oracle);
- ``"torch"``  the portable path: chunked torch inside the torch custom ops, any device;
- ``"triton"`` the fused Triton kernels: on CUDA, or on CPU under ``TRITON_INTERPRET=1``.

`choose_backend` picks one per call. ``SELFSUP_KERNELS=triton|torch|ref`` forces a path; it is
read at call time so tests and benchmarks can flip it.

triton is imported at most once, guarded (`_import_triton`, as `_triton.py` does for the
package): `import selfsup.kernels` must work without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterable

import torch

BACKENDS = ("triton", "torch", "ref")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ENV_BACKEND = "SELFSUP_KERNELS"


@functools.cache
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


_HAVE_TRITON = _import_triton()  # at import: torch.compile traces a plain global read


def have_triton() -> bool:
    """True when `import triton` succeeds (it is absent on macOS / ARM wheels). Decided once
    at import, not through a functools.cache at call time: Dynamo warns about every cached
    function it traces (the public ops call this under torch.compile)."""
    return _HAVE_TRITON


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the Triton path can run on these tensors: CUDA, or CPU under the interpreter.

    float64 CUDA tensors cannot: no fp64 configuration is registered or compiled, and fp64
    ``tl.dot`` support differs between triton versions. (Under the interpreter fp64 CPU
    tensors do run: that is how the kernels' math is tested in float64.)
    """
    return triton_unusable_reason(tensors) is None


def triton_unusable_reason(tensors: Iterable[torch.Tensor]) -> str | None:
    """None when the Triton path can run on `tensors`, else why not (for error messages)."""
    if not have_triton():
        return "triton is not installed"
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    devices = {t.device.type for t in ts}
    if devices == {"cuda"}:
        if any(t.dtype == torch.float64 for t in ts):
            return "float64 CUDA tensors have no compiled Triton configuration"
        if interpreting():
            _warn_interpreting_cuda()
        return None
    if devices <= {"cpu"} and interpreting():
        return None
    return (f"inputs are on {sorted(devices)}; Triton needs CUDA, or TRITON_INTERPRET=1 "
            "for CPU tensors")


@functools.cache
def _warn_interpreting_cuda() -> None:
    """Once per process: TRITON_INTERPRET=1 with CUDA tensors runs every kernel on the CPU
    interpreter (copying each tensor through host memory), which is never what a GPU run
    wants; it is usually a stray variable from a test environment."""
    warnings.warn("TRITON_INTERPRET=1 is set while inputs are CUDA tensors: the Triton "
                  "kernels run on the CPU interpreter, thousands of times slower than "
                  "compiled; unset TRITON_INTERPRET for GPU runs", RuntimeWarning, stacklevel=4)


def forced_backend() -> str | None:
    """The backend named by ``SELFSUP_KERNELS``, or None when unset."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not one of {BACKENDS}")
    return value


def choose_backend(*tensors: torch.Tensor | None, unsupported: str | None = None) -> str:
    """Pick "triton", "torch" or "ref" for an op whose inputs are `tensors`.

    Default: Triton when it can run on these inputs, else the portable torch path.
    `unsupported` is the caller's reason the Triton kernels cannot take these inputs (e.g.
    "C=1024 > 512"): the portable path then, unless Triton is forced.
    A forced "triton" that cannot run raises, naming why, instead of silently falling back.
    """
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    forced = forced_backend()
    why = unsupported or triton_unusable_reason(ts)
    if forced == "triton" and why is not None:
        raise RuntimeError(f"{ENV_BACKEND}=triton was requested but {why}")
    if forced is not None:
        return forced
    return "triton" if why is None else "torch"


def device_guard(t: torch.Tensor):
    """Context for a kernel launch on `t`'s device.

    Triton launches on the *current* CUDA device; a tensor on cuda:1 while cuda:0 is current
    would be an illegal address. Every launcher wraps its launches in this.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def fp32_matmul_allows_tf32() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls, read now (never at import).

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" | "tf32" |
    "none" = inherit ``torch.backends.fp32_precision``), and reading the legacy
    ``allow_tf32`` after the new API was used raises. The legacy flag is read only on a torch
    without the new API.
    """
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    return prec == "tf32"


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


def check_temperature(name: str, value: object, *, allow_tensor: bool = False):
    """Return `value` as a float, or raise ValueError unless it is a finite number > 0.

    allow_tensor=True (for ops whose kernels read the temperature from memory): a 1-element
    floating tensor comes back as a 0-d tensor and is never read on the host when it lives on
    an accelerator, since that read would wait for the device every step. Its value is
    checked there by ``torch._assert_async``, which fails at the next synchronization. A CPU
    tensor is checked here: reading host memory costs nothing.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a positive scalar, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if not allow_tensor:
            value = value.item()
        elif not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        else:
            t = value.reshape(())
            if t.device.type == "cpu":
                # under torch.compile a host read would break the graph: the op that takes
                # it checks it in its body (`_custom_op.join_temperature`)
                if not torch.compiler.is_compiling():
                    _check_positive(name, t.item())
            else:
                torch._assert_async((t > 0) & torch.isfinite(t),
                                    f"{name} must be a finite number > 0")
            return t
    return _check_positive(name, value)


def _check_positive(name: str, value: object) -> float:
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
