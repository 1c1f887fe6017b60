"""Fused DINO loss: centering + tempered softmax cross-entropy over every crop pair.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers". Shapes:
V student views of B rows each, view-major (view v is rows v*B .. v*B+B-1), G = n_global teacher
views (the first G student views are the same crops), K prototypes (65536 in the paper).

    student_out S (V*B, K)   teacher_out T (G*B, K), no grad   center c (1, K) or (K,)
    P_i   = softmax((T_i - c) / tau_t)                        per teacher view i      (G*B, K)
    LSE_v = logsumexp(S_v / tau_s)                           per student row         (V*B,)
    loss  = 1/n_pairs sum_i sum_{v != i} mean_b [LSE_vb - sum_k P_ib,k S_vb,k / tau_s]

since sum_k P = 1. Grouping by student view, with Q_v = sum_{i != v} P_i (= sum_i P_i for a
local view, minus P_v for a global one) and n_v = #teachers paired with v (G - 1 for v < G,
else G), n_pairs = sum_v n_v = G (V - 1):

    loss  = 1/(B n_pairs) sum_{v,b} [n_v LSE_vb - sum_k Q_vb,k S_vb,k / tau_s]
    dS_v  = (n_v softmax(S_v / tau_s) - Q_v) / (tau_s B n_pairs)      (times the upstream grad)

So each row's LSE is computed once (not once per pair) and no per-pair tensor exists.
Collapse statistics come from the same teacher pass: H = mean over teacher rows of
-sum_k P log P, and KL = mean over pairs of (CE - H(teacher)) = loss - H (every teacher view
meets V - 1 students, so the pair mean of H_i is the row mean). The center update needs
colsum(T), also taken in the teacher pass.

Single-pass design: the loss is a scalar, so when student_out requires grad the forward also
writes dS (in student_out's dtype) and backward only scales it by the upstream gradient, in
place (skipped when that gradient is exactly 1). A graph through this loss can therefore be
backpropagated once (retain_graph double backward raises).

Paths (`choose_backend`; SELFSUP_KERNELS forces one):
- "triton": three kernels. Teacher stats (per row: online max/sum over K tiles -> LSE of
  the centered tempered logits and the entropy), teacher probs (tiles of B-rows x K: writes
  sum_i P_i in fp32 and deterministic column-sum partials for the center), student (per row:
  sweep 1 = online LSE + the cross term, sweep 2 = dS). A global view's own P_v is recomputed
  from T (one exp) instead of being stored. fp32 accumulation, maxima subtracted, 1/tau in
  fp32; float64 inputs run the kernels in float64 (tight float64 tests).
- "torch": the same algebra in a custom autograd.Function over blocks of batch rows; each
  block of S is scaled, soft-maxed and turned into the gradient inside its own dS rows. Peak
  extra memory = dS + sum_i P_i (B, K) fp32 + one block (224 MiB at B=64, 2+10, K=65536 fp32,
  vs 944 MiB for the pair loop).
- "ref": `dino_loss_ref`, the official pair loop (the oracle).

Dtypes: student_out and teacher_out share one dtype. center has that dtype too, except that an
fp32 center is accepted with fp16/bf16 logits (DINOLoss keeps an fp32 buffer; logits under
AMP are bf16). For fp16/bf16 inputs the loss and statistics are returned in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ._registry import KernelConfig, register_kernel
from ._triton import tl, triton
from ._utils import (
    cdiv,
    check_same_device,
    check_temperature,
    check_tensor,
    choose_backend,
    compute_dtype,
    next_power_of_2,
)

LOWP = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- reference
def dino_loss_ref(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04,
                  n_global=2):
    """The official loop over pairs (teacher view i, student view v), v != i.

    Memory traffic at B=64, 2+10 crops, K=65536 (fp32): every line below is a full pass.
    """
    n_views = student_out.shape[0] // (teacher_out.shape[0] // n_global)
    s_chunks = (student_out / student_temp).chunk(n_views)  # reads S, writes S/tau (201 MB)
    t_chunks = F.softmax((teacher_out - center.reshape(1, -1)) / teacher_temp, -1).detach()
    t_chunks = t_chunks.chunk(n_global)  # 3 teacher passes (34 MB each)
    total, pairs = 0.0, 0
    for i, t in enumerate(t_chunks):
        for v, s in enumerate(s_chunks):
            if v == i:
                continue
            # per pair: log_softmax of the view again (17 MB written), the product (17 MB),
            # and in backward the same again: 22 pairs x ~6 passes
            total = total + torch.sum(-t * F.log_softmax(s, -1), -1).mean()
            pairs += 1
    return total / pairs


# ----------------------------------------------------------------------------- validation
def _validate(student_out, teacher_out, center, student_temp, teacher_temp, n_global):
    """Check the inputs; return (B, V, K, tau_s, tau_t) or raise ValueError naming the arg."""
    s = check_tensor("student_out", student_out, ndim=2)
    t = check_tensor("teacher_out", teacher_out, ndim=2)
    c = check_tensor("center", center, ndim=(1, 2))
    if isinstance(n_global, bool) or not isinstance(n_global, int) or n_global < 1:
        raise ValueError(f"n_global must be a positive int, got {n_global!r}")
    ts = check_temperature("student_temp", student_temp)
    tt = check_temperature("teacher_temp", teacher_temp)
    k = s.shape[1]
    if k < 1:
        raise ValueError(f"student_out must have K >= 1 columns, got shape {tuple(s.shape)}")
    if t.shape[1] != k:
        raise ValueError(f"teacher_out must have K={k} columns like student_out, got shape "
                         f"{tuple(t.shape)}")
    if c.shape not in ((k,), (1, k)):
        raise ValueError(f"center must have shape (1, {k}) or ({k},), got {tuple(c.shape)}")
    if t.shape[0] == 0 or t.shape[0] % n_global:
        raise ValueError(f"teacher_out must have n_global*B rows (n_global={n_global}, B >= 1), "
                         f"got {t.shape[0]}")
    b = t.shape[0] // n_global
    if s.shape[0] % b:
        raise ValueError(f"student_out must have V*B rows with B={b} (teacher_out rows / "
                         f"n_global), got {s.shape[0]}")
    v = s.shape[0] // b
    if n_global > v:
        raise ValueError(f"n_global={n_global} exceeds the number of student views V={v}")
    if n_global * (v - 1) == 0:
        raise ValueError("student_out must hold at least 2 views: with V=1 there is no pair")
    check_same_device(student_out=s, teacher_out=t, center=c)
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_out must have student_out's dtype {s.dtype}, got {t.dtype}")
    if c.dtype != s.dtype and not (c.dtype == torch.float32 and s.dtype in LOWP):
        raise ValueError(f"center must have the logits' dtype {s.dtype} (or float32 with "
                         f"fp16/bf16 logits), got {c.dtype}")
    return b, v, k, ts, tt


# ----------------------------------------------------------------------------- Triton kernels
# Every kernel reads its accumulation dtype from an fp32 (fp64 for float64 inputs) pointer
# argument, so float64 tests run the very same code in float64. params = [1/tau_s, 1/tau_t,
# 1/(tau_s B n_pairs)] is a tiny device tensor: no recompile per temperature, exact in fp64.
@triton.jit
def _dino_teacher_stats_kernel(
    t_ptr, c_ptr, par_ptr,  # teacher (G*B, K) dt, center (K,) acc, params (3,) acc
    lse_ptr, ent_ptr,  # out: per teacher row LSE of z = (t - c)/tau_t, entropy of softmax(z)
    K, stride_t,
    BLOCK_K: tl.constexpr,
):
    # One program per teacher row; K in tiles with an online max m, sum l = sum e^(z-m) and
    # a = sum e^(z-m) (z-m):  LSE = m + log l,  H = -sum P log P = log l - a / l.
    row = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    inv_tt = tl.load(par_ptr + 1)
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([], float("-inf"), acc_ty)
    l = tl.zeros([], acc_ty)
    a = tl.zeros([], acc_ty)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        t = tl.load(t_ptr + row * stride_t + offs, mask=mask, other=0.0).to(acc_ty)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        z = tl.where(mask, (t - c) * inv_tt, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)  # rescales the running sums to the new max (0 at start)
        e = tl.exp(z - m_new)
        zs = tl.where(mask, z - m_new, 0.0)
        # a at max m' = e^(m-m') (a + (m - m') l); guarded since (-inf) * 0 is nan at start
        a = alpha * (a + tl.where(l > 0, m - m_new, 0.0) * l) + tl.sum(e * zs, axis=0)
        l = alpha * l + tl.sum(e, axis=0)
        m = m_new
    log_l = tl.log(l)
    tl.store(lse_ptr + row, m + log_l)
    tl.store(ent_ptr + row, log_l - a / l)


_T_SIG = {"t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32", "lse_ptr": "*fp32",
          "ent_ptr": "*fp32", "K": "i32", "stride_t": "i32", "BLOCK_K": "constexpr"}
TEACHER_BLOCK_K, TEACHER_WARPS = 2048, 8
register_kernel(
    _dino_teacher_stats_kernel,
    signature=_T_SIG,
    configs=[KernelConfig(f"{dt} BLOCK_K={TEACHER_BLOCK_K}", {"BLOCK_K": TEACHER_BLOCK_K},
                          types={"dt": dt}, num_warps=TEACHER_WARPS, num_stages=2,
                          default=dt == "bf16") for dt in ("bf16", "fp16", "fp32")],
)


@triton.jit
def _dino_teacher_probs_kernel(
    t_ptr, c_ptr, par_ptr, lse_ptr,  # teacher (G*B, K) dt, center, params, teacher-row LSE
    psum_ptr, colsum_ptr,  # out: sum_i P_i (B, K) acc; column-sum partials (cdiv(B, BB), K)
    B, K, G, stride_t,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (batch block, column tile): P_i = exp(z_i - LSE_i) for each teacher view i of
    # these batch rows, summed over i; the raw teacher rows are summed over the block for the
    # center. Partials are reduced by the launcher in a fixed order: deterministic.
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_ty = psum_ptr.dtype.element_ty
    inv_tt = tl.load(par_ptr + 1)
    b_offs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mb = b_offs < B
    mk = k_offs < K
    mask = mb[:, None] & mk[None, :]
    c = tl.load(c_ptr + k_offs, mask=mk, other=0.0)
    psum = tl.zeros([BLOCK_B, BLOCK_K], acc_ty)
    csum = tl.zeros([BLOCK_K], acc_ty)
    for i in range(G):
        rows = (i * B + b_offs).to(tl.int64)  # teacher view i, batch rows b_offs
        t = tl.load(t_ptr + rows[:, None] * stride_t + k_offs[None, :], mask=mask,
                    other=0.0).to(acc_ty)
        lse = tl.load(lse_ptr + rows, mask=mb, other=0.0)
        p = tl.exp((t - c[None, :]) * inv_tt - lse[:, None])
        psum += tl.where(mask, p, 0.0)
        csum += tl.sum(t, axis=0)  # masked lanes loaded as 0
    out = b_offs.to(tl.int64)[:, None] * K + k_offs[None, :]
    tl.store(psum_ptr + out, psum, mask=mask)
    tl.store(colsum_ptr + pid_b.to(tl.int64) * K + k_offs, csum, mask=mk)


PROBS_BLOCK_B, PROBS_BLOCK_K, PROBS_WARPS = 4, 512, 4
register_kernel(
    _dino_teacher_probs_kernel,
    signature={"t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32", "lse_ptr": "*fp32",
               "psum_ptr": "*fp32", "colsum_ptr": "*fp32", "B": "i32", "K": "i32", "G": "i32",
               "stride_t": "i32", "BLOCK_B": "constexpr", "BLOCK_K": "constexpr"},
    configs=[KernelConfig(f"{dt} {PROBS_BLOCK_B}x{PROBS_BLOCK_K}",
                          {"BLOCK_B": PROBS_BLOCK_B, "BLOCK_K": PROBS_BLOCK_K},
                          types={"dt": dt}, num_warps=PROBS_WARPS, num_stages=2,
                          default=dt == "bf16") for dt in ("bf16", "fp16", "fp32")],
)


@triton.jit
def _dino_student_kernel(
    s_ptr, t_ptr, c_ptr, par_ptr,  # student (V*B, K) dt, teacher (G*B, K) dt, center, params
    psum_ptr, lse_t_ptr,  # sum_i P_i (B, K) acc; teacher-row LSE (G*B,) acc
    ds_ptr, loss_ptr,  # out: dS (V*B, K) dt (if write_grad); n_v LSE - <Q, x> per row (V*B,)
    B, K, V, G, stride_s, stride_t, stride_ds, write_grad,
    BLOCK_K: tl.constexpr,
):
    # One program per student row (v, b); the V views of one batch row are adjacent programs,
    # so they share the P sum row in L2. x = s / tau_s in fp32,
    # Q = sum_i P_i - [v < G] P_v (P_v recomputed from T: one exp, no stored P).
    # sweep 1: online LSE of x and <Q, x>;  sweep 2: dS = (n_v e^(x - LSE) - Q) * scale.
    pid = tl.program_id(0)
    b = pid // V
    v = pid % V
    row = (v * B + b).to(tl.int64)
    acc_ty = loss_ptr.dtype.element_ty
    inv_ts = tl.load(par_ptr)
    inv_tt = tl.load(par_ptr + 1)
    scale = tl.load(par_ptr + 2)
    is_g = v < G
    n_v = tl.where(is_g, G - 1, G).to(acc_ty)
    trow = tl.where(is_g, v * B + b, 0).to(tl.int64)  # this view's teacher row if global
    k_g = tl.where(is_g, K, 0)  # columns to read from the teacher: none for a local view
    lse_v = tl.load(lse_t_ptr + trow)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + trow * stride_t
    q_row = psum_ptr + b.to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)

    m = tl.full([], float("-inf"), acc_ty)
    l = tl.zeros([], acc_ty)
    dot = tl.zeros([], acc_ty)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        x = tl.load(s_row + offs, mask=mask, other=0.0).to(acc_ty) * inv_ts
        q = tl.load(q_row + offs, mask=mask, other=0.0)
        mg = offs < k_g  # local rows never touch the teacher
        tv = tl.load(t_row + offs, mask=mg, other=0.0).to(acc_ty)
        c = tl.load(c_ptr + offs, mask=mg, other=0.0)
        q = tl.where(mg, q - tl.exp((tv - c) * inv_tt - lse_v), q)
        dot += tl.sum(q * x, axis=0)
        xm = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(xm, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(xm - m_new), axis=0)
        m = m_new
    lse = m + tl.log(l)
    tl.store(loss_ptr + row, n_v * lse - dot)

    if write_grad:
        ds_row = ds_ptr + row * stride_ds
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + cols
            mask = offs < K
            x = tl.load(s_row + offs, mask=mask, other=0.0).to(acc_ty) * inv_ts
            q = tl.load(q_row + offs, mask=mask, other=0.0)
            mg = offs < k_g
            tv = tl.load(t_row + offs, mask=mg, other=0.0).to(acc_ty)
            c = tl.load(c_ptr + offs, mask=mg, other=0.0)
            q = tl.where(mg, q - tl.exp((tv - c) * inv_tt - lse_v), q)
            ds = (n_v * tl.exp(x - lse) - q) * scale
            tl.store(ds_row + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


STUDENT_BLOCK_K, STUDENT_WARPS = 2048, 8
register_kernel(
    _dino_student_kernel,
    signature={"s_ptr": "*{dt}", "t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32",
               "psum_ptr": "*fp32", "lse_t_ptr": "*fp32", "ds_ptr": "*{dt}", "loss_ptr": "*fp32",
               "B": "i32", "K": "i32", "V": "i32", "G": "i32", "stride_s": "i32",
               "stride_t": "i32", "stride_ds": "i32", "write_grad": "i32",
               "BLOCK_K": "constexpr"},
    configs=[KernelConfig(f"{dt} BLOCK_K={STUDENT_BLOCK_K}", {"BLOCK_K": STUDENT_BLOCK_K},
                          types={"dt": dt}, num_warps=STUDENT_WARPS, num_stages=2,
                          default=dt == "bf16") for dt in ("bf16", "fp16", "fp32")],
)


@triton.jit
def _dino_grad_scale_kernel(
    ds_ptr, g_ptr,  # dS (N,) dt, scaled in place; the upstream gradient (1,) fp32
    N,
    BLOCK: tl.constexpr,
):
    # Backward of the single-pass design: dS *= g, skipped when g == 1 (plain
    # loss.backward()) without a host sync: the programs just exit.
    g = tl.load(g_ptr)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        d = tl.load(ds_ptr + offs, mask=mask, other=0.0).to(g_ptr.dtype.element_ty)
        tl.store(ds_ptr + offs, (d * g).to(ds_ptr.dtype.element_ty), mask=mask)


SCALE_BLOCK, SCALE_WARPS = 4096, 8
register_kernel(
    _dino_grad_scale_kernel,
    signature={"ds_ptr": "*{dt}", "g_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"},
    configs=[KernelConfig(f"{dt} BLOCK={SCALE_BLOCK}", {"BLOCK": SCALE_BLOCK},
                          types={"dt": dt}, num_warps=SCALE_WARPS, num_stages=1,
                          default=dt == "bf16") for dt in ("bf16", "fp16", "fp32")],
    hot=False,
)


# ----------------------------------------------------------------------------- launchers
def _unit_cols(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def dino_loss_fwd_triton(student_out, teacher_out, center, student_temp, teacher_temp,
                         n_global, need_grad, *, block_k=None):
    """Launch the teacher and student kernels. Returns (loss, entropy, colsum, dS or None).

    block_k overrides the column tile of the row kernels (tests use it to exercise the loop).
    """
    s, t = _unit_cols(student_out), _unit_cols(teacher_out)
    (vb, k), gb = s.shape, t.shape[0]
    b = gb // n_global
    v = vb // b
    acc = compute_dtype(s.dtype)
    dev = s.device
    n_pairs = n_global * (v - 1)
    c = center.detach().reshape(k).to(acc).contiguous()
    par = torch.empty(3, dtype=acc, device=dev)  # filled on the device: no host sync
    for i, val in enumerate((1.0 / student_temp, 1.0 / teacher_temp,
                             1.0 / (student_temp * b * n_pairs))):
        par[i] = val
    row_bk = block_k or min(STUDENT_BLOCK_K, next_power_of_2(k))

    lse_t = torch.empty(gb, dtype=acc, device=dev)
    ent = torch.empty(gb, dtype=acc, device=dev)
    _dino_teacher_stats_kernel[(gb,)](
        t, c, par, lse_t, ent, k, t.stride(0),
        BLOCK_K=block_k or min(TEACHER_BLOCK_K, next_power_of_2(k)), num_warps=TEACHER_WARPS)

    n_bb = cdiv(b, PROBS_BLOCK_B)
    probs_bk = min(PROBS_BLOCK_K, next_power_of_2(k))
    psum = torch.empty(b, k, dtype=acc, device=dev)
    col_part = torch.empty(n_bb, k, dtype=acc, device=dev)
    _dino_teacher_probs_kernel[(n_bb, cdiv(k, probs_bk))](
        t, c, par, lse_t, psum, col_part, b, k, n_global, t.stride(0),
        BLOCK_B=PROBS_BLOCK_B, BLOCK_K=probs_bk, num_warps=PROBS_WARPS)

    ds = torch.empty_like(s, memory_format=torch.contiguous_format) if need_grad else s
    loss_rows = torch.empty(vb, dtype=acc, device=dev)
    _dino_student_kernel[(vb,)](
        s, t, c, par, psum, lse_t, ds, loss_rows,
        b, k, v, n_global, s.stride(0), t.stride(0), ds.stride(0), int(need_grad),
        BLOCK_K=row_bk, num_warps=STUDENT_WARPS)
    loss = loss_rows.sum() / (b * n_pairs)
    return loss, ent.mean(), col_part.sum(0), (ds if need_grad else None)


def dino_grad_scale_triton(ds, grad):
    """ds *= grad in place (grad: 0-dim tensor), a no-op pass when grad == 1."""
    g = grad.detach().reshape(1).to(compute_dtype(ds.dtype))
    n = ds.numel()
    _dino_grad_scale_kernel[(cdiv(n, SCALE_BLOCK),)](ds, g, n, BLOCK=SCALE_BLOCK,
                                                     num_warps=SCALE_WARPS)
    return ds


# ----------------------------------------------------------------------------- portable path
_SOFTMAX_OUT = torch.ops.aten._softmax.out
_LOG_SOFTMAX_OUT = torch.ops.aten._log_softmax.out
# Few, large ops. At 2 threads with another job on the machine every op waits at an OpenMP
# barrier for a descheduled thread: measured at B=64, 2+10 crops, K=65536 with a busy core,
# 16-row blocks took 6.1 s, 32-row 2.5 s, 64-row 1.0 s (ref 2.5 s); on a quiet core 64-row
# blocks cost ~30% over 16 (220 vs 160 ms). A (64, K) fp32 block is 16 MiB.
TORCH_BLOCK_B = 64  # batch rows per student block: one whole view per op at B <= 64
TORCH_TEACHER_ROWS = 64


def _exp_floor(dtype, k):
    """Logits are clamped to (row max + this) before softmax: x86 CPUs take a 10-20x slower
    path when exp or the normalization produces subnormals (measured: exp over [-1000, 0]
    runs 15x slower than over [-80, 0]). Probabilities below e^floor / K, i.e. < 1e-24 in
    fp32 (1e-294 in fp64), are raised to that value; that moves no fp32 result."""
    return math.log(torch.finfo(dtype).tiny) + math.log(k) + 20.0


@functools.cache
def _softmax_inplace_ok(device_type: str) -> bool:
    """Whether aten's softmax may write over its input (the CPU and CUDA kernels finish
    reading a row element before writing it). Checked once per device type against the
    out-of-place result; if a torch version ever disagrees or refuses, `_softmax_` copies."""
    try:
        x = torch.randn(3, 3000, device=device_type) * 30
        y = x.clone()
        _SOFTMAX_OUT(y, -1, False, out=y)
        return bool(torch.equal(y, torch.softmax(x, -1)))
    except RuntimeError:
        return False


def _softmax_(x):
    """x <- softmax(x) over the last dim, in place (saves a block buffer per op)."""
    src = x if _softmax_inplace_ok(x.device.type) else x.clone()
    return _SOFTMAX_OUT(src, -1, False, out=x)


def _teacher_probs_(out, t_rows, c, inv_tt, floor):
    """out <- softmax((t_rows - c) / tau_t), computed in out's dtype (fp32 before 1/tau)."""
    z = torch.sub(t_rows, c, out=out).mul_(inv_tt)
    z.clamp_(min=z.amax(-1, keepdim=True) + floor)
    return _softmax_(z)


def dino_loss_fwd_torch(student_out, teacher_out, center, student_temp, teacher_temp,
                        n_global, need_grad, *, block_b=TORCH_BLOCK_B,
                        teacher_rows=TORCH_TEACHER_ROWS):
    """Chunked torch forward. Returns (loss, entropy, colsum, dS or None).

    Peak extra memory: dS (student size, the output) + sum_i P_i (B, K) in fp32 + one
    (block_b, K) block for a global view's own P_v (+ one for fp16/bf16 or no-grad calls).
    Each (batch block, view) of S is scaled, soft-maxed and turned into the gradient inside
    its own dS rows: ~7 large ops.
    """
    s, t = _unit_cols(student_out), _unit_cols(teacher_out)
    (vb, k), gb = s.shape, t.shape[0]
    b = gb // n_global
    v = vb // b
    acc = compute_dtype(s.dtype)
    dev = s.device
    n_pairs = n_global * (v - 1)
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    scale = inv_ts / (b * n_pairs)
    floor = _exp_floor(acc, k)
    c = center.detach().reshape(1, k).to(acc)

    # teacher: P = softmax((t - c) / tau_t) in blocks of rows; keep -scale * sum_i P_i only
    qneg = torch.zeros(b, k, dtype=acc, device=dev)
    tb = min(teacher_rows, b)
    zbuf = torch.empty(tb, k, dtype=acc, device=dev)
    lbuf = torch.empty_like(zbuf)
    ent = torch.zeros((), dtype=acc, device=dev)
    for i in range(n_global):
        for r0 in range(0, b, tb):
            r1 = min(b, r0 + tb)
            z = torch.sub(t[i * b + r0:i * b + r1], c, out=zbuf[: r1 - r0]).mul_(inv_tt)
            z.clamp_(min=z.amax(-1, keepdim=True) + floor)
            lsm = _LOG_SOFTMAX_OUT(z, -1, False, out=lbuf[: r1 - r0])
            p = torch.exp(lsm, out=z)
            ent -= torch.dot(p.view(-1), lsm.view(-1))  # sum over rows of sum_k P log P
            qneg[r0:r1] += p
    del zbuf, lbuf, z, lsm, p  # the student pass reuses that memory
    qneg.mul_(-scale)
    colsum = t.sum(0, dtype=acc)

    # student: per block of batch rows, per view (a contiguous row range of S and dS)
    lowp = s.dtype != acc
    ds = torch.empty_like(s, memory_format=torch.contiguous_format) if need_grad else None
    nb_max = min(block_b, b)
    pbuf = torch.empty(nb_max, k, dtype=acc, device=dev)  # P_v of a global view
    dbuf = torch.empty_like(pbuf) if (lowp or not need_grad) else None
    row_max = torch.empty(vb, dtype=acc, device=dev)  # max of x per student row
    row_pmax = torch.empty(vb, dtype=acc, device=dev)  # max of softmax(x) = e^(max - LSE)
    cross = torch.zeros((), dtype=acc, device=dev)
    for b0 in range(0, b, block_b):
        b1 = min(b, b0 + block_b)
        n = b1 - b0
        q = qneg[b0:b1]
        for view in range(v):
            rows = slice(view * b + b0, view * b + b1)
            n_v = n_global - 1 if view < n_global else n_global
            d = ds[rows] if (need_grad and not lowp) else dbuf[:n]
            if lowp:
                d.copy_(s[rows]).mul_(inv_ts)  # x = s / tau in fp32, never in bf16
            else:
                torch.mul(s[rows], inv_ts, out=d)
            cross += torch.dot(q.view(-1), d.view(-1)) / -scale  # <sum_i P_i, x>
            if view < n_global:  # Q_v excludes the view's own P_v: recomputed from T
                pv = _teacher_probs_(pbuf[:n], t[rows], c, inv_tt, floor)
                cross -= torch.dot(pv.view(-1), d.view(-1))
            m = torch.amax(d, -1, keepdim=True, out=row_max[rows].unsqueeze(-1))
            d.clamp_(min=m + floor)
            _softmax_(d)
            torch.amax(d, -1, out=row_pmax[rows])
            if need_grad:
                torch.add(q, d, alpha=n_v * scale, out=d)  # (n_v p - sum_i P_i) * scale
                if view < n_global:
                    d.add_(pv, alpha=scale)
                if lowp:
                    ds[rows].copy_(d)
    # LSE = max - log p_max: p at the argmax is >= 1/K, so its log is accurate
    n_v_rows = torch.full((v, b), float(n_global), dtype=acc, device=dev)
    n_v_rows[:n_global] -= 1
    lse_sum = torch.dot(n_v_rows.view(-1), row_max - row_pmax.log())
    loss = (lse_sum - cross) / (b * n_pairs)
    return loss, ent / gb, colsum, ds


# ----------------------------------------------------------------------------- autograd
class DINOLossFunction(torch.autograd.Function):
    """(student, teacher, center, tau_s, tau_t, n_global, backend) -> (loss, H, colsum).

    Used only when the student needs a gradient: the forward writes dS, backward scales it
    in place. The entropy and the column sums are non-differentiable side outputs.
    """

    @staticmethod
    def forward(ctx, student_out, teacher_out, center, student_temp, teacher_temp, n_global,
                backend):
        fwd = dino_loss_fwd_triton if backend == "triton" else dino_loss_fwd_torch
        loss, ent, colsum, ds = fwd(student_out, teacher_out.detach(), center.detach(),
                                    student_temp, teacher_temp, n_global, True)
        ctx.ds, ctx.backend = ds, backend
        ctx.mark_non_differentiable(ent, colsum)
        return loss, ent, colsum

    @staticmethod
    def backward(ctx, grad_loss, grad_ent, grad_colsum):
        ds, ctx.ds = ctx.ds, None  # released so autograd can take it as .grad without a copy
        if ds is None:
            raise RuntimeError("dino_loss computes its gradient in the forward and hands it "
                               "over once: backward through it twice is not supported")
        if ctx.backend == "triton":
            dino_grad_scale_triton(ds, grad_loss)
        elif grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            ds.mul_(grad_loss)
        return ds, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API
def _dino_loss_with_stats(student_out, teacher_out, center, *, student_temp=0.1,
                          teacher_temp=0.04, n_global=2):
    """(loss, teacher entropy, colsum(teacher_out) in fp32/fp64) from one pass."""
    b, _, k, ts, tt = _validate(student_out, teacher_out, center, student_temp, teacher_temp,
                                n_global)
    backend = choose_backend(student_out, teacher_out, center)
    if backend == "ref":
        loss = dino_loss_ref(student_out, teacher_out, center, student_temp=ts,
                             teacher_temp=tt, n_global=n_global)
        with torch.no_grad():
            acc = compute_dtype(teacher_out.dtype)
            logp = F.log_softmax((teacher_out.to(acc) - center.reshape(1, k)) / tt, -1)
            ent = -(logp.exp() * logp).sum(-1).mean()
            colsum = teacher_out.sum(0, dtype=acc)
        return loss, ent, colsum
    if not (torch.is_grad_enabled() and student_out.requires_grad):  # loss only: no dS pass
        fwd = dino_loss_fwd_triton if backend == "triton" else dino_loss_fwd_torch
        return fwd(student_out.detach(), teacher_out.detach(), center.detach(), ts, tt,
                   n_global, False)[:3]
    return DINOLossFunction.apply(student_out, teacher_out, center, ts, tt, n_global, backend)


def dino_loss(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04,
              n_global=2):
    """DINO's cross-entropy between centered, sharpened teacher and student distributions.

    Args:
        student_out: (V*B, K) logits of all V student views, view-major; gets the gradient.
        teacher_out: (n_global*B, K) logits of the global views; no gradient.
        center: (1, K) or (K,); same dtype as the logits, or fp32 with fp16/bf16 logits.
        student_temp, teacher_temp: tau_s, tau_t > 0.
        n_global: teacher views; they are the first n_global student views (never paired).
    Returns:
        0-dim loss, mean over the n_global*(V-1) pairs (fp32 for fp16/bf16 inputs).
    Example:
        >>> s, t = torch.randn(12 * 4, 256), torch.randn(2 * 4, 256)
        >>> loss = dino_loss(s, t, torch.zeros(256))
    """
    return _dino_loss_with_stats(student_out, teacher_out, center, student_temp=student_temp,
                                 teacher_temp=teacher_temp, n_global=n_global)[0]


def teacher_temp_schedule(total_steps, warmup_steps, start=0.04, end=0.07):
    """Per-step teacher temperature: linear start -> end over warmup_steps, then end."""
    warm = torch.linspace(start, end, max(int(warmup_steps), 0), dtype=torch.float64)
    rest = torch.full((max(total_steps - len(warm), 0),), float(end), dtype=torch.float64)
    return torch.cat([warm, rest])[:total_steps]


class DINOLoss(nn.Module):
    """DINO loss with the center as a buffer, updated after each forward.

    forward(student_out, teacher_out, teacher_temp=None) -> loss uses the current center,
    then sets center <- m c + (1 - m) mean(teacher_out over rows), all-reduced across ranks.
    `last_stats` holds "teacher_entropy" and "kl" (= loss - entropy) of the last call, from
    the same pass as the loss.
    """

    def __init__(self, out_dim, *, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
                 n_global=2):
        super().__init__()
        self.out_dim, self.student_temp, self.teacher_temp = out_dim, student_temp, teacher_temp
        self.center_momentum, self.n_global = center_momentum, n_global
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict = {}

    def forward(self, student_out, teacher_out, teacher_temp=None):
        tt = self.teacher_temp if teacher_temp is None else teacher_temp
        loss, ent, colsum = _dino_loss_with_stats(
            student_out, teacher_out, self.center, student_temp=self.student_temp,
            teacher_temp=tt, n_global=self.n_global)
        with torch.no_grad():
            ent = ent.detach()
            self.last_stats = {"teacher_entropy": ent, "kl": loss.detach() - ent}
            total = dist.all_reduce_sum(colsum.reshape(1, -1).to(self.center.dtype))
            mean = total / (len(teacher_out) * dist.world_size())
            self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
        return loss
