"""Fused ops as torch custom ops: the shared machinery (issue 23.1).

A raw Triton launch (or a Python loop over chunks) inside a compiled region breaks
`torch.compile(fullgraph=True)`: Dynamo cannot trace `kernel[grid](...)`, data-dependent
Python, or an `autograd.Function` whose forward allocates and launches. So each kernel module
declares its forward and backward as opaque ops in the ``selfsup`` namespace
(``torch.ops.selfsup.<name>``):

- the *body* is the launcher (Triton on CUDA or under the interpreter, or the portable torch
  path, per the `backend` string the public API chose with `choose_backend`, eagerly, before
  the op: dispatch rules and input validation stay exactly as without compile);
- a *fake* implementation gives the outputs' shapes and dtypes from the inputs' (symbolic)
  sizes, so Dynamo, AOTAutograd and `dynamic=True` never run the body;
- the autograd formula is registered with the op (`register_autograd`): the forward op
  returns what backward needs (e.g. InfoNCE's query gradient, computed in the same sweep),
  `setup_context` saves it, and backward is plain torch plus, where a second sweep is needed,
  another op of the same kind.

Why `custom_op` and not `triton_op`: a `triton_op` body must be traceable down to the
`wrap_triton` launches, but our bodies choose tiles, splits and buffers in Python, run the
interpreter on CPU, and share one op with the portable path. Inductor cannot fuse into our
kernels either way; opaque ops cost one Python call each.

Constraints a body must keep (checked by `torch.library.opcheck`): outputs are fresh tensors
(never an input, a view of one, or one tensor twice), so an output a path does not compute is
`placeholder(...)`, an empty tensor; the fake returns exactly the same shapes, dtypes and
devices for the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .. import dist
from ._utils import _check_positive

NAMESPACE = "selfsup"


def fused_op(name: str, *, fake: Callable, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: the annotated function becomes ``torch.ops.selfsup.<name>`` with `fake` as
    its fake (meta) implementation. Returns the op (call it like the function)."""

    def wrap(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        return op

    return wrap


def placeholder(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor standing for an output this call does not compute (custom ops cannot
    return None in a tensor slot); one fresh tensor per slot."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def present(t: torch.Tensor | None) -> torch.Tensor | None:
    """None for a `placeholder`, else `t` (a real output always has numel >= 1 here: every
    op validates N >= 1 and C >= 1 before it is entered)."""
    return None if t is None or t.numel() == 0 else t


def split_temperature(value) -> tuple[torch.Tensor | None, float]:
    """A validated temperature (float or 0-d tensor) as the two op arguments
    ``(tensor or None, float)``: op schemas take one type per argument. A tensor is passed as
    a tensor (never read on the host); the float slot is then unused (0.0)."""
    if isinstance(value, torch.Tensor):
        return value, 0.0
    return None, float(value)


def join_temperature(tensor: torch.Tensor | None, value: float, name: str = "temperature",
                     device: torch.device | None = None):
    """Inverse of `split_temperature`, inside an op body.

    A CPU tensor is checked here (ValueError naming `name` unless finite and > 0): eager
    calls checked it before the op already, but a compiled graph cannot read it while tracing,
    and the body is where it is a real tensor (reading host memory waits for no device). With
    `device` (the inputs'), a CPU tensor for inputs elsewhere becomes that float.
    """
    if tensor is None:
        return value
    if tensor.device.type == "cpu":
        v = _check_positive(name, tensor.item())
        if device is not None and device.type != "cpu":
            return v
    return tensor


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """SUM of `x` across ranks, for a registered backward (Barlow Twins', VICReg's column
    sums); `x` itself on one process. A functional collective (a fresh tensor, the group by
    name): AOTAutograd traces it into a compiled backward as `_c10d_functional.all_reduce` +
    `wait_tensor`, where the in-place `torch.distributed.all_reduce` would capture the
    ProcessGroup object in the graph (compiling the backward then fails: it deep-copies the
    graph and a ProcessGroup cannot be copied). Eager calls wait for it at first use."""
    if not dist.is_dist():
        return x
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(x, "sum", torch.distributed.group.WORLD)


# ----------------------------------------------------------------------------- shared ops
def _scale_grad_fake(grad, upstream, dtype):
    return torch.empty_like(grad, dtype=dtype)


@fused_op("scale_grad", fake=_scale_grad_fake)
def scale_grad(grad: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gradient computed in forward (fp32 for fp16/bf16 inputs) times the upstream gradient,
    one rounding into a fresh tensor of `dtype`: the backward of every loss whose forward
    writes d input (DINO's portable path, MAE's loss). Fresh, not in place: an op's output
    may not alias its input, and a retain_graph second backward stays correct (the price is
    one more input-sized buffer during backward than an in-place scale)."""
    return torch.mul(grad, upstream, out=torch.empty_like(grad, dtype=dtype))



# A loss whose forward writes d input (DINO's portable path, MAE's loss) hands that buffer to
# backward. A fresh `scale_grad` output is right for every backward, but on CPU a fresh
# input-sized buffer page-faults: ~110 ms for DINO's 200 MB dS, more than the multiply
# (bench/results/cpu/before_after.md). So eager CPU calls scale the saved buffer in place on
# the first backward (what the pre-custom-op code did) and remember the factor; a later
# backward through a retained graph (gradcheck, several vjps) scales the already-scaled buffer
# by the ratio into a fresh tensor. The buffer stays a saved tensor, so autograd releases it
# after a one-shot backward and AccumulateGrad takes it as .grad without a copy. Elsewhere
# (CUDA, where the caching allocator makes a fresh buffer cheap and reading the factor would
# sync; compiled graphs, whose tensors are traced) it is always the fresh `scale_grad`.
def save_grad_buffer(ctx, grad: torch.Tensor) -> None:
    """setup_context side: keep the forward-computed gradient for `scaled_grad_buffer`."""
    ctx.save_for_backward(grad)
    ctx.grad_factor = None


def scaled_grad_buffer(ctx, upstream: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """backward side: the saved gradient times the (0-d) upstream gradient, in `dtype`."""
    (buf,) = ctx.saved_tensors
    eager_cpu = (buf.device.type == "cpu" and type(buf) is torch.Tensor
                 and not torch.compiler.is_compiling())
    if not eager_cpu:
        return scale_grad(buf, upstream, dtype)
    if ctx.grad_factor is not None:  # a retained graph's next backward: buf holds grad * factor
        return scale_grad(buf, upstream / ctx.grad_factor, dtype)
    factor = float(upstream)  # a CPU read: free
    if buf.dtype != dtype or factor == 0.0:  # a cast is due, or 0 would erase the buffer
        return scale_grad(buf, upstream, dtype)
    ctx.grad_factor = factor
    # through .data: the saved tensor's version stays, so a later backward may unpack it (it
    # knows the factor); nothing else holds this buffer yet
    buf.data.mul_(upstream)
    return buf
