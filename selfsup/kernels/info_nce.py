"""Fused InfoNCE: MoCo's queue loss, MoCo v3's in-batch loss and SimCLR's NT-Xent.

Shapes: N queries, M in-batch keys, K queued negatives, C dims; T the temperature.

    info_nce_queue (MoCo v1/v2, He et al. 2020):
        logits_i = [q_i.k_i, q_i.queue_j] / T,   label 0
    info_nce_batch (MoCo v3, Chen et al. 2021):
        logits   = q k^T / T  (N x M),           label of row i = i + positive_offset
    nt_xent (SimCLR, Chen et al. 2020):
        z = [z1; z2] (2N rows), logits = z z^T / T with the diagonal excluded,
        label of row i = i + N (mod 2N)

All three are rows against a key matrix. Per row, lse_i = logsumexp_j s_ij over the keys (plus
the extra positive logit in the queue case), loss_i = lse_i - s_pos(i), loss = mean_i loss_i.
With p_ij = exp(s_ij - lse_i):

    d loss_i / d q_i   = (sum_j p_ij key_j - key_pos(i)) / T
    d loss_i / d key_j = (p_ij - [j == pos(i)]) q_i / T            (summed over the rows i)
    d loss_i / d k_i   = (p_pos(i) - 1) q_i / T                    (queue: the extra positive)

The loss is a scalar, so the query gradient is accumulated in the same sweep as the online
logsumexp (a flash-attention forward with V = keys, ROOFLINE.md): backward only scales it by
the upstream gradient. Key gradients (in-batch keys, NT-Xent) need every row's lse first, so
they take a second sweep over key blocks, split over row ranges to fill the SMs; the splits'
partial sums are added in a fixed order: no atomics, deterministic.

Paths, picked by `choose_backend` (``SELFSUP_KERNELS=triton|torch|ref`` forces one):
- "triton": `_info_nce_fwd_kernel` (grid: row blocks x key splits, partial (m, l, sum p.key)
  per split) -> `_info_nce_merge_kernel` (per-row lse, loss, dq, positive read directly) ->
  `_info_nce_dk_kernel` in backward when the keys need grad. fp16/bf16 operands go to the
  MMAs as they are, with fp32 accumulation; the probabilities are rounded to the key dtype
  for the P @ keys GEMM, as flash-attention does for P @ V. fp32 inputs use tf32x3 (or tf32
  when the user allowed TF32 for fp32 matmuls; read per call). fp64 CPU tensors (the
  interpreter's float64 tests) compute in fp64, so those comparisons are as tight as the
  portable path's; fp64 CUDA tensors and C > 512 take the portable path.
- "torch": portable chunked torch in the same custom op (`_info_nce_torch.py`).

The fused paths run through `torch.ops.selfsup.info_nce_fwd` (and `info_nce_dk` in backward),
custom ops with fake implementations and registered autograd (`_custom_op.py`,
docs/kernels-custom-ops.md), so `torch.compile(fullgraph=True)` traces them.
- "ref": the `*_ref` functions, written like the papers (materialized logits + CE).

normalize=True L2-normalizes in torch before the Function (autograd differentiates through
F.normalize); the result keeps the input's dtype (CUDA autocast computes norms in fp32, which
would otherwise promote a bf16 run to the fp32 kernels). Mixed input dtypes are promoted to a
common one. The loss comes back in the accumulation dtype (fp32 for half inputs, as
autocast's cross-entropy does); gradients in each input's dtype, scaled by the upstream
gradient in fp32 before that cast (GradScaler's 65536 then keeps small entries of fp16
gradients from underflowing). The temperature may be a 0-d tensor on the inputs' device: the
kernels read it from memory, so it is never synced to the host.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._custom_op import fused_op, join_temperature, placeholder, present, split_temperature
from ._info_nce_torch import MoCoQueue, queue_sweep_torch, rows_sweep_torch
from ._registry import KernelConfig, register_kernel
from ._triton import tl, triton
from ._utils import (
    cdiv,
    check_same_device,
    check_temperature,
    check_tensor,
    choose_backend,
    compute_dtype,
    device_guard,
    fp32_matmul_allows_tf32,
    interpreting,
    next_power_of_2,
)

__all__ = ["MoCoQueue", "info_nce_batch", "info_nce_batch_ref", "info_nce_queue",
           "info_nce_queue_ref", "nt_xent", "nt_xent_ref"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
TRITON_MAX_C = 512  # wider rows overflow the kernels' register tiles: portable path
# Constexprs that exist only for the interpreter, with the value a GPU launch uses (read by
# tests/kernels/launch_recorder.py): the interpreter computes bf16 tl.dot wrongly (garbage,
# checked with triton 3.6 and 3.9; fp16 is right), so there bf16 operands are upcast to fp32.
INTERPRETER_CONSTEXPRS = {"UPCAST": False}


# ----------------------------------------------------------------------------- references
def info_nce_queue_ref(q, k, queue, temperature, *, normalize=True):
    """MoCo v1/v2 as the paper's pseudocode writes it (materialized N x (1+K) logits)."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1)                      reads 2NC
    l_neg = q @ queue.detach().T  # (N, K)                              reads KC, writes NK
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # (N, 1 + K)  two more NK passes
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)  # log_softmax + nll: NK again, more in backward


def info_nce_batch_ref(q, k, temperature, *, positive_offset=0, normalize=True):
    """MoCo v3's ctr() without the 2T factor: CE(q k^T / T, arange(N) + offset)."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature  # (N, M)                            writes NM twice
    labels = torch.arange(len(q), device=q.device) + positive_offset
    return F.cross_entropy(logits, labels)


def nt_xent_ref(z1, z2, temperature, *, normalize=True):
    """SimCLR's NT-Xent over 2N anchors; a row is never compared with itself."""
    z = torch.cat([z1, z2], 0)
    if normalize:
        z = F.normalize(z, dim=1)
    n = len(z1)
    logits = z @ z.T / temperature  # (2N, 2N)                          writes 4N^2 twice
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))  # another 4N^2 pass
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- validation
def _check_rows(name: str, t, width: int | None = None) -> None:
    check_tensor(name, t, ndim=2)
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape "
                         f"{tuple(t.shape)}")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} must have C={width} columns to match the queries, got shape "
                         f"{tuple(t.shape)}")


def _check_t(temperature, device: torch.device):
    """A float, or a 0-d tensor on the inputs' device (or the CPU) that is never read on the
    host. No gradient flows to it: the fused backward does not differentiate by T."""
    t = check_temperature("temperature", temperature, allow_tensor=True)
    if isinstance(t, torch.Tensor):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError("temperature must not require grad: the fused InfoNCE does not "
                             "differentiate with respect to it (detach it, or use the *_ref)")
        if t.device.type != "cpu" and t.device != device:
            raise ValueError(f"temperature must be on the inputs' device {device} (or the "
                             f"CPU), got {t.device}")
    return t


def _validate_queue(q, k, queue, temperature):
    _check_rows("q", q)
    _check_rows("k", k, q.shape[1])
    _check_rows("queue", queue, q.shape[1])  # K >= 1
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have N={q.shape[0]} rows like q, got shape {tuple(k.shape)}")
    device = check_same_device(q=q, k=k, queue=queue)
    return _check_t(temperature, device)


def _validate_batch(q, k, temperature, positive_offset):
    _check_rows("q", q)
    _check_rows("k", k, q.shape[1])
    device = check_same_device(q=q, k=k)
    if isinstance(positive_offset, bool) or not isinstance(positive_offset, int):
        raise ValueError(f"positive_offset must be an int, got {positive_offset!r}")
    if positive_offset < 0 or positive_offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"positive_offset must satisfy 0 <= positive_offset and "
                         f"positive_offset + N <= M, got positive_offset={positive_offset}, "
                         f"N={q.shape[0]}, M={k.shape[0]}")
    return _check_t(temperature, device)


def _validate_nt_xent(z1, z2, temperature):
    _check_rows("z1", z1)
    _check_rows("z2", z2, z1.shape[1])
    if z2.shape[0] != z1.shape[0]:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got "
                         f"{tuple(z2.shape)}")
    device = check_same_device(z1=z1, z2=z2)
    return _check_t(temperature, device)


def _promote(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One common floating dtype (e.g. bf16 queries from autocast against an fp32 queue)."""
    dt = functools.reduce(torch.promote_types, [t.dtype for t in ts])
    return tuple(t.to(dt) for t in ts)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """F.normalize in `t`'s dtype: CUDA autocast computes the norm in fp32, and the fp32
    result would send a bf16 run to the fp32 (tf32x3) kernels."""
    return F.normalize(t, dim=1).to(t.dtype)


# ----------------------------------------------------------------------------- tiles
def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands of `dtype`, decided per call (never at import).

    fp16/bf16 operands go to the MMAs as they are ("ieee": the option only changes fp32
    operands). fp32 inputs use "tf32x3" (three tf32 MMAs, about fp32 accuracy; plain tf32
    would put ~1e-4 errors on cosines, x25 at T=0.04), or "tf32" while the user allows TF32
    for fp32 matmuls (torch's fp32_precision API, read now). fp64 (interpreter only): "ieee".
    """
    if dtype == torch.float32:
        return "tf32" if fp32_matmul_allows_tf32() else "tf32x3"
    return "ieee"


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel, operand kind and BLOCK_C (up to):
# the largest tiles with zero spills and >= 2 CTAs per SM on sm_80 and sm_90 where one exists
# (triton 3.6 and 3.9; `python -m selfsup.kernels.report`, docs/kernels-infonce.md). "half":
# native fp16/bf16 operands; "tf32x3": split fp32 operands triple the dot's registers.
# Entries no registered config uses (unregistered widths, fp64 under the interpreter) are
# unmeasured guesses of the same shape.
_TILES = {
    ("fwd", "half"): {128: (64, 64, 8, 3), 256: (32, 64, 8, 2), 512: (16, 32, 8, 2)},
    # NT-Xent's self mask costs registers: 64x64 drops to 1 CTA/SM on sm_80 (3.6: 158 regs)
    ("fwd_self", "half"): {128: (64, 32, 8, 2), 256: (32, 64, 8, 2), 512: (16, 32, 8, 2)},
    ("fwd", "tf32"): {128: (32, 32, 4, 2), 256: (32, 64, 8, 2), 512: (16, 32, 8, 2)},
    # C=256 spills 24-56 bytes at every tile tried (16x16 to 32x64, 2-8 warps): fp32 MoCo v3
    # is rare on GPUs (bf16 is the recipe), so it stays registered and reported as it is
    ("fwd", "tf32x3"): {128: (16, 32, 4, 2), 512: (16, 16, 8, 2)},
    ("dk", "half"): {128: (32, 64, 8, 2), 512: (32, 32, 8, 2)},
    ("dk", "tf32"): {128: (32, 32, 4, 2), 512: (16, 32, 4, 2)},
    ("dk", "tf32x3"): {128: (16, 32, 4, 2), 512: (16, 16, 4, 2)},
    ("merge", "any"): {512: (8, 0, 4, 2)},  # no dot: small row tiles, many programs
}


def _operand_kind(prec: str, dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32x3" if prec == "tf32x3" else "tf32"  # fp64 (interpreter): fp32's tiles


def _tiles(kernel: str, kind: str, block_c: int, self_mask: bool = False):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) from `_TILES`."""
    key = (kernel, "any" if kernel == "merge" else kind)
    if kernel == "fwd" and self_mask and ("fwd_self", kind) in _TILES:
        key = ("fwd_self", kind)
    table = _TILES[key]
    return table[min(c for c in table if c >= block_c)]


_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cfg(kernel: str, label: str, dt: str, block_c: int, prec: str, *,
         default: bool = False, **flags) -> KernelConfig:
    """A production configuration exactly as `_kernel_params` picks it for dtype `dt` and
    input precision `prec` (named here, never read from torch's settings at import)."""
    bn, bk, warps, stages = _tiles(kernel, _operand_kind(prec, _DT[dt]), block_c,
                                   flags.get("SELF_MASK", False))
    const = dict(BLOCK_N=bn, BLOCK_C=block_c, CDT=tl.float32, **flags)
    if kernel != "merge":
        const.update(BLOCK_K=bk, DOT_PREC=prec, UPCAST=False)
    return KernelConfig(label, const, types={"dt": dt}, num_warps=warps, num_stages=stages,
                        default=default)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _info_nce_fwd_kernel(
    # pointers: rows (N, C), keys (M, C), temperature (1,); per-split partials (S, N) x 2,
    # (S, N, C)
    q_ptr, key_ptr, t_ptr, m_ptr, l_ptr, acc_ptr,
    # row strides (the column stride is 1)
    stride_qn, stride_kn,
    # shapes; each program on axis 1 sweeps `tiles_per_split` key tiles of BLOCK_K
    N, M, C, tiles_per_split,
    SELF_MASK: tl.constexpr, COMPUTE_DQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PREC: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Online logsumexp over one split of the keys for BLOCK_N rows (s in log2 units):
    #   m = max_j s_j,   l = sum_j 2^(s_j - m),   acc = sum_j 2^(s_j - m) key_j
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C  # BLOCK_C is C padded to a power of two >= 16
    # log2(e) / T: logits are kept in base 2, so exp2 is a single MUFU op
    scale = 1.4426950408889634 / tl.load(t_ptr).to(CDT)
    # operands stay in the input dtype: bf16/fp16 MMAs at full rate, half the registers
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:  # interpreter only (INTERPRETER_CONSTEXPRS)
        q = q.to(CDT)
    # finite start: a split whose keys are all masked keeps l = 0 and never makes a NaN
    m_i = tl.full([BLOCK_N], -1.0e30, CDT)
    l_i = tl.zeros([BLOCK_N], CDT)
    acc = tl.zeros([BLOCK_N, BLOCK_C], CDT)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(M, BLOCK_K))
    for t in range(t0, t1):
        keys = t * BLOCK_K + tl.arange(0, BLOCK_K)
        key_ok = keys < M
        kt = tl.load(key_ptr + keys.to(tl.int64)[:, None] * stride_kn + cols[None, :],
                     mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (BK, BC)
        if UPCAST:
            kt = kt.to(CDT)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale  # (BN, BK), fp32 acc
        ok = key_ok[None, :]
        if SELF_MASK:  # NT-Xent: a row is never its own negative
            ok = ok & (keys[None, :] != rows[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # always subtract the running max
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if COMPUTE_DQ:  # the "P @ V" GEMM of a flash-attention forward, V = keys
            # acc in the dot: the MMA accumulates into it (3.6 needs out_dtype spelled out)
            acc = tl.dot(p.to(kt.dtype), kt, acc * alpha[:, None], input_precision=DOT_PREC,
                         out_dtype=CDT)
        m_i = m_new
    part = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    if COMPUTE_DQ:
        tl.store(acc_ptr + part[:, None] * C + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


def _fwd(label, dt, c, prec, self_mask, **kw):
    return _cfg("fwd", label, dt, c, prec, SELF_MASK=self_mask, COMPUTE_DQ=True, **kw)


# Signatures: C and the row strides are "i32:16" because every production width (128, 256,
# 512, contiguous rows) is a multiple of 16, and Triton's JIT specializes an int argument on
# that at launch: the column masks then cost nothing and the loads vectorize (the fwd tile
# below drops from 255 to 128 registers). Other widths compile another specialization.
# What the methods launch (tests/kernels/test_launches.py records it): MoCo's queue at C=128
# (bf16 / fp16 / fp32 training, fp32 also under allowed TF32), MoCo v3's in-batch at C=256,
# SimCLR's NT-Xent at C=128; C=512 (a wider --proj-dim) in bf16.
register_kernel(
    _info_nce_fwd_kernel,
    signature={
        "q_ptr": "*{dt}", "key_ptr": "*{dt}", "t_ptr": "*fp32", "m_ptr": "*fp32",
        "l_ptr": "*fp32", "acc_ptr": "*fp32", "stride_qn": "i32:16", "stride_kn": "i32:16",
        "N": "i32", "M": "i32", "C": "i32:16", "tiles_per_split": "i32",
        "SELF_MASK": "constexpr", "COMPUTE_DQ": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr", "BLOCK_C": "constexpr", "DOT_PREC": "constexpr",
        "CDT": "constexpr", "UPCAST": "constexpr",
    },
    configs=[
        _fwd("bf16 C128 queue", "bf16", 128, "ieee", False, default=True),
        _fwd("fp16 C128 queue", "fp16", 128, "ieee", False),
        _fwd("fp32 C128 queue", "fp32", 128, "tf32x3", False),
        _fwd("fp32 C128 allow_tf32 queue", "fp32", 128, "tf32", False),
        _fwd("bf16 C256 in-batch", "bf16", 256, "ieee", False),
        _fwd("fp32 C256 in-batch", "fp32", 256, "tf32x3", False),
        _fwd("bf16 C512 in-batch", "bf16", 512, "ieee", False),
        _fwd("bf16 C128 nt-xent", "bf16", 128, "ieee", True),
        _fwd("fp32 C128 nt-xent", "fp32", 128, "tf32x3", True),
    ],
)


@triton.jit
def _info_nce_merge_kernel(
    # pointers: rows (N, C), positive keys, temperature (1,); split partials;
    # outputs (N,), (N,), (N, C), (N,)
    q_ptr, pos_ptr, t_ptr, m_ptr, l_ptr, acc_ptr, loss_ptr, lse_ptr, dq_ptr, coef_ptr,
    # row strides (the column stride is 1)
    stride_qn, stride_pn,
    # shapes; the positive of row i is pos row (i + pos_offset) % pos_mod
    N, C, num_splits, pos_offset, pos_mod,
    EXTRA_POS: tl.constexpr, COMPUTE_DQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CDT: tl.constexpr,
):
    # Merge the splits' (m, l, acc) into lse, then (all in log2 units until the end)
    #   loss_i = lse_i - s_pos,   dq_i = (acc_i / l_i - key_pos) / T,
    #   queue: the positive is one more logit, and d loss_i / d k_i = (p_pos - 1) q_i / T.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    mask2 = row_ok[:, None] & (cols < C)[None, :]
    inv_t = 1.0 / tl.load(t_ptr).to(CDT)
    scale = 1.4426950408889634 * inv_t  # log2(e) / T
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                mask=mask2, other=0.0).to(CDT)
    prow = ((rows + pos_offset) % pos_mod).to(tl.int64)
    pk = tl.load(pos_ptr + prow[:, None] * stride_pn + cols[None, :], mask=mask2,
                 other=0.0).to(CDT)
    s_pos = tl.sum(q * pk, 1) * scale  # the positive logit, read directly
    m = tl.full([BLOCK_N], -1.0e30, CDT)
    l = tl.zeros([BLOCK_N], CDT)  # noqa: E741
    acc = tl.zeros([BLOCK_N, BLOCK_C], CDT)
    for sp in range(0, num_splits):
        part = sp * N + rows.to(tl.int64)
        m_s = tl.load(m_ptr + part, mask=row_ok, other=-1.0e30)
        l_s = tl.load(l_ptr + part, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        a, b = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        l = l * a + l_s * b  # noqa: E741
        if COMPUTE_DQ:
            acc_s = tl.load(acc_ptr + part[:, None] * C + cols[None, :], mask=mask2, other=0.0)
            acc = acc * a[:, None] + acc_s * b[:, None]
        m = m_new
    if EXTRA_POS:  # queue: fold the positive logit (index 0 of the paper's logits) in
        m_new = tl.maximum(m, s_pos)
        a, b = tl.exp2(m - m_new), tl.exp2(s_pos - m_new)
        l = l * a + b  # noqa: E741
        acc = acc * a[:, None] + b[:, None] * pk
        m = m_new
    l = tl.where(row_ok, l, 1.0)  # noqa: E741  (padding rows: no log2(0), no 0 / 0)
    lse = m + tl.log2(l)
    tl.store(loss_ptr + rows, lse - s_pos, mask=row_ok)  # base 2: the launcher scales by ln 2
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if COMPUTE_DQ:
        dq = (acc / l[:, None] - pk) * inv_t
        tl.store(dq_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], dq, mask=mask2)
    if EXTRA_POS:
        tl.store(coef_ptr + rows, (tl.exp2(s_pos - lse) - 1.0) * inv_t, mask=row_ok)


def _merge(label, dt, c, extra_pos, **kw):
    return _cfg("merge", label, dt, c, "ieee", EXTRA_POS=extra_pos, COMPUTE_DQ=True, **kw)


register_kernel(
    _info_nce_merge_kernel,
    signature={
        "q_ptr": "*{dt}", "pos_ptr": "*{dt}", "t_ptr": "*fp32", "m_ptr": "*fp32",
        "l_ptr": "*fp32", "acc_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
        "dq_ptr": "*fp32", "coef_ptr": "*fp32", "stride_qn": "i32:16", "stride_pn": "i32:16",
        "N": "i32", "C": "i32:16", "num_splits": "i32", "pos_offset": "i32", "pos_mod": "i32",
        "EXTRA_POS": "constexpr", "COMPUTE_DQ": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_C": "constexpr", "CDT": "constexpr",
    },
    configs=[
        _merge("bf16 C128 queue", "bf16", 128, True, default=True),
        _merge("fp16 C128 queue", "fp16", 128, True),
        _merge("fp32 C128 queue", "fp32", 128, True),
        _merge("bf16 C128 in-batch", "bf16", 128, False),
        _merge("fp32 C128 in-batch", "fp32", 128, False),
        _merge("bf16 C256 in-batch", "bf16", 256, False),
        _merge("fp32 C256 in-batch", "fp32", 256, False),
        _merge("bf16 C512 in-batch", "bf16", 512, False),
    ],
)


@triton.jit
def _info_nce_dk_kernel(
    # pointers: rows (N, C), keys (M, C), per-row lse (N,) in log2 units, temperature (1,),
    # per-split partial key gradients (S, M, C)
    q_ptr, key_ptr, lse_ptr, t_ptr, dk_ptr,
    # row strides (the column stride is 1)
    stride_qn, stride_kn,
    # shapes; key j is the positive of row (j + key_offset) % key_mod when that is < N;
    # split s (grid axis 1) covers rows [s, s + 1) * rows_per_split
    N, M, C, key_offset, key_mod, rows_per_split,
    SELF_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PREC: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr,
):
    # One key block against one split of the rows, recomputing the logits:
    #   dk_j = (sum_i p_ij q_i - q_{row whose positive is j}) / T,  p_ij = 2^(s_ij - lse_i)
    # Each program owns its (split, keys) block of the partials, so there are no atomics;
    # the positive's term goes to the split that owns that row.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    keys = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_C)
    key_ok = keys < M
    col_ok = cols < C
    inv_t = 1.0 / tl.load(t_ptr).to(CDT)
    scale = 1.4426950408889634 * inv_t
    kt = tl.load(key_ptr + keys.to(tl.int64)[:, None] * stride_kn + cols[None, :],
                 mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (BK, BC)
    if UPCAST:
        kt = kt.to(CDT)
    acc = tl.zeros([BLOCK_K, BLOCK_C], CDT)
    r_lo = pid_s * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, N)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < r_hi
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BN, BC)
        if UPCAST:
            q = q.to(CDT)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale  # (BN, BK)
        ok = row_ok[:, None] & key_ok[None, :]
        if SELF_MASK:
            ok = ok & (rows[:, None] != keys[None, :])
        p = tl.exp2(tl.where(ok, s - lse[:, None], float("-inf")))  # masked: exactly 0
        acc = tl.dot(tl.trans(p.to(q.dtype)), q, acc, input_precision=DOT_PREC,
                     out_dtype=CDT)  # (BK, BC)
    prow = (keys + key_offset) % key_mod
    pos_ok = key_ok & (prow >= r_lo) & (prow < r_hi)
    qp = tl.load(q_ptr + prow.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                 mask=pos_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)
    out = (pid_s.to(tl.int64) * M + keys)[:, None] * C + cols[None, :]
    tl.store(dk_ptr + out, (acc - qp) * inv_t, mask=key_ok[:, None] & col_ok[None, :])


register_kernel(
    _info_nce_dk_kernel,
    signature={
        "q_ptr": "*{dt}", "key_ptr": "*{dt}", "lse_ptr": "*fp32", "t_ptr": "*fp32",
        "dk_ptr": "*fp32", "stride_qn": "i32:16", "stride_kn": "i32:16", "N": "i32",
        "M": "i32", "C": "i32:16", "key_offset": "i32", "key_mod": "i32", "rows_per_split": "i32",
        "SELF_MASK": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "BLOCK_C": "constexpr", "DOT_PREC": "constexpr", "CDT": "constexpr",
        "UPCAST": "constexpr",
    },
    configs=[
        _cfg("dk", "bf16 C128 nt-xent", "bf16", 128, "ieee", default=True, SELF_MASK=True),
        _cfg("dk", "fp32 C128 nt-xent", "fp32", 128, "tf32x3", SELF_MASK=True),
        _cfg("dk", "bf16 C256 in-batch", "bf16", 256, "ieee", SELF_MASK=False),
    ],
)


# ----------------------------------------------------------------------------- launchers
def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Rows the kernels can stride over: unit column stride (views of rows are kept)."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _waves(device: torch.device) -> int:
    """Programs for about one wave on the GPU; three under the interpreter (the split merges
    stay exercised)."""
    if device.type == "cuda" and not interpreting():
        return _sm_count(device.index if device.index is not None
                         else torch.cuda.current_device())
    return 3


def _splits(blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, tiles per split) of an `n_tiles` loop so that `blocks` x splits
    programs fill one wave (MoCo's N=256: 4 row blocks x 33 key splits on 132 SMs). The price
    is the splits' fp32 partials (fwd: S x N x C, 4.2 MB at N=256, C=128 on 132 SMs)."""
    want = cdiv(_waves(device), blocks)
    per = cdiv(n_tiles, max(1, min(n_tiles, want)))
    return cdiv(n_tiles, per), per


@functools.lru_cache(maxsize=32)
def _temperature_buffer(value: float, device: torch.device, dtype: torch.dtype):
    """A float temperature as the (1,) tensor the kernels read; cached, so a fixed T costs no
    launch per step (read-only: nothing writes it)."""
    return torch.full((1,), value, device=device, dtype=dtype)


def _temperature_arg(temperature, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.device.type == "cpu" and device.type != "cpu":
            temperature = temperature.item()  # host memory: no device sync
        else:  # same device: a cast kernel at most, never a host read
            return temperature.detach().to(dtype).reshape(1)
    return _temperature_buffer(float(temperature), device, dtype)


def _kernel_params(kernel: str, C: int, dtype: torch.dtype, self_mask: bool = False) -> dict:
    """Constexprs and launch options for one kernel, as registered by `_cfg`; the precision
    is read from torch's current setting, per call."""
    block_c = max(16, next_power_of_2(C))
    prec = _dot_precision(dtype)
    bn, bk, warps, stages = _tiles(kernel, _operand_kind(prec, dtype), block_c, self_mask)
    cdt = tl.float64 if dtype == torch.float64 else tl.float32
    out = dict(BLOCK_N=bn, BLOCK_C=block_c, CDT=cdt, num_warps=warps, num_stages=stages)
    if kernel != "merge":
        out.update(BLOCK_K=bk, DOT_PREC=prec,
                   UPCAST=interpreting() and dtype == torch.bfloat16)
    return out


def info_nce_fwd(q, keys, pos, temperature, *, self_mask, extra_pos, pos_offset, pos_mod,
                 compute_dq):
    """Launch the forward sweep and the merge.

    Returns (loss_rows (N,), lse2 (N,) in log2 units, dq (N, C) | None, coef (N,) | None),
    in the accumulation dtype. dq is d loss_i / d q_i, coef_i = d loss_i / d k_i / q_i.
    """
    q, keys, pos = _row_major(q), _row_major(keys), _row_major(pos)
    (n, c), m = q.shape, keys.shape[0]
    kp, mp = _kernel_params("fwd", c, q.dtype, self_mask), _kernel_params("merge", c, q.dtype)
    acc_dt = compute_dtype(q.dtype)
    t = _temperature_arg(temperature, q.device, acc_dt)
    row_blocks, n_tiles = cdiv(n, kp["BLOCK_N"]), cdiv(m, kp["BLOCK_K"])
    n_splits, per = _splits(row_blocks, n_tiles, q.device)
    m_part = torch.empty(n_splits, n, device=q.device, dtype=acc_dt)
    l_part = torch.empty_like(m_part)
    acc_part = (torch.empty(n_splits, n, c, device=q.device, dtype=acc_dt) if compute_dq
                else m_part)
    loss = torch.empty(n, device=q.device, dtype=acc_dt)
    lse = torch.empty_like(loss)
    dq = torch.empty(n, c, device=q.device, dtype=acc_dt) if compute_dq else loss
    coef = torch.empty_like(loss) if extra_pos else loss
    with device_guard(q):
        _info_nce_fwd_kernel[(row_blocks, n_splits)](
            q, keys, t, m_part, l_part, acc_part, q.stride(0), keys.stride(0), n, m, c, per,
            SELF_MASK=self_mask, COMPUTE_DQ=compute_dq, **kp)
        _info_nce_merge_kernel[(cdiv(n, mp["BLOCK_N"]),)](
            q, pos, t, m_part, l_part, acc_part, loss, lse, dq, coef, q.stride(0),
            pos.stride(0), n, c, n_splits, pos_offset, pos_mod,
            EXTRA_POS=extra_pos, COMPUTE_DQ=compute_dq, **mp)
    return (loss.mul_(LN2), lse, dq if compute_dq else None, coef if extra_pos else None)


def info_nce_dk(q, keys, lse2, temperature, *, self_mask, key_offset, key_mod):
    """Launch the key-gradient sweep: d sum_i loss_i / d keys, (M, C) in the accumulation
    dtype. Key j is the positive of row (j + key_offset) % key_mod when that is < N.

    The rows are split so that key blocks x splits fill the SMs (MoCo v3's M=4096 is only 64
    key blocks of 64 for 132 SMs); the partials are summed in split order (deterministic)."""
    q, keys = _row_major(q), _row_major(keys)
    (n, c), m = q.shape, keys.shape[0]
    kp = _kernel_params("dk", c, q.dtype)
    acc_dt = compute_dtype(q.dtype)
    t = _temperature_arg(temperature, q.device, acc_dt)
    key_blocks = cdiv(m, kp["BLOCK_K"])
    n_splits, per = _splits(key_blocks, cdiv(n, kp["BLOCK_N"]), q.device)
    part = torch.empty(n_splits, m, c, device=q.device, dtype=acc_dt)
    with device_guard(q):
        _info_nce_dk_kernel[(key_blocks, n_splits)](
            q, keys, lse2, t, part, q.stride(0), keys.stride(0), n, m, c, key_offset, key_mod,
            per * kp["BLOCK_N"], SELF_MASK=self_mask, **kp)
    return part[0] if n_splits == 1 else part.sum(0)


# ----------------------------------------------------------------------------- custom ops
# Rows q against a key matrix; never saves logits, only per-row results (`_custom_op.py` has
# the conventions). mode "queue": keys = the queue (no grad), pos = k (an extra positive
# logit per row). mode "batch": pos = None, the positive of row i is keys[i + offset].
# mode "nt_xent": q and keys are the same z, self excluded, positive (i + offset) mod 2N with
# offset = N; autograd sums z's query and key gradients.
# The query gradient (and the portable path's key gradient) is computed in forward, in the
# accumulation dtype; backward multiplies it by the upstream gradient in that dtype and only
# then casts it to the input's dtype (fp16 keeps GradScaler's scale).
def _fwd_fake(q, keys, pos, t_tensor, t_float, mode, offset, backend, need_dq, need_dk):
    """Outputs (loss, dq, coef, lse2, dk); unused slots are empty (`placeholder`)."""
    acc = compute_dtype(q.dtype)
    (n, c), m = q.shape, keys.shape[0]
    empty = functools.partial(q.new_empty, dtype=acc)
    triton_dk = backend == "triton" and need_dk  # lse feeds the key-gradient sweep
    torch_dk = backend != "triton" and need_dk and mode != "queue"
    return (empty(()), empty((n, c) if need_dq else 0), empty(n if mode == "queue" else 0),
            empty(n if triton_dk else 0), empty((m, c) if torch_dk else 0))


@fused_op("info_nce_fwd", fake=_fwd_fake)
def _info_nce_fwd_op(q: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor | None,
                     t_tensor: torch.Tensor | None, t_float: float, mode: str, offset: int,
                     backend: str, need_dq: bool, need_dk: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    temperature = join_temperature(t_tensor, t_float)  # a CPU tensor checked > 0 here
    n, m = len(q), len(keys)
    # the sweeps pick their own precision: autocast must not recast their GEMMs
    with torch.autocast(q.device.type, enabled=False):
        if backend == "triton":
            loss, lse, dq, coef = info_nce_fwd(
                q, keys, pos if mode == "queue" else keys, temperature,
                self_mask=mode == "nt_xent", extra_pos=mode == "queue",
                pos_offset=0 if mode == "queue" else offset, pos_mod=n if mode == "queue" else m,
                compute_dq=need_dq)
            dk = None  # key gradients come from their own sweep in backward
            lse = lse if need_dk else None
        elif mode == "queue":
            loss, dq, coef = queue_sweep_torch(q, pos, keys, temperature, compute_dq=need_dq)
            lse = dk = None
        else:
            pos_idx = (torch.arange(n, device=q.device) + offset) % m
            loss, dq, dk = rows_sweep_torch(q, keys, temperature, pos_idx,
                                            self_mask=mode == "nt_xent", compute_dq=need_dq,
                                            compute_dk=need_dk)
            coef = lse = None
    acc = loss.dtype
    return tuple(placeholder(q, acc) if x is None else x
                 for x in (loss.mean(), dq, coef, lse, dk))


@fused_op("info_nce_dk", fake=lambda q, keys, lse2, t_tensor, t_float, self_mask, key_offset,
          key_mod: keys.new_empty(keys.shape, dtype=compute_dtype(q.dtype)))
def _info_nce_dk_op(q: torch.Tensor, keys: torch.Tensor, lse2: torch.Tensor,
                    t_tensor: torch.Tensor | None, t_float: float, self_mask: bool,
                    key_offset: int, key_mod: int) -> torch.Tensor:
    """The Triton key-gradient sweep (`info_nce_dk`) as an op, for backward."""
    with torch.autocast(q.device.type, enabled=False):
        return info_nce_dk(q, keys, lse2, join_temperature(t_tensor, t_float),
                           self_mask=self_mask, key_offset=key_offset, key_mod=key_mod)


def _setup_context(ctx, inputs, output):
    q, keys, pos, t_tensor, t_float, mode, offset, backend = inputs[:8]
    _, dq, coef, lse, dk = output
    ctx.meta = (mode, offset, backend, t_float, q.dtype, keys.dtype,
                None if pos is None else pos.dtype)
    triton_dk = backend == "triton" and mode != "queue"
    ctx.save_for_backward(q, keys if triton_dk else None, t_tensor, dq, coef, lse, dk)


def _backward(ctx, grad, *_unused):
    mode, offset, backend, t_float, q_dt, keys_dt, pos_dt = ctx.meta
    q, keys, t_tensor, dq, coef, lse, dk = ctx.saved_tensors
    scale = grad / q.shape[0]  # d mean / d loss_i, in the loss's (accumulation) dtype
    dq_out = dk_out = dpos_out = None
    if ctx.needs_input_grad[0] and present(dq) is not None:
        dq_out = (dq * scale).to(q_dt)
    if ctx.needs_input_grad[1] and mode != "queue":
        if backend == "triton":
            m = keys.shape[0]
            dk = _info_nce_dk_op(q, keys, lse, t_tensor, t_float, mode == "nt_xent",
                                 m - offset if mode == "batch" else offset, m)
        dk_out = (dk * scale).to(keys_dt)
    if mode == "queue" and ctx.needs_input_grad[2]:
        dpos_out = (coef[:, None] * q.to(coef.dtype) * scale).to(pos_dt)
    return dq_out, dk_out, dpos_out, None, None, None, None, None, None, None


_info_nce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _fused(q, keys, pos, temperature, mode, offset, backend, need_dq, need_dk):
    """The mean loss through ``torch.ops.selfsup.info_nce_fwd`` (its other outputs are what
    backward needs)."""
    t_tensor, t_float = split_temperature(temperature)
    return _info_nce_fwd_op(q, keys, pos, t_tensor, t_float, mode, offset, backend, need_dq,
                            need_dk)[0]

# ----------------------------------------------------------------------------- public API
def _backend(*tensors: torch.Tensor) -> str:
    """choose_backend, with the kernels' own limit: wider rows than TRITON_MAX_C do not fit
    their register tiles (a forced SELFSUP_KERNELS=triton raises, naming it)."""
    c = tensors[0].shape[1]
    why = (f"C={c} columns exceed the InfoNCE kernels' limit of {TRITON_MAX_C}"
           if c > TRITON_MAX_C else None)
    return choose_backend(*tensors, unsupported=why)


def info_nce_queue(q, k, queue, temperature, *, normalize=True):
    """MoCo v1/v2 InfoNCE against a queue of negatives, fused (no N x K logits).

    Args:
        q: queries (N, C); gradients flow to them.
        k: positive keys (N, C); gradients flow to them when k requires grad.
        queue: negatives (K, C), K >= 1, used as they are (already normalized), no gradient.
            Keep it in the training dtype (`MoCoQueue(dtype=...)`): mixed dtypes promote.
        temperature: T > 0, a number or a 0-d tensor (never read on the host).
        normalize: L2-normalize q and k first (the gradient goes through it).
    Returns:
        the mean over rows of CE([q.k, q.queue^T] / T, 0), a scalar in the accumulation
        dtype (fp32 for fp16/bf16 inputs).
    Example:
        >>> loss = info_nce_queue(q, k, moco_queue.queue, 0.2)
    """
    temperature = _validate_queue(q, k, queue, temperature)
    backend = _backend(q, k, queue)
    if backend == "ref":
        return info_nce_queue_ref(q, k, queue, temperature, normalize=normalize)
    q, k, queue = _promote(q, k, queue.detach())
    if normalize:
        q, k = _normalize(q), _normalize(k)
    grad = torch.is_grad_enabled()
    # k's gradient (the extra positive's) comes from the saved coef whenever k needs one
    return _fused(q, queue, k, temperature, "queue", 0, backend, grad and q.requires_grad,
                  False)


def info_nce_batch(q, k, temperature, *, positive_offset=0, normalize=True):
    """MoCo v3 in-batch InfoNCE: CE(q k^T / T, arange(N) + positive_offset), fused.

    Args:
        q: queries (N, C). k: keys (M, C), M >= N, e.g. gathered from every rank.
        temperature: T > 0, a number or a 0-d tensor (MoCo v3 applies its 2T factor itself).
        positive_offset: the label of row i is i + positive_offset (N * rank when gathered);
            positive_offset + N <= M.
        normalize: L2-normalize q and k first.
    Returns:
        the mean cross-entropy, a scalar; gradients flow to q and k.
    Example:
        >>> loss = info_nce_batch(q1, k2_all, 0.2, positive_offset=len(q1) * rank)
    """
    temperature = _validate_batch(q, k, temperature, positive_offset)
    backend = _backend(q, k)
    if backend == "ref":
        return info_nce_batch_ref(q, k, temperature, positive_offset=positive_offset,
                                  normalize=normalize)
    q, k = _promote(q, k)
    if normalize:
        q, k = _normalize(q), _normalize(k)
    grad = torch.is_grad_enabled()
    return _fused(q, k, None, temperature, "batch", positive_offset, backend,
                  grad and q.requires_grad, grad and k.requires_grad)


def nt_xent(z1, z2, temperature, *, normalize=True):
    """SimCLR NT-Xent over the 2N views [z1; z2], fused (no 2N x 2N logits).

    Args:
        z1, z2: the two views' embeddings, (N, C) each; row i of z1 pairs with row i of z2.
        temperature: T > 0, a number or a 0-d tensor.
        normalize: L2-normalize the rows first.
    Returns:
        the mean over the 2N anchors of CE with the other view as the positive and the row
        itself excluded; gradients flow to z1 and z2 (as anchors and as keys).
    Example:
        >>> loss = nt_xent(proj(x1), proj(x2), 0.1)
    """
    temperature = _validate_nt_xent(z1, z2, temperature)
    backend = _backend(z1, z2)
    if backend == "ref":
        return nt_xent_ref(z1, z2, temperature, normalize=normalize)
    z = torch.cat(_promote(z1, z2), 0)
    if normalize:
        z = _normalize(z)
    need = torch.is_grad_enabled() and z.requires_grad
    return _fused(z, z, None, temperature, "nt_xent", len(z1), backend, need, need)
