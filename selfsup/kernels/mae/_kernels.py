"""MAE Triton kernels and their registered configurations."""

from __future__ import annotations

from .._registry import KernelConfig, register_kernel
from .._triton import tl, triton
from .._utils import next_power_of_2


# ============================================================================ Triton kernels
# Shared conventions: program (b, row block); whole D-rows move in BLOCK_D column chunks; row
# offsets are int64 (row × stride overflows int32 at ViT-H batch sizes); the accumulation dtype
# is fp64 when the output/accumulator pointer is fp64, else fp32 (bf16 math is upcast).
@triton.jit
def _gather_tokens_fwd_kernel(
    # pointers: x (B, L, D), ids (B, L_keep) int32|int64, pos (L, D) rows, out (B, L_keep, D)
    x_ptr, ids_ptr, pos_ptr, out_ptr,
    # shapes
    L_KEEP, D,
    # strides, in elements (pos and out rows are contiguous; x may be transposed)
    stride_xb, stride_xl, stride_xd, stride_ib, stride_pl, stride_ob, stride_ol,
    # meta
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[b, j, :] = x[b, k, :] + pos[k, :],  k = ids[b, j]
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < L_KEEP
    k = tl.load(ids_ptr + b * stride_ib + rows, mask=rmask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + b * stride_xb + k[:, None] * stride_xl
    p_rows = pos_ptr + k[:, None] * stride_pl
    o_rows = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_ol
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        v = tl.load(x_rows + c[None, :] * stride_xd, mask=m, other=0).to(ACC)
        if HAS_POS:
            v += tl.load(p_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(o_rows + c[None, :], v, mask=m)  # cast to out's dtype on store


_TOKEN_CONSTS = {"BLOCK_R": 4, "BLOCK_D": 512}
register_kernel(
    _gather_tokens_fwd_kernel,
    signature={"x_ptr": "*{xt}", "ids_ptr": "*i64", "pos_ptr": "*{pt}", "out_ptr": "*{ot}",
               "L_KEEP": "i32", "D": "i32", "stride_xb": "i32", "stride_xl": "i32",
               "stride_xd": "i32", "stride_ib": "i32", "stride_pl": "i32", "stride_ob": "i32",
               "stride_ol": "i32", "HAS_POS": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_D": "constexpr"},
    configs=[
        KernelConfig("fp32 R4 D512", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "fp32", "pt": "fp32", "ot": "fp32"}, num_warps=4,
                     default=True),
        KernelConfig("amp bf16 x + fp32 pos", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "bf16", "pt": "fp32", "ot": "fp32"}, num_warps=4),
    ],
)


@triton.jit
def _gather_tokens_bwd_kernel(
    # pointers: g (B, L_keep, D), ids (B, L_keep), dx (B, L, D) zero-filled, dpos (L, D) acc
    g_ptr, ids_ptr, dx_ptr, dpos_ptr,
    # shapes
    L_KEEP, D,
    # strides (g rows contiguous; dx and dpos are ours, contiguous)
    stride_gb, stride_gl, stride_ib, stride_dxb, stride_dxl, stride_dpl,
    # meta
    POS_ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx[b, k, :] = g[b, j, :] (rows of ids_keep are distinct: plain stores); dropped rows keep
    # the launcher's zeros.  dpos[k, :] += g[b, j, :] with fp32 atomics (<= B adds per row).
    ACC: tl.constexpr = tl.float64 if dpos_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < L_KEEP
    k = tl.load(ids_ptr + b * stride_ib + rows, mask=rmask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    g_rows = g_ptr + b * stride_gb + rows[:, None].to(tl.int64) * stride_gl
    dx_rows = dx_ptr + b * stride_dxb + k[:, None] * stride_dxl
    dp_rows = dpos_ptr + k[:, None] * stride_dpl
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        g = tl.load(g_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(dx_rows + c[None, :], g, mask=m)
        if POS_ATOMIC:
            tl.atomic_add(dp_rows + c[None, :], g, mask=m)


register_kernel(
    _gather_tokens_bwd_kernel,
    signature={"g_ptr": "*{gt}", "ids_ptr": "*i64", "dx_ptr": "*{xt}", "dpos_ptr": "*fp32",
               "L_KEEP": "i32", "D": "i32", "stride_gb": "i32", "stride_gl": "i32",
               "stride_ib": "i32", "stride_dxb": "i32", "stride_dxl": "i32",
               "stride_dpl": "i32", "POS_ATOMIC": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_D": "constexpr"},
    configs=[KernelConfig("fp32 R4 D512 atomics", {"POS_ATOMIC": True, **_TOKEN_CONSTS},
                          types={"gt": "fp32", "xt": "fp32"}, num_warps=4, default=True)],
)


@triton.jit
def _scatter_tokens_fwd_kernel(
    # pointers: x_vis (B, S, D), ids_restore (B, L), mask_token (D,), pos (T, D), out (B, T, D)
    x_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr,
    # shapes: T = N_PREFIX + L output rows, L_KEEP = S − N_PREFIX visible rows
    T, L_KEEP, N_PREFIX, D,
    # strides (all rows contiguous)
    stride_xb, stride_xl, stride_ib, stride_pl, stride_ob, stride_ol,
    # meta
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # row r < N_PREFIX copies x_vis[b, r]; row N_PREFIX + l reads k = ids_restore[b, l]:
    # x_vis[b, N_PREFIX + k] if k < L_KEEP, else the mask token; then + pos[r].
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < T
    body = rows >= N_PREFIX
    k = tl.load(ids_ptr + b * stride_ib + (rows - N_PREFIX), mask=rmask & body, other=0)
    k = k.to(tl.int64)
    vis = rmask & ((~body) | ((k >= 0) & (k < L_KEEP)))
    src = tl.where(body, N_PREFIX + k, rows.to(tl.int64))  # row of x_vis
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + b * stride_xb + src[:, None] * stride_xl
    p_rows = pos_ptr + rows[:, None].to(tl.int64) * stride_pl
    o_rows = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_ol
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        m = rmask[:, None] & cm[None, :]
        v = tl.load(x_rows + c[None, :], mask=vis[:, None] & cm[None, :], other=0).to(ACC)
        t = tl.load(tok_ptr + c, mask=cm, other=0).to(ACC)
        v = tl.where(vis[:, None], v, t[None, :])
        if HAS_POS:
            v += tl.load(p_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(o_rows + c[None, :], v, mask=m)


register_kernel(
    _scatter_tokens_fwd_kernel,
    signature={"x_ptr": "*{xt}", "ids_ptr": "*i64", "tok_ptr": "*{pt}", "pos_ptr": "*{pt}",
               "out_ptr": "*{ot}", "T": "i32", "L_KEEP": "i32", "N_PREFIX": "i32", "D": "i32",
               "stride_xb": "i32", "stride_xl": "i32", "stride_ib": "i32", "stride_pl": "i32",
               "stride_ob": "i32", "stride_ol": "i32", "HAS_POS": "constexpr",
               "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=[
        KernelConfig("fp32 R4 D512", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "fp32", "pt": "fp32", "ot": "fp32"}, num_warps=4,
                     default=True),
        KernelConfig("amp bf16 x + fp32 token/pos", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "bf16", "pt": "fp32", "ot": "fp32"}, num_warps=4),
    ],
)


@triton.jit
def _scatter_tokens_bwd_kernel(
    # pointers: g (B, T, D), ids_restore (B, L), dx_vis (B, S, D) zero-filled,
    # dtok (D,) acc [atomics] or (programs, D) partials [deterministic], dpos (T, D) acc
    g_ptr, ids_ptr, dx_ptr, dtok_ptr, dpos_ptr,
    # shapes
    T, L_KEEP, N_PREFIX, D,
    # strides (all rows contiguous)
    stride_gb, stride_gl, stride_ib, stride_dxb, stride_dxl, stride_dpl,
    # meta
    POS_ATOMIC: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx_vis[b, src(r)] = g[b, r] on visible rows; d mask_token = Σ_removed rows g[b, r], summed
    # per program in registers, then one atomic (or one partial row) per program and chunk;
    # dpos[r] += g[b, r] with atomics (B adds per row) unless the launcher column-sums g.
    ACC: tl.constexpr = tl.float64 if dpos_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < T
    body = rows >= N_PREFIX
    k = tl.load(ids_ptr + b * stride_ib + (rows - N_PREFIX), mask=rmask & body, other=0)
    k = k.to(tl.int64)
    vis = rmask & ((~body) | ((k >= 0) & (k < L_KEEP)))
    removed = rmask & ~vis
    src = tl.where(body, N_PREFIX + k, rows.to(tl.int64))
    cols = tl.arange(0, BLOCK_D)
    g_rows = g_ptr + b * stride_gb + rows[:, None].to(tl.int64) * stride_gl
    dx_rows = dx_ptr + b * stride_dxb + src[:, None] * stride_dxl
    dp_rows = dpos_ptr + rows[:, None].to(tl.int64) * stride_dpl
    part = dtok_ptr + (b * tl.num_programs(1) + rb) * D  # this program's partial row
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        m = rmask[:, None] & cm[None, :]
        g = tl.load(g_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(dx_rows + c[None, :], g, mask=vis[:, None] & cm[None, :])
        tok = tl.sum(tl.where(removed[:, None], g, 0.0), axis=0)  # (BLOCK_D,)
        if DETERMINISTIC:
            tl.store(part + c, tok, mask=cm)
        else:
            tl.atomic_add(dtok_ptr + c, tok, mask=cm)
        if POS_ATOMIC:
            tl.atomic_add(dp_rows + c[None, :], g, mask=m)


register_kernel(
    _scatter_tokens_bwd_kernel,
    signature={"g_ptr": "*{gt}", "ids_ptr": "*i64", "dx_ptr": "*{xt}", "dtok_ptr": "*fp32",
               "dpos_ptr": "*fp32", "T": "i32", "L_KEEP": "i32", "N_PREFIX": "i32", "D": "i32",
               "stride_gb": "i32", "stride_gl": "i32", "stride_ib": "i32", "stride_dxb": "i32",
               "stride_dxl": "i32", "stride_dpl": "i32", "POS_ATOMIC": "constexpr",
               "DETERMINISTIC": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=[KernelConfig("fp32 R4 D512 atomics",
                          {"POS_ATOMIC": True, "DETERMINISTIC": False, **_TOKEN_CONSTS},
                          types={"gt": "fp32", "xt": "fp32"}, num_warps=4, default=True)],
)


@triton.jit
def _sum_over_batch_kernel(
    # pointers: src (B, R, D) rows contiguous, dst (R, D) acc
    src_ptr, dst_ptr,
    # shapes and strides
    B, R, D, stride_sb, stride_sr, stride_dr,
    # meta
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dst[r, d] = Σ_b src[b, r, d] in the fixed order b = 0..B−1: the deterministic column
    # reduction for d pos_embed (no atomics, same bits every run).
    ACC: tl.constexpr = tl.float64 if dst_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (rows < R)[:, None] & (cols < D)[None, :]
    src = src_ptr + rows[:, None].to(tl.int64) * stride_sr + cols[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for _ in range(0, B):
        acc += tl.load(src, mask=m, other=0).to(ACC)
        src += stride_sb  # 64-bit pointer step: b·stride never overflows int32
    tl.store(dst_ptr + rows[:, None].to(tl.int64) * stride_dr + cols[None, :], acc, mask=m)


register_kernel(
    _sum_over_batch_kernel,
    signature={"src_ptr": "*fp32", "dst_ptr": "*fp32", "B": "i32", "R": "i32", "D": "i32",
               "stride_sb": "i32", "stride_sr": "i32", "stride_dr": "i32",
               "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=[KernelConfig("fp32 R4 D128", {"BLOCK_R": 4, "BLOCK_D": 128}, num_warps=4,
                          default=True)],
    hot=False,  # only on the deterministic path
)


@triton.jit
def _masked_patch_loss_kernel(
    # pointers: pred (B, L, P), imgs (B, C, H, W), mask (B·L,) acc, denom (1,) acc,
    # grad (B·L, P) pred dtype, loss (B·L,) acc per-patch partials
    pred_ptr, img_ptr, mask_ptr, denom_ptr, grad_ptr, loss_ptr,
    # shapes: N = B·L patches, GW patches per image row
    N, L, GW,
    # strides (pred rows contiguous; imgs any layout)
    stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw,
    # meta
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM_PIX: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One pass per patch m = (b, l): t = imgs patch in (row, col, channel) order, normalized
    # per patch with the unbiased variance; d = pred − t; loss[m] = w·Σd²/(P·n);
    # grad[m] = 2·w·d/(P·n) with w = mask[m], n = max(Σ mask, 1). Kept patches (w = 0) issue
    # no loads (masked off) and store zero gradients.
    ACC: tl.constexpr = tl.float64 if loss_ptr.dtype.element_ty == tl.float64 else tl.float32
    P: tl.constexpr = PATCH * PATCH * CHANNELS
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mvalid = m < N
    w = tl.load(mask_ptr + m, mask=mvalid, other=0).to(ACC)
    active = mvalid & (w != 0)
    b = m // L
    l_ = m - b * L
    gh = l_ // GW
    gw = l_ - gh * GW
    k = tl.arange(0, BLOCK_P)  # patch-vector index = (i·PATCH + j)·CHANNELS + c
    kv = k < P
    i = k // (PATCH * CHANNELS)
    j = (k // CHANNELS) % PATCH
    ch = k % CHANNELS
    img_off = (b * stride_ib + gh * PATCH * stride_ih + gw * PATCH * stride_iw)[:, None] + (
        ch.to(tl.int64) * stride_ic + i.to(tl.int64) * stride_ih + j.to(tl.int64) * stride_iw
    )[None, :]
    ld = active[:, None] & kv[None, :]
    x = tl.load(img_ptr + img_off, mask=ld, other=0).to(ACC)
    if NORM_PIX:
        mean = tl.sum(x, axis=1) / P
        xc = tl.where(ld, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / (P - 1)  # unbiased, as the official code
        x = xc / tl.sqrt(var + 1.0e-6)[:, None]
    pr = tl.load(pred_ptr + (b * stride_pb + l_ * stride_pl)[:, None] + k[None, :], mask=ld,
                 other=0).to(ACC)
    diff = tl.where(ld, pr - x, 0.0)
    denom = tl.load(denom_ptr).to(ACC)
    tl.store(loss_ptr + m, w * tl.sum(diff * diff, axis=1) / (P * denom), mask=mvalid)
    if WRITE_GRAD:
        scale = 2.0 * w / (P * denom)
        tl.store(grad_ptr + m[:, None] * P + k[None, :], diff * scale[:, None],
                 mask=mvalid[:, None] & kv[None, :])


def _loss_cfg(label, p, c, pt="fp32", default=False):
    bp = next_power_of_2(p * p * c)
    return KernelConfig(label, {"PATCH": p, "CHANNELS": c, "NORM_PIX": True, "WRITE_GRAD": True,
                                "BLOCK_M": _loss_block_m(bp), "BLOCK_P": bp},
                        types={"pt": pt, "it": "fp32"}, num_warps=_loss_warps(bp),
                        default=default)


def _loss_block_m(block_p):
    return max(1, min(128, 2048 // block_p))  # ~2048 pixels per program


def _loss_warps(block_p):
    return 4 if block_p * _loss_block_m(block_p) <= 2048 else 8


register_kernel(
    _masked_patch_loss_kernel,
    signature={"pred_ptr": "*{pt}", "img_ptr": "*{it}", "mask_ptr": "*fp32",
               "denom_ptr": "*fp32", "grad_ptr": "*{pt}", "loss_ptr": "*fp32", "N": "i32",
               "L": "i32", "GW": "i32", "stride_pb": "i32", "stride_pl": "i32",
               "stride_ib": "i32", "stride_ic": "i32", "stride_ih": "i32", "stride_iw": "i32",
               "PATCH": "constexpr", "CHANNELS": "constexpr", "NORM_PIX": "constexpr",
               "WRITE_GRAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_P": "constexpr"},
    configs=[
        _loss_cfg("fp32 p16 C3 norm_pix", 16, 3, default=True),
        _loss_cfg("amp bf16 pred p16 C3 norm_pix", 16, 3, pt="bf16"),
        _loss_cfg("fp32 p14 C3 norm_pix (ViT-H)", 14, 3),
    ],
)
