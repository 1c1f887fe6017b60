"""Triton kernels and launchers of the iBOT patch loss (`ibot.py` has the math and the API).

Rows j = 0 .. R'-1 are the weighted rows: row idx[j] of S and T when indices are given (the
(B, N, K) layout with a host mask), else row j. A row with w_j = 0 (an unmasked token under a
device mask) loads nothing and gets dS = 0.

Forward, per (block of rows, column tile), one read of S and T: the teacher's tile partials
relative to the tile max m (l = sum e^(z-m), a = sum e^(z-m)(z-m), d = sum e^(z-m) x) and the
student's (max, sum e^(x-max)). Merged over tiles with M = max m_j, e_j = e^(m_j - M):
    L = sum e_j l_j,  LSE_t = M + log L,  H = log L - sum e_j (a_j + (m_j - M) l_j) / L,
    <P, x> = sum e_j d_j / L
so unlike DINO's (whose every teacher row meets V - 1 student rows, so P is formed once
and reused) no teacher-stats pass precedes the forward. In the probabilities mode (center
None) P = T and the partials are plain sums: sum P, sum P log P, <P, x>.
The teacher's column sums (the center update) are reduced over the rows of each program
before their one write: (programs along rows) x K partials.
"""

from __future__ import annotations

import torch

from ._registry import KernelConfig, register_kernel
from ._triton import tl, triton
from ._utils import cdiv, compute_dtype, device_guard, next_power_of_2
from .dino_loss import HEAD_WIDTHS, PRODUCTION_K, _merge_lse, _params  # _merge_lse: inlined


@triton.jit
def _ibot_fwd_kernel(
    s_ptr, t_ptr, c_ptr, par_ptr, w_ptr, idx_ptr,  # S, T (R, K) dt; center; params; w, idx (R',)
    tm_ptr, tl_ptr, ta_ptr, td_ptr, sm_ptr, sl_ptr,  # out (R', n_kt) acc: tile partials
    colsum_ptr,  # out (n_rp, K) acc: teacher column sums over each program's live rows
    R, K, stride_s, stride_t, n_kt, rows_per_prog,
    PROBS: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_ty = tm_ptr.dtype.element_ty
    inv_ts = tl.load(par_ptr)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = k_offs < K
    if not PROBS:
        inv_tt = tl.load(par_ptr + 1)
        c = tl.load(c_ptr + k_offs, mask=mk, other=0.0)
    csum = tl.zeros([BLOCK_K], acc_ty)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        j = pid_r * rows_per_prog + r0 + tl.arange(0, BLOCK_R)
        mj = j < R
        live = mj & (tl.load(w_ptr + j, mask=mj, other=0.0) != 0)
        if HAS_IDX:
            rows = tl.load(idx_ptr + j, mask=mj, other=0)
        else:
            rows = j.to(tl.int64)
        mask = live[:, None] & mk[None, :]
        t = tl.load(t_ptr + rows[:, None] * stride_t + k_offs[None, :], mask=mask,
                    other=0.0).to(acc_ty)
        csum += tl.sum(t, axis=0)  # masked lanes loaded as 0
        part = j.to(tl.int64) * n_kt + pid_k
        # the teacher's partials first, S loaded after: fewer tiles live at once (loaded
        # together, the fp32 variant spilled 8 bytes on sm_90)
        if PROBS:  # P = T: plain sums (tm unused)
            plogp = tl.where(t > 0, t * tl.log(tl.where(t > 0, t, 1.0)), 0.0)
            tl.store(tl_ptr + part, tl.sum(t, axis=1), mask=mj)
            tl.store(ta_ptr + part, tl.sum(plogp, axis=1), mask=mj)
            e = t
        else:
            z = tl.where(mask, (t - c[None, :]) * inv_tt, float("-inf"))
            m = tl.where(live, tl.max(z, axis=1), 0.0)
            zs = tl.where(mask, z - m[:, None], 0.0)
            e = tl.where(mask, tl.exp(zs), 0.0)
            tl.store(tm_ptr + part, m, mask=mj)
            tl.store(tl_ptr + part, tl.sum(e, axis=1), mask=mj)
            tl.store(ta_ptr + part, tl.sum(e * zs, axis=1), mask=mj)
        x = tl.load(s_ptr + rows[:, None] * stride_s + k_offs[None, :], mask=mask,
                    other=0.0).to(acc_ty) * inv_ts
        tl.store(td_ptr + part, tl.sum(e * x, axis=1), mask=mj)  # <P, x> unnormalised
        xm = tl.where(mask, x, float("-inf"))
        sm = tl.where(live, tl.max(xm, axis=1), 0.0)
        tl.store(sm_ptr + part, sm, mask=mj)
        tl.store(sl_ptr + part, tl.sum(tl.where(mask, tl.exp(xm - sm[:, None]), 0.0), axis=1),
                 mask=mj)
    tl.store(colsum_ptr + pid_r.to(tl.int64) * K + k_offs, csum, mask=mk)


@triton.jit
def _ibot_finish_kernel(
    w_ptr, tm_ptr, tl_ptr, ta_ptr, td_ptr, sm_ptr, sl_ptr,  # w (R',); partials (R', n_kt)
    lse_ptr, aux_ptr, ent_ptr, loss_ptr,  # out (R',) acc: student LSE; teacher LSE (or
    R, n_kt,  # row mass sum P); teacher entropy (0 on dead rows); w (mass LSE - <P, x>)
    PROBS: tl.constexpr, NKT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mj = j < R
    w = tl.load(w_ptr + j, mask=mj, other=0.0)
    live = mj & (w != 0)
    j64 = j.to(tl.int64)
    mx, big_l, ew, idx, msk = _merge_lse(sm_ptr, sl_ptr, j64, live, n_kt, NKT)
    lse = mx + tl.log(big_l)
    if PROBS:
        mass = tl.sum(tl.load(tl_ptr + idx, mask=msk, other=0.0), axis=1)
        ent = -tl.sum(tl.load(ta_ptr + idx, mask=msk, other=0.0), axis=1)
        cross = tl.sum(tl.load(td_ptr + idx, mask=msk, other=0.0), axis=1)
        aux = mass
    else:
        tmx, tbig, tw, _i, _m = _merge_lse(tm_ptr, tl_ptr, j64, live, n_kt, NKT)
        m_j = tl.load(tm_ptr + idx, mask=msk, other=0.0)
        l_j = tl.load(tl_ptr + idx, mask=msk, other=0.0)
        a_j = tl.load(ta_ptr + idx, mask=msk, other=0.0)
        d_j = tl.load(td_ptr + idx, mask=msk, other=0.0)
        big_a = tl.sum(tl.where(msk, tw * (a_j + (m_j - tmx[:, None]) * l_j), 0.0), axis=1)
        cross = tl.sum(tl.where(msk, tw * d_j, 0.0), axis=1) / tbig
        log_l = tl.log(tbig)
        ent = log_l - big_a / tbig
        aux = tmx + log_l
        mass = 1.0
    tl.store(lse_ptr + j64, lse, mask=mj)
    tl.store(aux_ptr + j64, aux, mask=mj)
    tl.store(ent_ptr + j64, tl.where(live, ent, 0.0), mask=mj)
    tl.store(loss_ptr + j64, tl.where(live, w * (mass * lse - cross), 0.0), mask=mj)


@triton.jit
def _ibot_bwd_kernel(
    s_ptr, t_ptr, c_ptr, par_ptr, g_ptr, w_ptr, idx_ptr,  # inputs; upstream gradient (1,)
    lse_ptr, aux_ptr,  # saved (R',) acc: student LSE; teacher LSE (or row mass sum P)
    ds_ptr,  # out: dS (R, K) dt, contiguous (zeroed beforehand when HAS_IDX)
    R, K, stride_s, stride_t,
    PROBS: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dS_j = w_j g / tau_s (mass_j softmax(x_j) - P_j), in fp32 until its one rounding to dt:
    # entries ~1e-9 at K = 65536 survive fp16 only once GradScaler's 65536 has met them.
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_ty = lse_ptr.dtype.element_ty
    inv_ts = tl.load(par_ptr)
    gs = tl.load(g_ptr).to(acc_ty) * inv_ts
    j = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mj = j < R
    mk = k_offs < K
    w = tl.load(w_ptr + j, mask=mj, other=0.0)
    live = mj & (w != 0)
    if HAS_IDX:
        rows = tl.load(idx_ptr + j, mask=mj, other=0)
    else:
        rows = j.to(tl.int64)
    mask = live[:, None] & mk[None, :]
    x = tl.load(s_ptr + rows[:, None] * stride_s + k_offs[None, :], mask=mask,
                other=0.0).to(acc_ty) * inv_ts
    t = tl.load(t_ptr + rows[:, None] * stride_t + k_offs[None, :], mask=mask,
                other=0.0).to(acc_ty)
    lse = tl.load(lse_ptr + j, mask=mj, other=0.0)
    aux = tl.load(aux_ptr + j, mask=mj, other=0.0)
    if PROBS:
        p = t
        mass = aux[:, None]
    else:
        inv_tt = tl.load(par_ptr + 1)
        c = tl.load(c_ptr + k_offs, mask=mk, other=0.0)
        p = tl.exp((t - c[None, :]) * inv_tt - aux[:, None])
        mass = 1.0
    ds = (mass * tl.exp(x - lse[:, None]) - p) * (w * gs)[:, None]
    # dead rows and masked lanes: 0 (e^(-c/tau_t) there may overflow, inf * 0 = NaN)
    ds = tl.where(mask, ds, 0.0)
    tl.store(ds_ptr + rows[:, None] * K + k_offs[None, :], ds.to(ds_ptr.dtype.element_ty),
             mask=mj[:, None] & mk[None, :])


# Launch configurations (the launchers pass exactly these). Tiles are DINO's [4, 512] at 8
# warps: 8 elements (one 16-byte bf16 load) per thread per tensor. Rows per forward program
# grow until ~FWD_PROGRAMS programs remain, so the column-sum partials stay small (at
# M = 8192, K = 65536: 64 rows a program, 128 x 128 programs, 32 MiB of partials).
FWD_BLOCK_R, FWD_BLOCK_K, FWD_WARPS, FWD_STAGES = 4, 512, 8, 2
FWD_PROGRAMS, FWD_MAX_ITERS = 16384, 16
FINISH_ELEMS, FINISH_WARPS, FINISH_STAGES = 512, 4, 1
BWD_BLOCK_R, BWD_BLOCK_K, BWD_WARPS, BWD_STAGES = 4, 512, 8, 2
DTYPES = ("bf16", "fp16", "fp32")
# the patch-head widths (dino_loss.HEAD_WIDTHS) only change the finish kernel's NKT: forward
# and backward constexprs are the same for every K >= 512


def _block_k(k, cap):
    return min(cap, next_power_of_2(k))


def _finish_tile(n_kt):
    """(NKT, BLOCK_R): the partial table's width padded, and rows per program: ~512
    partials of each of the six tables a program (dino_loss's 2048 of three took 254
    registers and spilled 72 bytes on sm_90 here; the finish is < 1% of the traffic)."""
    nkt = next_power_of_2(n_kt)
    return nkt, max(1, FINISH_ELEMS // nkt)


def _register():
    """The methods (ssl/ibot.py, ssl/dinov2.py) launch the gathered (M, K) layout with
    centering or Sinkhorn probabilities; the (B, N, K) layout of iBOT's own code with a host
    mask adds the indexed variants. All three dtypes for every mode; bf16 (AMP) gathered is
    the default."""
    k = PRODUCTION_K
    fbk, bbk = _block_k(k, FWD_BLOCK_K), _block_k(k, BWD_BLOCK_K)
    modes = [(probs, has_idx) for probs in (False, True) for has_idx in (False, True)]

    def label(dt, probs, has_idx, tile):
        return (f"{dt} {tile} {'probs' if probs else 'center'}"
                f"{' idx' if has_idx else ''}")

    ptr_sig = {"s_ptr": "*{dt}", "t_ptr": "*{dt}", "c_ptr": "*fp32", "par_ptr": "*fp32"}
    register_kernel(
        _ibot_fwd_kernel,
        signature={**ptr_sig, "w_ptr": "*fp32", "idx_ptr": "*i64", "tm_ptr": "*fp32",
                   "tl_ptr": "*fp32", "ta_ptr": "*fp32", "td_ptr": "*fp32", "sm_ptr": "*fp32",
                   "sl_ptr": "*fp32", "colsum_ptr": "*fp32", "R": "i32", "K": "i32",
                   "stride_s": "i32", "stride_t": "i32", "n_kt": "i32",
                   "rows_per_prog": "i32", "PROBS": "constexpr", "HAS_IDX": "constexpr",
                   "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
        configs=[KernelConfig(label(dt, p, i, f"{FWD_BLOCK_R}x{fbk}"),
                              {"PROBS": p, "HAS_IDX": i, "BLOCK_R": FWD_BLOCK_R,
                               "BLOCK_K": fbk}, types={"dt": dt}, num_warps=FWD_WARPS,
                              num_stages=FWD_STAGES, default=dt == "bf16" and not i)
                 for dt in DTYPES for p, i in modes])
    register_kernel(  # dtype-free; its NKT follows K: one config per head width in use
        _ibot_finish_kernel,
        signature={"w_ptr": "*fp32", "tm_ptr": "*fp32", "tl_ptr": "*fp32", "ta_ptr": "*fp32",
                   "td_ptr": "*fp32", "sm_ptr": "*fp32", "sl_ptr": "*fp32", "lse_ptr": "*fp32",
                   "aux_ptr": "*fp32", "ent_ptr": "*fp32", "loss_ptr": "*fp32", "R": "i32",
                   "n_kt": "i32", "PROBS": "constexpr", "NKT": "constexpr",
                   "BLOCK_R": "constexpr"},
        configs=[KernelConfig(f"fp32 {br}x{nk} {'probs' if p else 'center'} K={kk}",
                              {"PROBS": p, "NKT": nk, "BLOCK_R": br},
                              num_warps=FINISH_WARPS, num_stages=FINISH_STAGES,
                              default=kk == k)
                 for kk in HEAD_WIDTHS for nk, br in [_finish_tile(cdiv(kk, fbk))]
                 for p in (False, True)])
    register_kernel(
        _ibot_bwd_kernel,
        signature={**ptr_sig, "g_ptr": "*fp32", "w_ptr": "*fp32", "idx_ptr": "*i64",
                   "lse_ptr": "*fp32", "aux_ptr": "*fp32", "ds_ptr": "*{dt}", "R": "i32",
                   "K": "i32", "stride_s": "i32", "stride_t": "i32", "PROBS": "constexpr",
                   "HAS_IDX": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
        configs=[KernelConfig(label(dt, p, i, f"{BWD_BLOCK_R}x{bbk}"),
                              {"PROBS": p, "HAS_IDX": i, "BLOCK_R": BWD_BLOCK_R,
                               "BLOCK_K": bbk}, types={"dt": dt}, num_warps=BWD_WARPS,
                              num_stages=BWD_STAGES, default=dt == "bf16" and not i)
                 for dt in DTYPES for p, i in modes])


_register()


# ----------------------------------------------------------------------------- launchers
def _no_idx(dev):
    """The idx argument of a launch without indices: an int64 pointer, never read (the
    registered signature is *i64 either way)."""
    return torch.empty(1, dtype=torch.int64, device=dev)


def ibot_fwd_triton(s, t, center, w, idx, student_temp, teacher_temp, *, block_k=None,
                    iters=None):
    """Launch the forward. s, t: (R, K) with unit column stride; w (R',) acc; idx (R',) int64
    or None. Returns (loss, entropy, colsum, saved = (c, params, lse_s, aux)).

    block_k / iters override the column tile and the row sub-blocks per program (tests use
    them to exercise the partial merges and the row loop)."""
    r, k = s.shape
    acc = compute_dtype(s.dtype)
    dev = s.device
    n_rows = w.shape[0]
    probs = center is None
    # a copy: the backward re-reads it after iBOTPatchLoss has updated its center in place
    c = (torch.zeros(1, dtype=acc, device=dev) if probs
         else center.detach().reshape(k).to(acc, copy=True))
    par = _params(student_temp, 1.0 if probs else teacher_temp, 1, acc, dev)
    w = w.to(acc)
    fbk = block_k or _block_k(k, FWD_BLOCK_K)
    n_kt = cdiv(k, fbk)
    n_rb = cdiv(max(n_rows, 1), FWD_BLOCK_R)
    if iters is None:
        iters = max(1, min(FWD_MAX_ITERS, n_rb * n_kt // FWD_PROGRAMS, n_rb))
    rows_per_prog = FWD_BLOCK_R * iters
    n_rp = cdiv(max(n_rows, 1), rows_per_prog)
    parts = [torch.empty(max(n_rows, 1), n_kt, dtype=acc, device=dev) for _ in range(6)]
    col_part = torch.empty(n_rp, k, dtype=acc, device=dev)
    out = [torch.empty(max(n_rows, 1), dtype=acc, device=dev) for _ in range(4)]
    lse, aux, ent, loss_rows = out
    nkt, block_r = _finish_tile(n_kt)
    idx_arg = _no_idx(dev) if idx is None else idx  # unread when HAS_IDX is False
    with device_guard(s):
        _ibot_fwd_kernel[(n_rp, n_kt)](
            s, t, c, par, w, idx_arg, *parts, col_part, n_rows, k, s.stride(0), t.stride(0),
            n_kt, rows_per_prog, PROBS=probs, HAS_IDX=idx is not None, BLOCK_R=FWD_BLOCK_R,
            BLOCK_K=fbk, num_warps=FWD_WARPS, num_stages=FWD_STAGES)
        _ibot_finish_kernel[(cdiv(max(n_rows, 1), block_r),)](
            w, *parts, lse, aux, ent, loss_rows, n_rows, n_kt, PROBS=probs, NKT=nkt,
            BLOCK_R=block_r, num_warps=FINISH_WARPS, num_stages=FINISH_STAGES)
    count = (w != 0).sum().clamp(min=1)
    n = n_rows  # the tables hold max(n_rows, 1) rows; a row past n_rows is never written
    return (loss_rows[:n].sum(), ent[:n].sum() / count, col_part.sum(0),
            (c, par, lse[:n], aux[:n]))


def ibot_bwd_triton(s, t, w, idx, c, par, lse, aux, probs, grad_loss):
    """dS (R, K) in s's dtype from what the forward saved, times the upstream gradient (a
    device tensor, never read on the host)."""
    r, k = s.shape
    n_rows = w.shape[0]
    g = grad_loss.detach().reshape(1).to(par.dtype)
    w = w.to(par.dtype)
    alloc = torch.empty if idx is None else torch.zeros  # unmasked rows: zeros
    ds = alloc(r, k, dtype=s.dtype, device=s.device)
    bbk = _block_k(k, BWD_BLOCK_K)
    if n_rows == 0:
        return ds
    with device_guard(s):
        _ibot_bwd_kernel[(cdiv(n_rows, BWD_BLOCK_R), cdiv(k, bbk))](
            s, t, c, par, g, w, _no_idx(s.device) if idx is None else idx, lse, aux, ds,
            n_rows, k,
            s.stride(0), t.stride(0), PROBS=probs, HAS_IDX=idx is not None,
            BLOCK_R=BWD_BLOCK_R, BLOCK_K=bbk, num_warps=BWD_WARPS, num_stages=BWD_STAGES)
    return ds
