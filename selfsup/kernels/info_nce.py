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
they take a second sweep over key blocks: no atomics, deterministic.

Paths, picked by `choose_backend` (``SELFSUP_KERNELS=triton|torch|ref`` forces one):
- "triton": `_info_nce_fwd_kernel` (grid: row blocks x key splits, partial (m, l, sum p.key)
  per split) -> `_info_nce_merge_kernel` (per-row lse, loss, dq, positive read directly) ->
  `_info_nce_dk_kernel` in backward when the keys need grad. fp32 accumulation; fp16/bf16 are
  upcast on load; fp64 (the interpreter's float64 tests) computes in fp64, so those
  comparisons are as tight as the portable path's. C > 512 takes the portable path.
- "torch": portable chunked torch in the same autograd.Function. The queue is swept in key
  chunks of ~1M logits (4096 keys at N=256, 1 thread) with an online max; in-batch / NT-Xent
  rows are swept in row chunks across the full key width (exact log_softmax per chunk; dq and
  dk from the same probabilities).
- "ref": the `*_ref` functions, written like the papers (materialized logits + CE).

normalize=True L2-normalizes in torch before the Function (autograd differentiates through
F.normalize). Mixed input dtypes are promoted to a common one. The loss comes back in the
accumulation dtype (fp32 for half inputs, as autocast's cross-entropy does); gradients in each
input's dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import KernelConfig, register_kernel
from ._triton import tl, triton
from ._utils import (
    cdiv,
    check_same_device,
    check_temperature,
    check_tensor,
    choose_backend,
    compute_dtype,
    interpreting,
    next_power_of_2,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
CHUNK_ELEMS = 1 << 20  # logits per step of the portable sweeps: N=256 x 4096 keys, 4 MB fp32
TRITON_MAX_C = 512  # wider rows overflow the kernels' register tiles: portable path


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


def _validate_queue(q, k, queue, temperature) -> float:
    _check_rows("q", q)
    _check_rows("k", k, q.shape[1])
    _check_rows("queue", queue, q.shape[1])  # K >= 1
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have N={q.shape[0]} rows like q, got shape {tuple(k.shape)}")
    check_same_device(q=q, k=k, queue=queue)
    return check_temperature("temperature", temperature)


def _validate_batch(q, k, temperature, positive_offset) -> float:
    _check_rows("q", q)
    _check_rows("k", k, q.shape[1])
    check_same_device(q=q, k=k)
    if isinstance(positive_offset, bool) or not isinstance(positive_offset, int):
        raise ValueError(f"positive_offset must be an int, got {positive_offset!r}")
    if positive_offset < 0 or positive_offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"positive_offset must satisfy 0 <= positive_offset and "
                         f"positive_offset + N <= M, got positive_offset={positive_offset}, "
                         f"N={q.shape[0]}, M={k.shape[0]}")
    return check_temperature("temperature", temperature)


def _validate_nt_xent(z1, z2, temperature) -> float:
    _check_rows("z1", z1)
    _check_rows("z2", z2, z1.shape[1])
    if z2.shape[0] != z1.shape[0]:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got "
                         f"{tuple(z2.shape)}")
    check_same_device(z1=z1, z2=z2)
    return check_temperature("temperature", temperature)


def _promote(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One common floating dtype (e.g. bf16 queries from autocast against an fp32 queue)."""
    dt = functools.reduce(torch.promote_types, [t.dtype for t in ts])
    return tuple(t.to(dt) for t in ts)


# ----------------------------------------------------------------------------- tiles
def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision per input dtype.

    fp16/bf16 values are exact in tf32 (10-bit mantissa), so "tf32" loses nothing in the
    logits GEMM; the probabilities of the second GEMM round to 2^-11 there. fp32 inputs use
    "tf32x3" (three tf32 MMAs, about fp32 accuracy; plain tf32 would put ~1e-4 errors on
    cosines, x25 at T=0.04), or "tf32" when the user enabled TF32 for torch matmuls. fp64
    (interpreter only) is "ieee".
    """
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def _tiles(kernel: str, block_c: int, prec: str) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the largest fp32 register tiles that compile without
    spills for sm_80 / sm_90 (measured with `python -m selfsup.kernels.report`)."""
    if kernel == "merge":  # no dot: 16-row tiles, many programs
        return 16, 0, 4
    if prec == "tf32x3":  # split operands triple the dot's registers
        return (16, 32, 4) if block_c <= 128 else (16, 16, 4)
    if kernel == "dk":
        return (32, 64, 8) if block_c <= 128 else (16, 32, 8)
    if block_c <= 64:
        return 64, 64, 4
    if block_c <= 128:
        return 64, 64, 8
    return (32, 64, 8) if block_c <= 256 else (16, 32, 8)


_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cfg(kernel: str, label: str, dt: str, block_c: int, *, default: bool = False,
         prec: str | None = None, **flags) -> KernelConfig:
    """A production configuration, exactly as `_kernel_params` picks it for dtype `dt`
    (`prec` overrides the input precision, e.g. fp32 under allow_tf32)."""
    prec = prec or _dot_precision(_DT[dt])
    bn, bk, warps = _tiles(kernel, block_c, prec)
    const = dict(BLOCK_N=bn, BLOCK_C=block_c, CDT=tl.float32, **flags)
    if kernel != "merge":
        const.update(BLOCK_K=bk, DOT_PREC=prec)
    return KernelConfig(label, const, types={"dt": dt}, num_warps=warps, num_stages=2,
                        default=default)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _info_nce_fwd_kernel(
    # pointers: rows (N, C), keys (M, C); per-split partials (S, N), (S, N), (S, N, C)
    q_ptr, key_ptr, m_ptr, l_ptr, acc_ptr,
    # row strides (the column stride is 1)
    stride_qn, stride_kn,
    # shapes; each program on axis 1 sweeps `tiles_per_split` key tiles of BLOCK_K
    N, M, C, tiles_per_split,
    # log2(e) / T: logits are kept in base 2, so exp2 is a single MUFU op
    scale,
    SELF_MASK: tl.constexpr, COMPUTE_DQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PREC: tl.constexpr, CDT: tl.constexpr,
):
    # Online logsumexp over one split of the keys for BLOCK_N rows (s in log2 units):
    #   m = max_j s_j,   l = sum_j 2^(s_j - m),   acc = sum_j 2^(s_j - m) key_j
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C  # BLOCK_C is C padded to a power of two >= 16
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)  # upcast on load
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
                     mask=key_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)  # (BK, BC)
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
            acc = acc * alpha[:, None] + tl.dot(p, kt, input_precision=DOT_PREC)
        m_i = m_new
    part = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    if COMPUTE_DQ:
        tl.store(acc_ptr + part[:, None] * C + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


register_kernel(
    _info_nce_fwd_kernel,
    signature={
        "q_ptr": "*{dt}", "key_ptr": "*{dt}", "m_ptr": "*fp32", "l_ptr": "*fp32",
        "acc_ptr": "*fp32", "stride_qn": "i32", "stride_kn": "i32", "N": "i32", "M": "i32",
        "C": "i32", "tiles_per_split": "i32", "scale": "fp32", "SELF_MASK": "constexpr",
        "COMPUTE_DQ": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "BLOCK_C": "constexpr", "DOT_PREC": "constexpr", "CDT": "constexpr",
    },
    configs=[
        _cfg("fwd", "bf16 C128 queue", "bf16", 128, default=True, SELF_MASK=False,
             COMPUTE_DQ=True),
        _cfg("fwd", "fp16 C128 queue", "fp16", 128, SELF_MASK=False, COMPUTE_DQ=True),
        _cfg("fwd", "fp32 C128 nt-xent", "fp32", 128, SELF_MASK=True, COMPUTE_DQ=True),
        _cfg("fwd", "fp32 C128 allow_tf32 queue", "fp32", 128, prec="tf32", SELF_MASK=False,
             COMPUTE_DQ=True),
        _cfg("fwd", "bf16 C256 in-batch", "bf16", 256, SELF_MASK=False, COMPUTE_DQ=True),
    ],
)


@triton.jit
def _info_nce_merge_kernel(
    # pointers: rows (N, C), positive keys; split partials; outputs (N,), (N,), (N, C), (N,)
    q_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, loss_ptr, lse_ptr, dq_ptr, coef_ptr,
    # row strides (the column stride is 1)
    stride_qn, stride_pn,
    # shapes; the positive of row i is pos row (i + pos_offset) % pos_mod
    N, C, num_splits, pos_offset, pos_mod,
    # log2(e) / T and 1 / T
    scale, inv_t,
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


register_kernel(
    _info_nce_merge_kernel,
    signature={
        "q_ptr": "*{dt}", "pos_ptr": "*{dt}", "m_ptr": "*fp32", "l_ptr": "*fp32",
        "acc_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "dq_ptr": "*fp32",
        "coef_ptr": "*fp32", "stride_qn": "i32", "stride_pn": "i32", "N": "i32", "C": "i32",
        "num_splits": "i32", "pos_offset": "i32", "pos_mod": "i32", "scale": "fp32",
        "inv_t": "fp32", "EXTRA_POS": "constexpr", "COMPUTE_DQ": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_C": "constexpr", "CDT": "constexpr",
    },
    configs=[
        _cfg("merge", "bf16 C128 queue", "bf16", 128, default=True, EXTRA_POS=True,
             COMPUTE_DQ=True),
        _cfg("merge", "fp32 C128 in-batch", "fp32", 128, EXTRA_POS=False, COMPUTE_DQ=True),
    ],
)


@triton.jit
def _info_nce_dk_kernel(
    # pointers: rows (N, C), keys (M, C), per-row lse (N,) in log2 units, output (M, C)
    q_ptr, key_ptr, lse_ptr, dk_ptr,
    # row strides (the column stride is 1)
    stride_qn, stride_kn,
    # shapes; key j is the positive of row (j + key_offset) % key_mod when that is < N
    N, M, C, key_offset, key_mod,
    # log2(e) / T and 1 / T
    scale, inv_t,
    SELF_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PREC: tl.constexpr, CDT: tl.constexpr,
):
    # One key block against every row, recomputing the logits:
    #   dk_j = (sum_i p_ij q_i - q_{row whose positive is j}) / T,  p_ij = 2^(s_ij - lse_i)
    # Each program owns its keys' rows of dk, so there are no atomics.
    pid = tl.program_id(0)
    keys = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_C)
    key_ok = keys < M
    col_ok = cols < C
    kt = tl.load(key_ptr + keys.to(tl.int64)[:, None] * stride_kn + cols[None, :],
                 mask=key_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)  # (BK, BC)
    acc = tl.zeros([BLOCK_K, BLOCK_C], CDT)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)  # (BN, BC)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale  # (BN, BK)
        ok = row_ok[:, None] & key_ok[None, :]
        if SELF_MASK:
            ok = ok & (rows[:, None] != keys[None, :])
        p = tl.exp2(tl.where(ok, s - lse[:, None], float("-inf")))  # masked: exactly 0
        acc += tl.dot(tl.trans(p), q, input_precision=DOT_PREC)  # (BK, BC)
    prow = (keys + key_offset) % key_mod
    pos_ok = key_ok & (prow < N)
    qp = tl.load(q_ptr + prow.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                 mask=pos_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)
    tl.store(dk_ptr + keys.to(tl.int64)[:, None] * C + cols[None, :], (acc - qp) * inv_t,
             mask=key_ok[:, None] & col_ok[None, :])


register_kernel(
    _info_nce_dk_kernel,
    signature={
        "q_ptr": "*{dt}", "key_ptr": "*{dt}", "lse_ptr": "*fp32", "dk_ptr": "*fp32",
        "stride_qn": "i32", "stride_kn": "i32", "N": "i32", "M": "i32", "C": "i32",
        "key_offset": "i32", "key_mod": "i32", "scale": "fp32", "inv_t": "fp32",
        "SELF_MASK": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "BLOCK_C": "constexpr", "DOT_PREC": "constexpr", "CDT": "constexpr",
    },
    configs=[
        _cfg("dk", "bf16 C128 nt-xent", "bf16", 128, default=True, SELF_MASK=True),
        _cfg("dk", "fp32 C128 in-batch", "fp32", 128, SELF_MASK=False),
    ],
)


# ----------------------------------------------------------------------------- launchers
def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Rows the kernels can stride over: unit column stride (views of rows are kept)."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(number of key splits, tiles per split): about one wave of programs on the GPU, so a
    small N still fills it (MoCo's N=256: 4 row blocks x 33 splits); three under the
    interpreter, which keeps the merge exercised. The price is S x N x C fp32 of dq partials
    (4.2 MB at N=256, C=128 on 132 SMs), over ROOFLINE's 1 MB goal; fewer splits trade it
    for idle SMs."""
    if device.type == "cuda" and not interpreting():
        want = cdiv(_sm_count(device.index or 0), row_blocks)
    else:
        want = 3
    per = cdiv(n_tiles, max(1, min(n_tiles, want)))
    return cdiv(n_tiles, per), per


def _kernel_params(kernel: str, C: int, dtype: torch.dtype) -> dict:
    """Constexprs and launch options for one kernel, as registered by `_cfg`."""
    block_c = max(16, next_power_of_2(C))
    prec = _dot_precision(dtype)
    bn, bk, warps = _tiles(kernel, block_c, prec)
    cdt = tl.float64 if dtype == torch.float64 else tl.float32
    out = dict(BLOCK_N=bn, BLOCK_C=block_c, CDT=cdt, num_warps=warps, num_stages=2)
    if kernel != "merge":
        out.update(BLOCK_K=bk, DOT_PREC=prec)
    return out


def info_nce_fwd(q, keys, pos, temperature, *, self_mask, extra_pos, pos_offset, pos_mod,
                 compute_dq):
    """Launch the forward sweep and the merge.

    Returns (loss_rows (N,), lse2 (N,) in log2 units, dq (N, C) | None, coef (N,) | None),
    in the accumulation dtype. dq is d loss_i / d q_i, coef_i = d loss_i / d k_i / q_i.
    """
    q, keys, pos = _row_major(q), _row_major(keys), _row_major(pos)
    (n, c), m = q.shape, keys.shape[0]
    kp, mp = _kernel_params("fwd", c, q.dtype), _kernel_params("merge", c, q.dtype)
    acc_dt = compute_dtype(q.dtype)
    row_blocks, n_tiles = cdiv(n, kp["BLOCK_N"]), cdiv(m, kp["BLOCK_K"])
    n_splits, per = _splits(row_blocks, n_tiles, q.device)
    m_part = torch.empty(n_splits, n, device=q.device, dtype=acc_dt)
    l_part = torch.empty_like(m_part)
    acc_part = (torch.empty(n_splits, n, c, device=q.device, dtype=acc_dt) if compute_dq
                else m_part)
    scale, inv_t = LOG2E / temperature, 1.0 / temperature
    _info_nce_fwd_kernel[(row_blocks, n_splits)](
        q, keys, m_part, l_part, acc_part, q.stride(0), keys.stride(0), n, m, c, per, scale,
        SELF_MASK=self_mask, COMPUTE_DQ=compute_dq, **kp)
    loss = torch.empty(n, device=q.device, dtype=acc_dt)
    lse = torch.empty_like(loss)
    dq = torch.empty(n, c, device=q.device, dtype=acc_dt) if compute_dq else loss
    coef = torch.empty_like(loss) if extra_pos else loss
    _info_nce_merge_kernel[(cdiv(n, mp["BLOCK_N"]),)](
        q, pos, m_part, l_part, acc_part, loss, lse, dq, coef, q.stride(0), pos.stride(0),
        n, c, n_splits, pos_offset, pos_mod, scale, inv_t,
        EXTRA_POS=extra_pos, COMPUTE_DQ=compute_dq, **mp)
    return (loss.mul_(LN2), lse, dq if compute_dq else None, coef if extra_pos else None)


def info_nce_dk(q, keys, lse2, temperature, *, self_mask, key_offset, key_mod):
    """Launch the key-gradient sweep: d sum_i loss_i / d keys, (M, C) in the accumulation
    dtype. Key j is the positive of row (j + key_offset) % key_mod when that is < N."""
    q, keys = _row_major(q), _row_major(keys)
    (n, c), m = q.shape, keys.shape[0]
    kp = _kernel_params("dk", c, q.dtype)
    dk = torch.empty(m, c, device=q.device, dtype=compute_dtype(q.dtype))
    _info_nce_dk_kernel[(cdiv(m, kp["BLOCK_K"]),)](
        q, keys, lse2, dk, q.stride(0), keys.stride(0), n, m, c, key_offset, key_mod,
        LOG2E / temperature, 1.0 / temperature, SELF_MASK=self_mask, **kp)
    return dk


# ----------------------------------------------------------------------------- portable path
def _chunk_elems(device: torch.device) -> int:
    """Logits per chunk. Every large op is a fork/join of the intra-op thread team, and on a
    shared 2-core machine each join can wait a whole time slice (ROOFLINE: chunked MoCo went
    303 -> 1,494 ms at 2 threads), so with more than one thread (or on a GPU, per launch) the
    chunks are 4x larger: 16 MB of fp32 logits instead of 4 MB, a quarter of the ops."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return CHUNK_ELEMS
    return 4 * CHUNK_ELEMS


def _queue_sweep_torch(q, k, queue, temperature, *, compute_dq):
    """MoCo queue loss in key chunks with an online max; never materializes N x K.

    Returns (loss_rows, dq | None, coef) like `info_nce_fwd`. Per chunk: one GEMM for the
    logits, in-place exp, one GEMM into the running sum p.key (few ops: 2-thread CPUs
    collapse under many small ones).
    """
    acc_dt = compute_dtype(q.dtype)
    qs = q.to(acc_dt) * (1.0 / temperature)  # (N, C), scaled once
    kp = k.to(acc_dt)
    pos = (qs * kp).sum(1)  # (N,) positive logits
    m, l = pos.clone(), torch.ones_like(pos)  # the positive starts the running sums  # noqa: E741
    acc = kp.clone() if compute_dq else None  # sum_j exp(s_j - m) key_j, positive included
    step = max(1, min(len(queue), _chunk_elems(q.device) // len(q)))
    buf = torch.empty(len(q), step, device=q.device, dtype=acc_dt)
    for start in range(0, len(queue), step):
        chunk = queue[start:start + step].to(acc_dt)  # (Kc, C), a view when fp32
        s = torch.mm(qs, chunk.T, out=buf[:, :len(chunk)])  # (N, Kc)
        m_new = torch.maximum(m, s.amax(1))
        s.sub_(m_new[:, None]).exp_()
        alpha = (m - m_new).exp_()
        l.mul_(alpha).add_(s.sum(1))
        if compute_dq:
            acc.mul_(alpha[:, None]).addmm_(s, chunk)
        m = m_new
    lse = m + l.log()
    dq = (acc / l[:, None] - kp).mul_(1.0 / temperature) if compute_dq else None
    coef = (pos - lse).exp_().sub_(1.0).mul_(1.0 / temperature)
    return lse - pos, dq, coef


def _rows_sweep_torch(q, keys, temperature, pos_idx, *, self_mask, compute_dq, compute_dk):
    """In-batch / NT-Xent loss in row chunks across the full key width.

    Each chunk's log_softmax is exact, and its probabilities feed both gradients at once:
    dq = (p @ keys - keys[pos]) / T and dk += p^T @ q_chunk (then minus q at the positives).
    Returns (loss_rows, dq | None, dk | None).
    """
    acc_dt = compute_dtype(q.dtype)
    qc, kc = q.to(acc_dt), keys.to(acc_dt)
    qs = qc * (1.0 / temperature)
    (n, c), m = q.shape, keys.shape[0]
    rows = max(1, min(n, _chunk_elems(q.device) // m))
    loss = torch.empty(n, device=q.device, dtype=acc_dt)
    dq = torch.empty(n, c, device=q.device, dtype=acc_dt) if compute_dq else None
    dk = torch.zeros(m, c, device=q.device, dtype=acc_dt) if compute_dk else None
    s_buf = torch.empty(rows, m, device=q.device, dtype=acc_dt)
    lp_buf = torch.empty_like(s_buf)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = torch.mm(qs[r0:r1], kc.T, out=s_buf[:r1 - r0])  # (R, M)
        if self_mask:
            s.diagonal(r0).fill_(float("-inf"))  # entries (i, r0 + i): the row itself
        lp = torch.log_softmax(s, 1, out=lp_buf[:r1 - r0])
        loss[r0:r1] = lp.gather(1, pos_idx[r0:r1, None])[:, 0].neg_()
        if compute_dq or compute_dk:
            p = lp.exp_()
            if compute_dq:
                torch.mm(p, kc, out=dq[r0:r1])
            if compute_dk:
                dk.addmm_(p.T, qc[r0:r1])
    if compute_dq:
        dq.sub_(kc[pos_idx]).mul_(1.0 / temperature)
    if compute_dk:
        dk.index_add_(0, pos_idx, qc, alpha=-1.0).mul_(1.0 / temperature)
    return loss, dq, dk


# ----------------------------------------------------------------------------- autograd
class InfoNCEFunction(torch.autograd.Function):
    """Rows q against a key matrix; never saves logits, only per-row results.

    mode "queue": keys = the queue (no grad), pos = k (an extra positive logit per row).
    mode "batch": pos = None, the positive of row i is keys[i + offset].
    mode "nt_xent": q and keys are the same z; self excluded; positive (i + offset) mod 2N,
    offset = N. Autograd sums the query and key gradients of z.
    The query gradient (and the portable path's key gradient) is computed in forward; the
    upstream gradient of the scalar loss only scales it in backward.
    """

    @staticmethod
    def forward(ctx, q, keys, pos, temperature, mode, offset, backend, need_dq, need_dk,
                need_dpos):
        ctx.set_materialize_grads(False)
        ctx.meta = (mode, len(q), temperature, backend, offset)
        # the sweeps pick their own precision: autocast must not recast their GEMMs
        with torch.autocast(q.device.type, enabled=False):
            loss, saved = InfoNCEFunction._sweep(q, keys, pos, temperature, mode, offset,
                                                 backend, need_dq, need_dk, need_dpos)
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def _sweep(q, keys, pos, temperature, mode, offset, backend, need_dq, need_dk, need_dpos):
        """(mean loss, tensors for backward: dq, coef, q, keys or dk, lse)."""
        n, m = len(q), len(keys)
        if backend == "triton":
            if mode == "queue":
                loss, lse, dq, coef = info_nce_fwd(
                    q, keys, pos, temperature, self_mask=False, extra_pos=True, pos_offset=0,
                    pos_mod=n, compute_dq=need_dq)
            else:
                loss, lse, dq, coef = info_nce_fwd(
                    q, keys, keys, temperature, self_mask=mode == "nt_xent", extra_pos=False,
                    pos_offset=offset, pos_mod=m, compute_dq=need_dq)
            # key gradients come from their own sweep in backward
            saved = (dq, coef, q if need_dk or need_dpos else None, keys if need_dk else None,
                     lse if need_dk else None)
        else:
            if mode == "queue":
                loss, dq, coef = _queue_sweep_torch(q, pos, keys, temperature,
                                                    compute_dq=need_dq)
                dk = None  # the queue takes no gradient
            else:
                pos_idx = (torch.arange(n, device=q.device) + offset) % m
                loss, dq, dk = _rows_sweep_torch(
                    q, keys, temperature, pos_idx, self_mask=mode == "nt_xent",
                    compute_dq=need_dq, compute_dk=need_dk)
                coef = None
            saved = (dq, coef, q if need_dpos else None, dk, None)
        return loss.mean(), saved

    @staticmethod
    def backward(ctx, grad):
        mode, n, temperature, backend, offset = ctx.meta
        dq, coef, q, keys_or_dk, lse = ctx.saved_tensors
        if grad is None:
            return (None,) * 10
        scale = grad / n  # d mean / d loss_i
        dq_out = dk_out = dpos_out = None
        if ctx.needs_input_grad[0] and dq is not None:
            dq_out = dq * scale
        if ctx.needs_input_grad[1] and mode != "queue":
            if backend == "triton":
                dk = info_nce_dk(q, keys_or_dk, lse, temperature, self_mask=mode == "nt_xent",
                                 key_offset=len(keys_or_dk) - offset if mode == "batch"
                                 else offset, key_mod=len(keys_or_dk))
            else:
                dk = keys_or_dk
            dk_out = dk * scale
        if mode == "queue" and ctx.needs_input_grad[2]:
            dpos_out = (coef[:, None] * q) * scale
        return dq_out, dk_out, dpos_out, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API
def _backend(*tensors: torch.Tensor) -> str:
    backend = choose_backend(*tensors)
    if backend == "triton" and tensors[0].shape[1] > TRITON_MAX_C:
        return "torch"
    return backend


def info_nce_queue(q, k, queue, temperature, *, normalize=True):
    """MoCo v1/v2 InfoNCE against a queue of negatives, fused (no N x K logits).

    Args:
        q: queries (N, C); gradients flow to them.
        k: positive keys (N, C); gradients flow to them when k requires grad.
        queue: negatives (K, C), K >= 1, used as they are (already normalized), no gradient.
        temperature: T > 0.
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
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    grad = torch.is_grad_enabled()
    return InfoNCEFunction.apply(q, queue, k, temperature, "queue", 0, backend,
                                 grad and q.requires_grad, False, grad and k.requires_grad)


def info_nce_batch(q, k, temperature, *, positive_offset=0, normalize=True):
    """MoCo v3 in-batch InfoNCE: CE(q k^T / T, arange(N) + positive_offset), fused.

    Args:
        q: queries (N, C). k: keys (M, C), M >= N, e.g. gathered from every rank.
        temperature: T > 0 (MoCo v3 applies its 2T factor itself).
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
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    grad = torch.is_grad_enabled()
    return InfoNCEFunction.apply(q, k, None, temperature, "batch", positive_offset, backend,
                                 grad and q.requires_grad, grad and k.requires_grad, False)


def nt_xent(z1, z2, temperature, *, normalize=True):
    """SimCLR NT-Xent over the 2N views [z1; z2], fused (no 2N x 2N logits).

    Args:
        z1, z2: the two views' embeddings, (N, C) each; row i of z1 pairs with row i of z2.
        temperature: T > 0.
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
        z = F.normalize(z, dim=1)
    need = torch.is_grad_enabled() and z.requires_grad
    return InfoNCEFunction.apply(z, z, None, temperature, "nt_xent", len(z1), backend,
                                 need, need, False)


class MoCoQueue(nn.Module):
    """Ring buffer of `size` keys of width `dim`, initialized to random unit vectors.

    Buffers: ``queue`` (size, dim) and ``ptr`` (the next slot to overwrite, a 0-d long), so the
    state_dict round-trips. `enqueue` takes batches of any length: one that does not divide
    `size` wraps around, and one longer than `size` keeps its last `size` keys, exactly as if
    its rows had been enqueued one by one.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        return self.queue.shape[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (B, dim) over the oldest entries; any B >= 0."""
        check_tensor("keys", keys, ndim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have dim={self.dim} columns, got shape "
                             f"{tuple(keys.shape)}")
        n, size, ptr = keys.shape[0], self.size, int(self.ptr)
        if n == 0:
            return
        keys = keys.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        start = ptr
        if n > size:  # the first n - size rows would be overwritten within this batch
            keys, start = keys[n - size:], (ptr + n - size) % size
        first = min(len(keys), size - start)  # contiguous slices: no index tensor
        self.queue[start:start + first] = keys[:first]
        self.queue[:len(keys) - first] = keys[first:]
        self.ptr.fill_((ptr + n) % size)
