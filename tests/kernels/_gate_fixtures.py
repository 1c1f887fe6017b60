"""Deliberately broken kernels: the compile gate must reject each of them.

Imported by test_compile.py in a subprocess (`--module _gate_fixtures`), never by selfsup.
"""

from selfsup.kernels._registry import KernelConfig, register_kernel
from selfsup.kernels._triton import tl, triton


@triton.jit
def arange_not_constexpr(x_ptr, BLOCK):
    # The interpreter runs this happily; the compiler needs a constexpr range.
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs.to(tl.float32))


register_kernel(arange_not_constexpr, signature={"x_ptr": "*fp32", "BLOCK": "i32"},
                configs=[KernelConfig("i32 block", {})])


@triton.jit
def dot_mixed_dtypes(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    # fp16 x fp32 operands: the interpreter upcasts silently, the compiler refuses.
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


register_kernel(dot_mixed_dtypes,
                signature={"a_ptr": "*fp16", "b_ptr": "*fp32", "c_ptr": "*fp32",
                           "BLOCK": "constexpr"},
                configs=[KernelConfig("fp16 x fp32", {"BLOCK": 32})])


@triton.jit
def dot_spills(a_ptr, c_ptr, BLOCK: tl.constexpr):
    # A 64x64x64 fp32 IEEE dot (no tensor cores) needs more than 255 registers: it spills
    # (PLATFORM.md measured 255 registers + a 472-byte stack on sm_90).
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    c = tl.dot(a, a, input_precision="ieee")
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], c)


register_kernel(dot_spills, signature={"a_ptr": "*fp32", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                configs=[KernelConfig("fp32 ieee 64", {"BLOCK": 64}, default=True)])


@triton.jit
def not_registered(x_ptr):
    tl.store(x_ptr, 1.0)
