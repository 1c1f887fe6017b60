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

Gradients and the loss scale. dS is O(1/(tau_s B n_pairs K)): ~1e-8 at K = 65536, below
fp16's smallest subnormal (6e-8), so it must meet the upstream gradient (GradScaler's 65536)
in fp32, before its one rounding to the input dtype. The two paths get there differently:
- Triton recomputes dS in backward from S, T and what the forward saved: psum = sum_i P_i
  (B, K) fp32 and the row LSEs. Chosen by traffic and memory: an fp32 dS buffer for fp16
  would write 4 B/elem in forward, then read 4 and write 2 in backward; the old single-pass
  bf16 design wrote dS in forward and, under GradScaler, read and wrote it again. Recompute
  reads S (2 B) and writes dS (2 B) in backward, reads S only once in forward, and holds
  psum (B*K*4 bytes, 1/6 of a bf16 dS at 2+10 crops) instead of dS between the passes; it
  also makes retain_graph double backward work. The upstream gradient is read on the device.
- the portable path keeps its single pass (recomputing would double its CPU time): the
  forward writes dS inside its own blocks, in fp32 for fp16 inputs, and backward scales it
  (for fp16: one fused multiply-and-round from the fp32 buffer into a fresh fp16 tensor). bf16
  keeps a bf16 buffer: bf16 has fp32's exponent range, and multiplying by the scale afterwards
  costs one rounding. On CPU, eager, a dS of the input's dtype is scaled in place on the
  first backward (a fresh 200 MB buffer page-faults for ~110 ms), and a second backward
  through a retained graph scales it by the ratio into a fresh tensor
  (`_custom_op.scaled_grad_buffer`).

Paths (`choose_backend`; SELFSUP_KERNELS forces one):
- "triton": four tile-parallel kernels, each launched under the tensors' device guard.
  Teacher stats (per (row, column tile): max, sum and entropy partials of the centered
  tempered logits), the fused forward (per (batch rows, column tile): merges the teacher
  partials into row LSEs, forms P_i of every teacher view, writes psum and column-sum
  partials for the center, then takes every student view's tile partials: max, sum of
  exponentials and <Q_v, x_v>; a global view's own P_v is recomputed from the T tile, one
  exp, not stored), a finish kernel (student row LSEs and loss terms) and the backward.
  fp32 accumulation, maxima subtracted, 1/tau in fp32; float64 inputs run the kernels in
  float64 (tight float64 tests). No host sync anywhere: temperatures (floats or device
  tensors) and the upstream gradient reach the kernels as device memory.
- "torch": the same algebra over blocks of batch rows; each block of S is scaled, soft-maxed
  and turned into the gradient inside its own dS rows. Peak extra memory in forward = dS +
  sum_i P_i (B, K) fp32 + one block (224 MiB at B=64, 2+10, K=65536 fp32, vs 944 MiB for the
  pair loop).
Both run inside the custom ops ``torch.ops.selfsup.dino_loss_fwd`` / ``dino_loss_bwd`` /
``scale_grad`` (fake implementations, registered autograd; `_custom_op.py`), so
`torch.compile(fullgraph=True)` traces `dino_loss` and `DINOLoss`. A temperature that changes
every step (the teacher warm-up) is best passed as a 0-d tensor: a float is specialized by
torch.compile, so each new value would recompile.
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
from ._custom_op import (
    fused_op,
    join_temperature,
    placeholder,
    save_grad_buffer,
    scaled_grad_buffer,
    split_temperature,
)
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
def _temperature(name, value, like):
    """A float, or a 0-d tensor on `like`'s device that is never read on the host (a CPU
    tensor becomes a float: reading host memory waits for nothing)."""
    tau = check_temperature(name, value, allow_tensor=True)
    if isinstance(tau, torch.Tensor):
        if tau.device.type == "cpu":  # compiled: the op reads it (a host read breaks graphs)
            return tau if torch.compiler.is_compiling() else float(tau)
        if isinstance(like, torch.Tensor) and tau.device != like.device:
            raise ValueError(f"{name} must be a number or a tensor on {like.device} (or the "
                             f"CPU), got a tensor on {tau.device}")
    return tau


def _validate(student_out, teacher_out, center, student_temp, teacher_temp, n_global):
    """Check the inputs; return (B, V, K, tau_s, tau_t) or raise ValueError naming the arg."""
    s = check_tensor("student_out", student_out, ndim=2)
    t = check_tensor("teacher_out", teacher_out, ndim=2)
    c = check_tensor("center", center, ndim=(1, 2))
    if isinstance(n_global, bool) or not isinstance(n_global, int) or n_global < 1:
        raise ValueError(f"n_global must be a positive int, got {n_global!r}")
    ts = _temperature("student_temp", student_temp, s)
    tt = _temperature("teacher_temp", teacher_temp, s)
    k = s.shape[1]
    if k < 1:
        raise ValueError(f"student_out must have K >= 1 columns, got shape {tuple(s.shape)}")
    if t.shape[1] != k:
        raise ValueError(f"teacher_out must have K={k} columns like student_out, got shape "
                         f"{tuple(t.shape)}")
    # not `c.shape in ((k,), (1, k))`: Dynamo evaluates that wrongly with symbolic sizes
    if c.shape[-1] != k or (c.dim() == 2 and c.shape[0] != 1):
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
# Every kernel reads its accumulation dtype from an fp32 (fp64 for float64 inputs) pointer,
# so float64 tests run the very same code in float64. params = [1/tau_s, 1/tau_t,
# 1/(tau_s B n_pairs)] is a tiny device tensor filled on the device: no host sync, no
# recompile per temperature. Every grid is tiles (rows x column tiles), thousands of programs
# at DINO shapes: one program per row (V*B = 768 at B=64, 5 CTAs/SM) left a 1.2-wave tail on
# an H100's 132 SMs, and 128 teacher rows filled one CTA per SM. Row statistics are merged
# from per-tile partials (max m, sum l = sum e^(z-m), ...), like flash-decoding.
# inlined into the kernels that call it, so compiled and reported with them
JIT_HELPERS = ("_merge_lse",)


@triton.jit
def _merge_lse(m_ptr, l_ptr, rows, mb, n_kt, NKT: tl.constexpr):
    # rows [R] int64 of a (rows, n_kt) partial table: M = max_j m_j, L = sum_j l_j e^(m_j - M)
    # (rows outside mb come back as M = 0, L = 1: finite, never stored).
    j = tl.arange(0, NKT)
    msk = mb[:, None] & (j < n_kt)[None, :]
    idx = rows[:, None] * n_kt + j[None, :]
    m = tl.load(m_ptr + idx, mask=msk, other=float("-inf"))
    mx = tl.where(mb, tl.max(m, axis=1), 0.0)
    w = tl.where(msk, tl.exp(m - mx[:, None]), 0.0)
    big_l = tl.sum(w * tl.load(l_ptr + idx, mask=msk, other=0.0), axis=1)
    return mx, tl.where(mb, big_l, 1.0), w, idx, msk


@triton.jit
def _dino_teacher_stats_kernel(
    t_ptr, c_ptr, par_ptr,  # teacher (G*B, K) dt, center (K,) acc, params (3,) acc
    m_ptr, l_ptr, a_ptr,  # out (G*B, n_kt) acc, per (row, tile): max, sum e^(z-m), sum e^(z-m) (z-m)
    K, stride_t, n_kt,
    BLOCK_K: tl.constexpr,
):
    # z = (t - c) / tau_t on one tile. Merged over tiles: LSE = M + log L and the entropy
    # H = -sum P log P = log L - A / L with A = sum_j e^(m_j - M) (a_j + (m_j - M) l_j).
    row = tl.program_id(0).to(tl.int64)
    kt = tl.program_id(1)
    acc_ty = m_ptr.dtype.element_ty
    inv_tt = tl.load(par_ptr + 1)
    offs = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    t = tl.load(t_ptr + row * stride_t + offs, mask=mask, other=0.0).to(acc_ty)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0)
    z = tl.where(mask, (t - c) * inv_tt, float("-inf"))
    m = tl.max(z, axis=0)  # finite: every tile holds >= 1 column
    zs = tl.where(mask, z - m, 0.0)
    e = tl.where(mask, tl.exp(zs), 0.0)
    out = row * n_kt + kt
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, tl.sum(e, axis=0))
    tl.store(a_ptr + out, tl.sum(e * zs, axis=0))


@triton.jit
def _dino_fwd_kernel(
    s_ptr, t_ptr, c_ptr, par_ptr,  # student (V*B, K) dt, teacher (G*B, K) dt, center, params
    tm_ptr, tsum_ptr, ta_ptr,  # teacher tile partials (G*B, n_kt_t) from the stats kernel
    lse_t_ptr, ent_ptr,  # out (G*B,) acc: teacher-row LSE (for backward), entropy
    psum_ptr, colsum_ptr,  # out: sum_i P_i (B, K) acc; column-sum partials (n_bp, K) acc
    sm_ptr, ssum_ptr, sd_ptr,  # out (V*B, n_kt) acc: student tile max, sum e^(x-m), <Q, x>
    B, K, V, G, stride_s, stride_t, n_kt_t, n_kt, rows_per_prog,
    NKT_T: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (batch rows pid_b*R .. +R, column tile pid_k), R = rows_per_prog in sub-blocks
    # of BLOCK_B. For each sub-block: P_i = exp(z_i - LSE_i) of every teacher view i, summed
    # to psum (written once, for the backward) and kept in registers while all V student
    # views of these rows take their tile partials with Q_v = psum - [v < G] P_v (P_v
    # recomputed from the teacher tile, which is in L1/L2 by then). So the teacher probs and
    # the student sweep share one read of psum and T, and the center's column sums are
    # reduced over R rows before their single write (partials: cdiv(B, R) x K).
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_ty = psum_ptr.dtype.element_ty
    inv_ts = tl.load(par_ptr)
    inv_tt = tl.load(par_ptr + 1)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = k_offs < K
    c = tl.load(c_ptr + k_offs, mask=mk, other=0.0)
    csum = tl.zeros([BLOCK_K], acc_ty)
    for r0 in range(0, rows_per_prog, BLOCK_B):
        b_offs = pid_b * rows_per_prog + r0 + tl.arange(0, BLOCK_B)
        mb = b_offs < B
        mask = mb[:, None] & mk[None, :]
        psum = tl.zeros([BLOCK_B, BLOCK_K], acc_ty)
        for i in range(G):
            trows = (i * B + b_offs).to(tl.int64)
            mx, big_l, w, idx, msk = _merge_lse(tm_ptr, tsum_ptr, trows, mb, n_kt_t, NKT_T)
            log_l = tl.log(big_l)
            lse = mx + log_l
            if pid_k == 0:  # entropy and LSE of each teacher row, written once
                # (a branch, not a masked store: computed in every program, this spilled 8
                # bytes on sm_90 under triton 3.6)
                a = tl.load(ta_ptr + idx, mask=msk, other=0.0)
                m_j = tl.load(tm_ptr + idx, mask=msk, other=0.0)
                l_j = tl.load(tsum_ptr + idx, mask=msk, other=0.0)
                big_a = tl.sum(tl.where(msk, w * (a + (m_j - mx[:, None]) * l_j), 0.0), axis=1)
                tl.store(lse_t_ptr + trows, lse, mask=mb)
                tl.store(ent_ptr + trows, log_l - big_a / big_l, mask=mb)
            t = tl.load(t_ptr + trows[:, None] * stride_t + k_offs[None, :], mask=mask,
                        other=0.0).to(acc_ty)
            p = tl.exp((t - c[None, :]) * inv_tt - lse[:, None])
            psum += tl.where(mask, p, 0.0)
            csum += tl.sum(t, axis=0)  # masked lanes loaded as 0
        out = b_offs.to(tl.int64)[:, None] * K + k_offs[None, :]
        tl.store(psum_ptr + out, psum, mask=mask)
        for v in range(V):
            srows = (v * B + b_offs).to(tl.int64)  # = the teacher row of v when v < G
            x = tl.load(s_ptr + srows[:, None] * stride_s + k_offs[None, :], mask=mask,
                        other=0.0).to(acc_ty) * inv_ts
            q = psum
            if v < G:  # a global view is not paired with its own teacher view
                gm, gl, _w, _i, _m = _merge_lse(tm_ptr, tsum_ptr, srows, mb, n_kt_t, NKT_T)
                lse_v = gm + tl.log(gl)
                tv = tl.load(t_ptr + srows[:, None] * stride_t + k_offs[None, :], mask=mask,
                             other=0.0).to(acc_ty)
                pv = tl.exp((tv - c[None, :]) * inv_tt - lse_v[:, None])
                q = psum - tl.where(mask, pv, 0.0)
            xm = tl.where(mask, x, float("-inf"))
            m = tl.where(mb, tl.max(xm, axis=1), 0.0)
            part = srows * n_kt + pid_k
            tl.store(sm_ptr + part, m, mask=mb)
            tl.store(ssum_ptr + part, tl.sum(tl.exp(xm - m[:, None]), axis=1), mask=mb)
            tl.store(sd_ptr + part, tl.sum(q * x, axis=1), mask=mb)  # both 0 on masked lanes
    tl.store(colsum_ptr + pid_b.to(tl.int64) * K + k_offs, csum, mask=mk)


@triton.jit
def _dino_finish_kernel(
    sm_ptr, ssum_ptr, sd_ptr,  # student tile partials (V*B, n_kt) acc
    lse_ptr, loss_ptr,  # out (V*B,) acc: LSE of x per row (for backward); n_v LSE - <Q, x>
    B, V, G, n_kt,
    NKT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < V * B
    r64 = rows.to(tl.int64)
    mx, big_l, w, idx, msk = _merge_lse(sm_ptr, ssum_ptr, r64, mr, n_kt, NKT)
    lse = mx + tl.log(big_l)
    dot = tl.sum(tl.load(sd_ptr + idx, mask=msk, other=0.0), axis=1)
    n_v = tl.where(rows < G * B, G - 1, G).to(lse_ptr.dtype.element_ty)
    tl.store(lse_ptr + r64, lse, mask=mr)
    tl.store(loss_ptr + r64, n_v * lse - dot, mask=mr)


@triton.jit
def _dino_bwd_kernel(
    s_ptr, t_ptr, c_ptr, par_ptr, g_ptr,  # student, teacher, center, params, upstream (1,)
    psum_ptr, lse_t_ptr, lse_s_ptr,  # saved by the forward: sum_i P_i (B, K), row LSEs
    ds_ptr,  # out: dS (V*B, K) dt, contiguous
    B, K, V, G, stride_s, stride_t,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dS_v = (n_v softmax(x_v) - Q_v) * g / (tau_s B n_pairs), recomputed from S, T and psum.
    # The upstream g (GradScaler's 65536) multiplies in fp32 before the one rounding to dt:
    # entries ~1e-8 would be 0 in fp16 otherwise. psum is read once for all V views.
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_ty = psum_ptr.dtype.element_ty
    inv_ts = tl.load(par_ptr)
    inv_tt = tl.load(par_ptr + 1)
    gs = tl.load(g_ptr).to(acc_ty) * tl.load(par_ptr + 2)
    b_offs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mb = b_offs < B
    mk = k_offs < K
    mask = mb[:, None] & mk[None, :]
    c = tl.load(c_ptr + k_offs, mask=mk, other=0.0)
    psum = tl.load(psum_ptr + b_offs.to(tl.int64)[:, None] * K + k_offs[None, :], mask=mask,
                   other=0.0)
    for v in range(V):
        srows = (v * B + b_offs).to(tl.int64)
        x = tl.load(s_ptr + srows[:, None] * stride_s + k_offs[None, :], mask=mask,
                    other=0.0).to(acc_ty) * inv_ts
        lse = tl.load(lse_s_ptr + srows, mask=mb, other=0.0)
        q = psum
        if v < G:
            lse_v = tl.load(lse_t_ptr + srows, mask=mb, other=0.0)
            tv = tl.load(t_ptr + srows[:, None] * stride_t + k_offs[None, :], mask=mask,
                         other=0.0).to(acc_ty)
            # masked lanes: lse_v = 0 there, and e^(-c/tau_t) can overflow the cast below
            q = psum - tl.where(mask, tl.exp((tv - c[None, :]) * inv_tt - lse_v[:, None]), 0.0)
        n_v = tl.where(v < G, G - 1, G).to(acc_ty)
        ds = (n_v * tl.exp(x - lse[:, None]) - q) * gs
        tl.store(ds_ptr + srows[:, None] * K + k_offs[None, :], ds.to(ds_ptr.dtype.element_ty),
                 mask=mask)


# Launch configurations: the launchers pass exactly these (warps and stages included), and
# they are registered below for the production K = 65536 (the NKT constexprs follow K).
# Forward and backward tiles are [4, 512] at 8 warps (8 elements, one 16-byte bf16 load, per
# thread): sm_90 compiles the forward in 78 registers (occupancy 0.375) and the backward in
# 48 (0.625), no spills; at 4 warps they took 118 and 86 (0.25, 0.31). docs/kernels-dino.md.
STATS_BLOCK_K, STATS_WARPS, STATS_STAGES = 2048, 8, 1
FWD_BLOCK_B, FWD_BLOCK_K, FWD_WARPS, FWD_STAGES = 4, 512, 8, 2
FWD_PROGRAMS, FWD_MAX_ITERS = 2048, 8  # rows per program grow with B (fewer colsum partials)
FINISH_ELEMS, FINISH_WARPS, FINISH_STAGES = 2048, 4, 1
BWD_BLOCK_B, BWD_BLOCK_K, BWD_WARPS, BWD_STAGES = 4, 512, 8, 2
PRODUCTION_K = 65536
# head widths the methods launch (iBOT's 8192, DINO/DINOv2's 65536, DINOv2 ViT-g's 131072):
# the forward's NKT_T and the finish's NKT follow K, so each is registered
HEAD_WIDTHS = (8192, PRODUCTION_K, 131072)
DTYPES = ("bf16", "fp16", "fp32")


def _stats_block_k(k):
    return min(STATS_BLOCK_K, next_power_of_2(k))


def _fwd_block_k(k):
    return min(FWD_BLOCK_K, next_power_of_2(k))


def _bwd_block_k(k):
    return min(BWD_BLOCK_K, next_power_of_2(k))


def _finish_tile(n_kt):
    """(NKT, BLOCK_R): the partial table's width padded, and rows per program so that one
    program holds ~FINISH_ELEMS partials (16 registers a thread at 4 warps)."""
    nkt = next_power_of_2(n_kt)
    return nkt, max(1, FINISH_ELEMS // nkt)


def _register():
    k = PRODUCTION_K
    other_k = [kk for kk in HEAD_WIDTHS if kk != k]  # NKT_T and NKT follow K
    sbk, fbk, bbk = _stats_block_k(k), _fwd_block_k(k), _bwd_block_k(k)
    nkt_t = next_power_of_2(cdiv(k, sbk))
    nkt, block_r = _finish_tile(cdiv(k, fbk))

    def cfgs(label, constexprs, warps, stages, dts=DTYPES):
        return [KernelConfig(f"{dt} {label}", constexprs, types={"dt": dt}, num_warps=warps,
                             num_stages=stages, default=dt == "bf16") for dt in dts]

    register_kernel(
        _dino_teacher_stats_kernel,
        signature={"t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32", "m_ptr": "*fp32",
                   "l_ptr": "*fp32", "a_ptr": "*fp32", "K": "i32", "stride_t": "i32",
                   "n_kt": "i32", "BLOCK_K": "constexpr"},
        configs=cfgs(f"BLOCK_K={sbk}", {"BLOCK_K": sbk}, STATS_WARPS, STATS_STAGES))
    register_kernel(
        _dino_fwd_kernel,
        signature={"s_ptr": "*{dt}", "t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32",
                   "tm_ptr": "*fp32", "tsum_ptr": "*fp32", "ta_ptr": "*fp32",
                   "lse_t_ptr": "*fp32", "ent_ptr": "*fp32", "psum_ptr": "*fp32",
                   "colsum_ptr": "*fp32", "sm_ptr": "*fp32", "ssum_ptr": "*fp32",
                   "sd_ptr": "*fp32", "B": "i32", "K": "i32", "V": "i32", "G": "i32",
                   "stride_s": "i32", "stride_t": "i32", "n_kt_t": "i32", "n_kt": "i32",
                   "rows_per_prog": "i32", "NKT_T": "constexpr", "BLOCK_B": "constexpr",
                   "BLOCK_K": "constexpr"},
        configs=cfgs(f"{FWD_BLOCK_B}x{fbk}",
                     {"NKT_T": nkt_t, "BLOCK_B": FWD_BLOCK_B, "BLOCK_K": fbk},
                     FWD_WARPS, FWD_STAGES)
        + [KernelConfig(f"{dt} {FWD_BLOCK_B}x{fbk} K={kk}",
                        {"NKT_T": next_power_of_2(cdiv(kk, sbk)), "BLOCK_B": FWD_BLOCK_B,
                         "BLOCK_K": fbk}, types={"dt": dt}, num_warps=FWD_WARPS,
                        num_stages=FWD_STAGES) for kk in other_k for dt in DTYPES])
    register_kernel(  # dtype-free: one config
        _dino_finish_kernel,
        signature={"sm_ptr": "*fp32", "ssum_ptr": "*fp32", "sd_ptr": "*fp32",
                   "lse_ptr": "*fp32", "loss_ptr": "*fp32", "B": "i32", "V": "i32",
                   "G": "i32", "n_kt": "i32", "NKT": "constexpr", "BLOCK_R": "constexpr"},
        configs=[KernelConfig(f"fp32 {block_r}x{nkt}", {"NKT": nkt, "BLOCK_R": block_r},
                              num_warps=FINISH_WARPS, num_stages=FINISH_STAGES,
                              default=True)]
        + [KernelConfig(f"fp32 {br}x{nk} K={kk}", {"NKT": nk, "BLOCK_R": br},
                        num_warps=FINISH_WARPS, num_stages=FINISH_STAGES)
           for kk in other_k for nk, br in [_finish_tile(cdiv(kk, fbk))]])
    register_kernel(
        _dino_bwd_kernel,
        signature={"s_ptr": "*{dt}", "t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32",
                   "g_ptr": "*fp32", "psum_ptr": "*fp32", "lse_t_ptr": "*fp32",
                   "lse_s_ptr": "*fp32", "ds_ptr": "*{dt}", "B": "i32", "K": "i32",
                   "V": "i32", "G": "i32", "stride_s": "i32", "stride_t": "i32",
                   "BLOCK_B": "constexpr", "BLOCK_K": "constexpr"},
        configs=cfgs(f"{BWD_BLOCK_B}x{bbk}", {"BLOCK_B": BWD_BLOCK_B, "BLOCK_K": bbk},
                     BWD_WARPS, BWD_STAGES))


_register()


# ----------------------------------------------------------------------------- launchers
def _unit_cols(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _params(student_temp, teacher_temp, n, acc, dev):
    """[1/tau_s, 1/tau_t, 1/(tau_s n)] as a device tensor. A float fills on the device (a
    kernel argument); a device-tensor temperature is divided there. Neither reads the device."""
    par = torch.empty(3, dtype=acc, device=dev)
    for i, (tau, mult) in enumerate(((student_temp, 1), (teacher_temp, 1), (student_temp, n))):
        if isinstance(tau, torch.Tensor):
            torch.reciprocal(tau.to(acc) * mult, out=par[i])
        else:
            par[i] = 1.0 / (tau * mult)
    return par


def dino_loss_fwd_triton(student_out, teacher_out, center, student_temp, teacher_temp,
                         n_global, *, stats_block_k=None, block_k=None, iters=None):
    """Launch the forward kernels. Returns (loss, entropy, colsum, saved): `saved` is what the
    backward kernel re-reads, (s, t, c, params, psum, lse_t, lse_s).

    stats_block_k / block_k / iters override the column tiles and the batch sub-blocks per
    program (tests use them to exercise the partial merges and the batch loop).
    """
    s, t = _unit_cols(student_out), _unit_cols(teacher_out)
    (vb, k), gb = s.shape, t.shape[0]
    b = gb // n_global
    v = vb // b
    acc = compute_dtype(s.dtype)
    dev = s.device
    n_pairs = n_global * (v - 1)
    # a copy: the backward re-reads it after DINOLoss has updated its center in place
    c = center.detach().reshape(k).to(acc, copy=True)
    par = _params(student_temp, teacher_temp, b * n_pairs, acc, dev)

    sbk = stats_block_k or _stats_block_k(k)
    n_kt_t = cdiv(k, sbk)
    tm, tsum, ta = (torch.empty(gb, n_kt_t, dtype=acc, device=dev) for _ in range(3))
    fbk = block_k or _fwd_block_k(k)
    n_kt = cdiv(k, fbk)
    n_bb = cdiv(b, FWD_BLOCK_B)
    if iters is None:
        iters = max(1, min(FWD_MAX_ITERS, n_bb * n_kt // FWD_PROGRAMS, n_bb))
    rows_per_prog = FWD_BLOCK_B * iters
    n_bp = cdiv(b, rows_per_prog)
    lse_t, ent = (torch.empty(gb, dtype=acc, device=dev) for _ in range(2))
    psum = torch.empty(b, k, dtype=acc, device=dev)
    col_part = torch.empty(n_bp, k, dtype=acc, device=dev)
    sm, ssum, sd = (torch.empty(vb, n_kt, dtype=acc, device=dev) for _ in range(3))
    lse_s, loss_rows = (torch.empty(vb, dtype=acc, device=dev) for _ in range(2))
    nkt, block_r = _finish_tile(n_kt)
    with device_guard(s):
        _dino_teacher_stats_kernel[(gb, n_kt_t)](
            t, c, par, tm, tsum, ta, k, t.stride(0), n_kt_t,
            BLOCK_K=sbk, num_warps=STATS_WARPS, num_stages=STATS_STAGES)
        _dino_fwd_kernel[(n_bp, n_kt)](
            s, t, c, par, tm, tsum, ta, lse_t, ent, psum, col_part, sm, ssum, sd,
            b, k, v, n_global, s.stride(0), t.stride(0), n_kt_t, n_kt, rows_per_prog,
            NKT_T=next_power_of_2(n_kt_t), BLOCK_B=FWD_BLOCK_B, BLOCK_K=fbk,
            num_warps=FWD_WARPS, num_stages=FWD_STAGES)
        _dino_finish_kernel[(cdiv(vb, block_r),)](
            sm, ssum, sd, lse_s, loss_rows, b, v, n_global, n_kt,
            NKT=nkt, BLOCK_R=block_r, num_warps=FINISH_WARPS, num_stages=FINISH_STAGES)
    loss = loss_rows.sum() / (b * n_pairs)
    saved = (s, t, c, par, psum, lse_t, lse_s)
    return loss, ent.mean(), col_part.sum(0), saved


def dino_loss_bwd_triton(saved, grad_loss):
    """dS from what the forward saved, times the upstream gradient (a device tensor, never
    read on the host)."""
    s, t, c, par, psum, lse_t, lse_s = saved
    (vb, k), b = s.shape, psum.shape[0]
    g = grad_loss.detach().reshape(1).to(par.dtype)
    ds = torch.empty(vb, k, dtype=s.dtype, device=s.device)
    bbk = _bwd_block_k(k)
    with device_guard(s):
        _dino_bwd_kernel[(cdiv(b, BWD_BLOCK_B), cdiv(k, bbk))](
            s, t, c, par, g, psum, lse_t, lse_s, ds,
            b, k, vb // b, t.shape[0] // b, s.stride(0), t.stride(0),
            BLOCK_B=BWD_BLOCK_B, BLOCK_K=bbk, num_warps=BWD_WARPS, num_stages=BWD_STAGES)
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


def _add_scaled(out, x, y, alpha):
    """out <- x + alpha * y; alpha a float (one fused op) or a 0-d device tensor (a
    temperature given as a tensor: never read on the host)."""
    if isinstance(alpha, torch.Tensor):
        return torch.addcmul(x, y, alpha, out=out)
    return torch.add(x, y, alpha=alpha, out=out)


def _grad_buffer_dtype(dtype):
    """dS buffer dtype of the portable path: fp32 for fp16 inputs. The forward cannot know
    the upstream gradient, and (n_v p - Q) / (tau_s B n_pairs) is ~1e-8 at K = 65536, under
    fp16's smallest subnormal (6e-8): rounded to fp16 before GradScaler's 65536 arrives, 99.98%
    of the entries were 0. bf16 has fp32's exponent range and keeps a bf16 buffer."""
    return torch.float32 if dtype == torch.float16 else dtype


def _teacher_probs_(out, t_rows, c, inv_tt, floor):
    """out <- softmax((t_rows - c) / tau_t), computed in out's dtype (fp32 before 1/tau)."""
    z = torch.sub(t_rows, c, out=out).mul_(inv_tt)
    z.clamp_(min=z.amax(-1, keepdim=True) + floor)
    return _softmax_(z)


def dino_loss_fwd_torch(student_out, teacher_out, center, student_temp, teacher_temp,
                        n_global, need_grad, *, block_b=TORCH_BLOCK_B,
                        teacher_rows=TORCH_TEACHER_ROWS):
    """Chunked torch forward. Returns (loss, entropy, colsum, dS or None).

    Peak extra memory: dS (student size, the output; fp32 for fp16 inputs) + sum_i P_i
    (B, K) in fp32 + one (block_b, K) block for a global view's own P_v (+ one for bf16 or
    no-grad calls). Each (batch block, view) of S is scaled, soft-maxed and turned into the
    gradient inside its own dS rows: ~7 large ops. The temperatures are floats or 0-d tensors
    on the inputs' device.
    """
    s, t = _unit_cols(student_out), _unit_cols(teacher_out)
    (vb, k), gb = s.shape, t.shape[0]
    b = gb // n_global
    v = vb // b
    acc = compute_dtype(s.dtype)
    dev = s.device
    n_pairs = n_global * (v - 1)
    inv_ts, inv_tt = (1.0 / (x.to(acc) if isinstance(x, torch.Tensor) else x)
                      for x in (student_temp, teacher_temp))
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
    ds = (torch.empty(vb, k, dtype=_grad_buffer_dtype(s.dtype), device=dev)
          if need_grad else None)
    direct = need_grad and ds.dtype == acc  # the block is computed in its own dS rows
    nb_max = min(block_b, b)
    pbuf = torch.empty(nb_max, k, dtype=acc, device=dev)  # P_v of a global view
    dbuf = None if direct else torch.empty_like(pbuf)
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
            d = ds[rows] if direct else dbuf[:n]
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
                _add_scaled(d, q, d, n_v * scale)  # (n_v p - sum_i P_i) * scale
                if view < n_global:
                    _add_scaled(d, d, pv, scale)
                if not direct:
                    ds[rows].copy_(d)
    # LSE = max - log p_max: p at the argmax is >= 1/K, so its log is accurate
    n_v_rows = torch.full((v, b), float(n_global), dtype=acc, device=dev)
    n_v_rows[:n_global] -= 1
    lse_sum = torch.dot(n_v_rows.view(-1), row_max - row_pmax.log())
    loss = (lse_sum - cross) / (b * n_pairs)
    return loss, ent / gb, colsum, ds


# ----------------------------------------------------------------------------- custom ops
# (`_custom_op.py` has the conventions.) The forward op returns (loss, H, colsum) and what
# backward needs: Triton's saved tensors (c, params, psum, lse_t, lse_s; S and T are inputs),
# or the portable path's dS. Backward: Triton recomputes dS from them (so retain_graph may
# run it twice); the portable path scales the dS its forward wrote. Either way the upstream
# gradient meets dS in fp32 before dS is rounded to fp16. H and colsum are non-differentiable.
def _fwd_fake(student_out, teacher_out, center, ts_tensor, ts, tt_tensor, tt, n_global,
              backend, need_grad):
    acc = compute_dtype(student_out.dtype)
    (vb, k), gb = student_out.shape, teacher_out.shape[0]
    empty = functools.partial(student_out.new_empty, dtype=acc)
    if backend == "triton":
        saved = (empty(k), empty(3), empty((gb // n_global, k)), empty(gb), empty(vb))
        ds = student_out.new_empty(0)
    else:
        saved = tuple(empty(0) for _ in range(5))
        ds = student_out.new_empty((vb, k) if need_grad else 0,
                                   dtype=_grad_buffer_dtype(student_out.dtype))
    return (empty(()), empty(()), empty(k), *saved, ds)


@fused_op("dino_loss_fwd", fake=_fwd_fake)
def _dino_fwd_op(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor,
                 ts_tensor: torch.Tensor | None, ts: float, tt_tensor: torch.Tensor | None,
                 tt: float, n_global: int, backend: str, need_grad: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    dev = student_out.device
    ts_, tt_ = (join_temperature(tensor, value, name, dev) for tensor, value, name in
                ((ts_tensor, ts, "student_temp"), (tt_tensor, tt, "teacher_temp")))
    args = (student_out, teacher_out, center, ts_, tt_, n_global)
    acc = compute_dtype(student_out.dtype)
    if backend == "triton":
        loss, ent, colsum, saved = dino_loss_fwd_triton(*args)
        return loss, ent, colsum, *saved[2:], placeholder(student_out)
    loss, ent, colsum, ds = dino_loss_fwd_torch(*args, need_grad)
    empties = tuple(placeholder(student_out, acc) for _ in range(5))
    return loss, ent, colsum, *empties, placeholder(student_out) if ds is None else ds


@fused_op("dino_loss_bwd", fake=lambda s, t, c, par, psum, lse_t, lse_s, grad:
          torch.empty_like(s, memory_format=torch.contiguous_format))
def _dino_bwd_op(s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, par: torch.Tensor,
                 psum: torch.Tensor, lse_t: torch.Tensor, lse_s: torch.Tensor,
                 grad: torch.Tensor) -> torch.Tensor:
    """Triton's dS recompute (`dino_loss_bwd_triton`) as an op."""
    return dino_loss_bwd_triton((_unit_cols(s), _unit_cols(t), c, par, psum, lse_t, lse_s),
                                grad)


def _setup_context(ctx, inputs, output):
    student_out, teacher_out, _, _, _, _, _, _, backend, _ = inputs
    ctx.backend, ctx.dtype = backend, student_out.dtype
    if backend == "triton":
        ctx.save_for_backward(student_out, teacher_out, *output[3:8])
    else:
        save_grad_buffer(ctx, output[8])
    # only the loss is differentiable; without this autograd would zero-fill a gradient for
    # every other output (a (V*B, K) fill for dS: ~90 ms on CPU at B64 2+10 K65536)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 10
    if ctx.backend == "triton":
        ds = _dino_bwd_op(*ctx.saved_tensors, grad_loss)
    else:
        ds = scaled_grad_buffer(ctx, grad_loss, ctx.dtype)
    return ds, *([None] * 9)


_dino_fwd_op.register_autograd(_backward, setup_context=_setup_context)

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
    need_grad = torch.is_grad_enabled() and student_out.requires_grad  # else no dS pass
    # teacher and center get no gradient: detached, the op's autograd tracks the student only
    out = _dino_fwd_op(student_out, teacher_out.detach(), center.detach(),
                       *split_temperature(ts), *split_temperature(tt), n_global, backend,
                       need_grad)
    return out[:3]


def dino_loss(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04,
              n_global=2):
    """DINO's cross-entropy between centered, sharpened teacher and student distributions.

    Args:
        student_out: (V*B, K) logits of all V student views, view-major; gets the gradient.
        teacher_out: (n_global*B, K) logits of the global views; no gradient.
        center: (1, K) or (K,); same dtype as the logits, or fp32 with fp16/bf16 logits.
        student_temp, teacher_temp: tau_s, tau_t > 0: floats, or 1-element tensors (on the
            logits' device, or CPU), never read on the host when on an accelerator.
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
