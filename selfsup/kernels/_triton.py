"""Import triton if it is there, or stand-ins that let kernel files import without it.

Kernel files do ``from ._triton import triton, tl, HAS_TRITON`` and define their
``@triton.jit`` functions unconditionally. Without triton (macOS, ARM, a broken install) the
stand-in ``jit`` returns an object that raises on launch; the dispatcher never chooses the
Triton path then, so users only see it if they force ``SELFSUP_KERNELS=triton``.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a triton whose own imports fail
    HAS_TRITON = False

    class _Anything:
        """Attribute sink: `tl.constexpr`, `tl.float32`, ... evaluate to something inert."""

        def __getattr__(self, name: str) -> Any:
            return _Anything()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return _Anything()

    class _MissingKernel:
        def __init__(self, fn: Any) -> None:
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(f"{self.__name__}: triton is not installed; "
                               "use SELFSUP_KERNELS=torch (the portable path)")

    class _TritonStub:
        @staticmethod
        def jit(fn: Any = None, **kwargs: Any) -> Any:
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (int(n) - 1).bit_length())

        def __getattr__(self, name: str) -> Any:
            return _Anything()

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _Anything()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl"]
