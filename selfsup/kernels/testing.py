"""Test helpers for kernels, public so projects importing our kernels can reuse them.

The low-precision rule (ROOFLINE.md, flash-attention's convention): in fp16/bf16 a kernel's
error against a float64 reference may be at most twice the error PyTorch itself makes computing
the reference in that dtype, plus a small atol.
"""

from __future__ import annotations

import os

import torch

# atol per dtype, added to the 2x-torch-error bound (values and gradients).
LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 5e-4}
# Direct float64 comparisons: (rtol, atol).
TOL64 = dict(rtol=1e-7, atol=1e-9)


def fresh_seed() -> int:
    """A new seed per call (``SELFSUP_TEST_SEED`` pins it to reproduce a failure)."""
    pinned = os.environ.get("SELFSUP_TEST_SEED")
    seed = int(pinned) if pinned else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_lowp_close(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_lowp: torch.Tensor,
    dtype: torch.dtype,
    *,
    factor: float = 2.0,
    atol: float | None = None,
) -> None:
    """Assert err(out) <= factor * err(torch_lowp) + atol, both measured against `ref64`.

    `out` is our result on low-precision inputs, `torch_lowp` PyTorch's reference computed
    in that same dtype on the same inputs, `ref64` the float64 reference on those inputs.
    """
    atol = LOWP_ATOL[dtype] if atol is None else atol
    ours, theirs = max_abs_err(out, ref64), max_abs_err(torch_lowp, ref64)
    bound = factor * theirs + atol
    assert ours <= bound, (f"{name} ({dtype}): error {ours:.3e} > {factor} x torch's "
                           f"{theirs:.3e} + {atol:.1e} = {bound:.3e}")
