"""Test helpers for kernels, public so projects importing our kernels can reuse them.

The low-precision rule (ROOFLINE.md, flash-attention's convention): in fp16/bf16 a kernel's
error against a float64 reference may be at most twice the error PyTorch itself makes computing
the reference in that dtype, plus a small atol. `assert_scaled_grad_verdict` is that rule for
gradients at GradScaler's scale (tests/kernels/test_*_gradscale.py).

Compiled-versus-eager comparisons (tests/kernels/test_custom_ops*.py): `loss_and_grads` at an
upstream gradient of `UPSTREAM`, judged by `assert_all_close` within `TOL`.
"""

from __future__ import annotations

import math
import os

import torch

# atol per dtype, added to the 2x-torch-error bound (values and gradients).
LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 5e-4}
# Direct float64 comparisons: (rtol, atol).
TOL64 = dict(rtol=1e-7, atol=1e-9)
# Compiled vs eager, per dtype: float32 allows the reassociation a traced graph may do.
TOL = {torch.float64: TOL64, torch.float32: dict(rtol=2e-5, atol=1e-6)}
# The upstream gradient of those comparisons: not 1, so a backward that drops it fails.
UPSTREAM = 1.7


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


def loss_and_grads(fn, args, requires, *extra, **kw) -> list[torch.Tensor]:
    """[loss, then the gradient of each of `args` whose `requires` is True] of
    fn(*args, *extra, **kw) at upstream gradient UPSTREAM. The args are cloned into fresh
    leaves, so an eager and a compiled call see the same inputs and neither accumulates."""
    leaves = [a.detach().clone().requires_grad_(r) for a, r in zip(args, requires, strict=True)]
    loss = fn(*leaves, *extra, **kw)
    grads = torch.autograd.grad(loss, [x for x in leaves if x.requires_grad],
                                grad_outputs=torch.full_like(loss, UPSTREAM))
    return [loss.detach(), *grads]


def assert_all_close(got, want, dtype: torch.dtype) -> None:
    """Two `loss_and_grads` lists agree: as many outputs, each of the same dtype (a compiled
    graph must not change what a gradient is stored in) and close within TOL[dtype]."""
    assert len(got) == len(want), (len(got), len(want))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, i=i: f"output {i}: {m}")


def assert_scaled_grad_verdict(where: str, ours, theirs, floor, n_entries: int) -> None:
    """The GradScaler verdict on a low-precision gradient at upstream 65536.

    ours, theirs, floor: (exact zeros, mean relative error, max relative error, max absolute
    error) of our gradient, of torch's recipe in the dtype (autocast) and of the exact
    gradient rounded to the dtype, each against float64 on the same rounded inputs (how the
    errors are taken is the caller's: test_*_gradscale.py's `metrics`). Each of ours must be
    at most 2x torch's, floored at the rounded exact gradient's (nothing does better) and,
    for the zeros, at one entry. A non-finite figure of torch's (its fp16 recipe can
    overflow at 65536) sets no bar: the floor alone does. `where` and `n_entries` (the
    gradient's entries) name the case in the message.
    """
    z, tz, fz = ours[0], theirs[0], floor[0]
    assert z <= 2 * max(tz, fz, 1), f"{where}: {z} exact zeros of {n_entries}, torch {tz}"
    for i, what in ((1, "mean rel. error"), (2, "max rel. error"), (3, "max abs. error")):
        bound = 2 * max(theirs[i] if math.isfinite(theirs[i]) else 0.0, floor[i])
        assert ours[i] <= bound, f"{where}: {what} {ours[i]:.3e}, torch {theirs[i]:.3e}"
