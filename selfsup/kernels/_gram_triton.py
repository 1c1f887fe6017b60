"""Fused <A A^T, B B^T>_F for Barlow Twins and VICReg, with A, B standardised on the fly.

Both losses need the squared Frobenius norm of a D x D matrix built from two (N, D) batches:
Barlow Twins' ||A^T B||_F^2 (A, B the per-feature standardised views) and VICReg's
||X^T X||_F^2 (X the centred view). The identity ||A^T B||_F^2 = <A A^T, B B^T>_F turns the
D x D product into two N x N Grams, 2 x 2 N^2 D FLOPs instead of 2 N D^2 (16x fewer at
N = 256, D = 8192; docs/kernels-barlow-vicreg.md has the full comparison).

This kernel goes one step further than two cuBLAS GEMMs: each program owns one
(BLOCK_N x BLOCK_N) tile (i, j) of both Grams, sweeps D in BLOCK_D chunks accumulating
A_i A_j^T and B_i B_j^T in registers, and writes only sum(Ga_ij * Gb_ij). So

- neither Gram reaches global memory (at N = 2048, 2 x 16.8 MB written and read back saved);
- only tiles j >= i do work, counted twice off the diagonal: both Grams are symmetric, so
  the FLOPs halve to 2 N^2 D (a GEMM A @ A.T cannot skip the mirrored half);
- the raw inputs are read as they are (fp32 or bf16/fp16) and standardised in registers,
  (z - mu) * rstd with the per-feature statistics the caller computed: A and B are never
  written either. Rows past N are zeroed after standardising (else they would add -mu*rstd).

Partials go to a (tiles x tiles) buffer summed by torch in a fixed order: no atomics,
deterministic. The backward needs the N x N Gram as a GEMM operand (dA = B B^T A-type
products), so it stays in torch (cuBLAS) in the callers.
"""

from __future__ import annotations

import torch

from ._registry import KernelConfig, register_kernel
from ._triton import tl, triton
from ._utils import cdiv, device_guard, fp32_matmul_allows_tf32

BLOCK_N = 64  # Gram tile rows / cols
BLOCK_D = 16  # features per step of the D sweep
NUM_WARPS = 8  # 4 spill under tf32x3 (its split operands triple the dot's registers)
NUM_STAGES = 2
MAX_ELEMS = 2**31 - 1  # int32 offsets in the kernel


@triton.jit
def _std_tile(z_ptr, mu_ptr, rs_ptr, rows, cols, N, D, stride, CDT: tl.constexpr):
    """(rows, cols) tile of (z - mu) * rstd in CDT, zero outside N x D."""
    ok = (rows[:, None] < N) & (cols[None, :] < D)
    z = tl.load(z_ptr + rows[:, None] * stride + cols[None, :], mask=ok, other=0.0).to(CDT)
    mu = tl.load(mu_ptr + cols, mask=cols < D, other=0.0)
    rs = tl.load(rs_ptr + cols, mask=cols < D, other=0.0)
    return tl.where(ok, (z - mu[None, :]) * rs[None, :], 0.0)


JIT_HELPERS = ("_std_tile",)


@triton.jit
def _gram_dot_kernel(a_ptr, b_ptr, mua_ptr, rsa_ptr, mub_ptr, rsb_ptr, part_ptr, N, D,
                     stride_a, stride_b, n_t, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    rows_i = ti * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    # lower-triangle programs sweep nothing and write 0: their tile is the mirror of (tj, ti)
    d_end = tl.where(tj >= ti, D, 0)
    ga = tl.zeros((BLOCK_N, BLOCK_N), dtype=CDT)
    gb = tl.zeros((BLOCK_N, BLOCK_N), dtype=CDT)
    for d0 in range(0, d_end, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        a_i = _std_tile(a_ptr, mua_ptr, rsa_ptr, rows_i, cols, N, D, stride_a, CDT)
        a_j = _std_tile(a_ptr, mua_ptr, rsa_ptr, rows_j, cols, N, D, stride_a, CDT)
        b_i = _std_tile(b_ptr, mub_ptr, rsb_ptr, rows_i, cols, N, D, stride_b, CDT)
        b_j = _std_tile(b_ptr, mub_ptr, rsb_ptr, rows_j, cols, N, D, stride_b, CDT)
        ga = tl.dot(a_i, tl.trans(a_j), ga, input_precision=DOT_PREC, out_dtype=CDT)
        gb = tl.dot(b_i, tl.trans(b_j), gb, input_precision=DOT_PREC, out_dtype=CDT)
    weight = tl.where(tj > ti, 2.0, 1.0)
    tl.store(part_ptr + ti * n_t + tj, (tl.sum(tl.sum(ga * gb, axis=1), axis=0) * weight)
             .to(part_ptr.dtype.element_ty))


def _register() -> None:
    sig = {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "mua_ptr": "*fp32", "rsa_ptr": "*fp32",
           "mub_ptr": "*fp32", "rsb_ptr": "*fp32", "part_ptr": "*fp32", "N": "i32",
           "D": "i32", "stride_a": "i32:16", "stride_b": "i32:16", "n_t": "i32",
           "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "CDT": "constexpr",
           "DOT_PREC": "constexpr"}
    blocks = {"BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D, "CDT": tl.float32}
    # Launched for every projector width the methods use (512-8192): the widths only change
    # the runtime D, so one config per operand dtype and dot precision covers them.
    # The operands reach tl.dot as fp32 whatever the input dtype (standardised in registers),
    # so every dtype runs the launcher's fp32 choices: tf32x3 by default, tf32 when allowed.
    configs = [KernelConfig(f"{dt} {BLOCK_N}x{BLOCK_D} {prec}", {**blocks, "DOT_PREC": prec},
                            types={"dt": dt}, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                            default=(dt == "bf16" and prec == "tf32x3"))
               for dt in ("bf16", "fp16", "fp32") for prec in ("tf32x3", "tf32")]
    register_kernel(_gram_dot_kernel, signature=sig, configs=configs)


_register()


def _dot_precision(cdt: torch.dtype) -> str:
    """fp32 math: tf32x3 (about fp32 accuracy) unless the user allowed TF32 (read per call).
    The standardised operands are fp32 in registers whatever the input dtype, so half
    inputs take the same choice. fp64 (interpreter tests only): ieee."""
    if cdt == torch.float64:
        return "ieee"
    return "tf32" if fp32_matmul_allows_tf32() else "tf32x3"


def gram_dot(a: torch.Tensor, mu_a: torch.Tensor, rs_a: torch.Tensor,
             b: torch.Tensor, mu_b: torch.Tensor, rs_b: torch.Tensor) -> torch.Tensor:
    """<A A^T, B B^T>_F with A = (a - mu_a) * rs_a, B likewise; a, b (N, D) row-contiguous.

    mu/rs are (D,) in the compute dtype (fp32, or fp64 for fp64 inputs). Returns a 0-d
    tensor in that dtype."""
    n, d = a.shape
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    cdt = mu_a.dtype
    n_t = cdiv(n, BLOCK_N)
    part = torch.empty(n_t * n_t, device=a.device, dtype=cdt)
    with device_guard(a):
        _gram_dot_kernel[(n_t, n_t)](
            a, b, mu_a, rs_a, mu_b, rs_b, part, n, d, a.stride(0), b.stride(0), n_t,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
            CDT=tl.float64 if cdt == torch.float64 else tl.float32,
            DOT_PREC=_dot_precision(cdt), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return part.sum()
