"""MAE Triton kernels and their registered configurations.

Conventions: row offsets are int64 (row x stride overflows int32 at ViT-H batch sizes); the
accumulation dtype is fp64 when the output pointer is fp64 (the float64 tests), else fp32;
whole D-rows move in BLOCK_D column chunks, so one configuration serves every width. The row
blocks of an image are on grid axis 0 (neighbouring programs touch neighbouring memory), the
image on axis 1. Every launcher passes the num_warps / num_stages registered here (the
constants below), so the static report describes what runs.

Atomics: only d pos_embed (a learned position table) is accumulated with atomics, `relaxed`
(an add needs no ordering), at most B adds per element, one per image's program. d mask_token
never is: the scatter backward writes one partial row per (image, row group) and the launcher
sums those rows in a fixed order (a few hundred rows, not a contended address).
"""

from __future__ import annotations

from .._registry import KernelConfig, register_kernel
from .._triton import tl, triton
from .._utils import next_power_of_2

TOKEN_WARPS, TOKEN_STAGES = 4, 2
# gather: 32 patches x 64 channels per tile, 8 elements a thread (8 warps): ~60 registers,
# so several CTAs per SM keep enough loads in flight for a copy kernel
GATHER_WARPS, BLOCK_L, BLOCK_D = 8, 32, 64
SCATTER_BLOCK_R, SCATTER_BLOCK_D = 8, 128  # scatter forward: rows per program, columns
# scatter backward: rows per program, rows per step (16 x 128 tiles, 8 elements a thread)
SCATTER_BWD_WARPS, GROUP_ROWS, GROUP_TILE = 8, 64, 16
LOSS_STAGES = 2
# (pred dtype, gradient buffer dtype): fp16/bf16 gradients are written in fp32 so that the
# upstream gradient (GradScaler's 65536) multiplies before the one rounding (issue 22.1)
LOSS_DTYPES = (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"))
# (patch, channels) of the presets: ViT-*/16 and ViT-H/14 on RGB, /4 for images <= 64 px
# (grey datasets are replicated to 3 channels)
LOSS_PATCHES = ((16, 3), (14, 3), (4, 3))
# x / activation dtypes under fp32 training and bf16 / fp16 autocast; pos_embed and
# mask_token stay fp32 parameters or buffers, so the outputs are fp32 (torch's promotion)
TOKEN_DTYPES = (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"))


def _token_cfgs(constexprs, variants=((),), warps=TOKEN_WARPS):
    """One config per activation dtype x variant (a dict of extra constexprs); the default is
    bf16 autocast with the first variant (what MAE training on a GPU launches)."""
    out = []
    for xt, ot in TOKEN_DTYPES:
        for i, extra in enumerate(variants):
            extra = dict(extra)
            tag = " ".join(f"{k}={int(v)}" for k, v in extra.items())
            out.append(KernelConfig(f"{xt} x -> {ot} {tag}".strip(), {**constexprs, **extra},
                                    types={"xt": xt, "pt": "fp32", "ot": ot},
                                    num_warps=warps, num_stages=TOKEN_STAGES,
                                    default=xt == "bf16" and i == 0))
    return out


# ----------------------------------------------------------------------------- gather
@triton.jit
def _gather_tokens_fwd_kernel(
    # pointers: x (B, L, D), inv (B, L) int32 = output row of each patch or -1 (dropped),
    # pos (L, D) rows, out (B, L_keep, D) rows contiguous
    x_ptr, inv_ptr, pos_ptr, out_ptr,
    # shapes
    L, D,
    # strides, in elements: stride_x steps the non-unit axis of x (d when X_DL, else l)
    stride_xb, stride_x, stride_pl, stride_ob, stride_ol,
    # meta
    HAS_POS: tl.constexpr, X_DL: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[b, inv[b, l], :] = x[b, l, :] + pos[l, :] for the kept patches (inv >= 0).
    # Tiles run along L: with X_DL (x is (B, D, L) in memory, PatchEmbed's conv output seen
    # through transpose(1, 2)) consecutive lanes read consecutive patches of one channel, so
    # each 32-byte sector serves 8-16 lanes; a row-per-token walk would give each lane its own
    # sector. The writes are whole rows of out, coalesced along D.
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    lo = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = lo < L
    j = tl.load(inv_ptr + b * L + lo, mask=lm, other=-1)
    keep = lm & (j >= 0)
    # 64-bit image bases, 32-bit offsets inside an image (its L*D elements are < 2^31): half
    # the registers of per-element 64-bit index math
    x_img = x_ptr + b * stride_xb
    o_img = out_ptr + b * stride_ob
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = keep[:, None] & (c < D)[None, :]
        if X_DL:
            v = tl.load(x_img + (lo[:, None] + c[None, :] * stride_x), mask=m, other=0)
        else:
            v = tl.load(x_img + (lo[:, None] * stride_x + c[None, :]), mask=m, other=0)
        v = v.to(ACC)
        if HAS_POS:
            v += tl.load(pos_ptr + (lo[:, None] * stride_pl + c[None, :]), mask=m,
                         other=0).to(ACC)
        tl.store(o_img + (j[:, None] * stride_ol + c[None, :]), v, mask=m)  # cast on store


_GATHER_CONSTS = {"HAS_POS": True, "BLOCK_L": BLOCK_L, "BLOCK_D": BLOCK_D}
_LAYOUTS = ({"X_DL": True}, {"X_DL": False})
register_kernel(
    _gather_tokens_fwd_kernel,
    signature={"x_ptr": "*{xt}", "inv_ptr": "*i32", "pos_ptr": "*{pt}", "out_ptr": "*{ot}",
               "L": "i32", "D": "i32", "stride_xb": "i32", "stride_x": "i32",
               "stride_pl": "i32", "stride_ob": "i32", "stride_ol": "i32",
               "HAS_POS": "constexpr", "X_DL": "constexpr", "BLOCK_L": "constexpr",
               "BLOCK_D": "constexpr"},
    configs=_token_cfgs(_GATHER_CONSTS, _LAYOUTS, GATHER_WARPS),
)


@triton.jit
def _gather_tokens_bwd_kernel(
    # pointers: g (B, L_keep, D) rows contiguous, inv (B, L) int32, dx (B, L, D) in x's
    # layout, dpos (L, D) acc (atomics) or unused
    g_ptr, inv_ptr, dx_ptr, dpos_ptr,
    # shapes
    L, D,
    # strides: stride_dx steps the non-unit axis of dx (d when X_DL, else l)
    stride_gb, stride_gl, stride_dxb, stride_dx, stride_dpl,
    # meta
    POS_ATOMIC: tl.constexpr, X_DL: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dx[b, l, :] = g[b, inv[b, l], :] if kept, else 0: every element of dx is written here
    # once (no zero-fill pass), in x's own layout (so the conv's backward gets the layout it
    # produced). dpos[l, :] += g[b, inv[b, l], :] with relaxed fp32 atomics (<= B adds).
    ACC: tl.constexpr = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    lo = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = lo < L
    j = tl.load(inv_ptr + b * L + lo, mask=lm, other=-1)
    keep = lm & (j >= 0)
    g_img = g_ptr + b * stride_gb  # 64-bit bases, 32-bit offsets inside an image
    dx_img = dx_ptr + b * stride_dxb
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = (c < D)[None, :]
        m = keep[:, None] & cm
        g = tl.load(g_img + (j[:, None] * stride_gl + c[None, :]), mask=m, other=0).to(ACC)
        if X_DL:
            tl.store(dx_img + (lo[:, None] + c[None, :] * stride_dx), g, mask=lm[:, None] & cm)
        else:
            tl.store(dx_img + (lo[:, None] * stride_dx + c[None, :]), g, mask=lm[:, None] & cm)
        if POS_ATOMIC:
            tl.atomic_add(dpos_ptr + (lo[:, None] * stride_dpl + c[None, :]), g, mask=m,
                          sem="relaxed")


register_kernel(
    _gather_tokens_bwd_kernel,
    # g is fp32 under autocast (the fp32 pos promotes the output); dx is in x's dtype
    signature={"g_ptr": "*{ot}", "inv_ptr": "*i32", "dx_ptr": "*{xt}", "dpos_ptr": "*fp32",
               "L": "i32", "D": "i32", "stride_gb": "i32", "stride_gl": "i32",
               "stride_dxb": "i32", "stride_dx": "i32", "stride_dpl": "i32",
               "POS_ATOMIC": "constexpr", "X_DL": "constexpr", "BLOCK_L": "constexpr",
               "BLOCK_D": "constexpr"},
    configs=_token_cfgs({"BLOCK_L": BLOCK_L, "BLOCK_D": BLOCK_D},
                        [{**lay, "POS_ATOMIC": pa} for lay in _LAYOUTS for pa in (False, True)],
                        GATHER_WARPS),
)


# ----------------------------------------------------------------------------- scatter
@triton.jit
def _scatter_tokens_fwd_kernel(
    # pointers: x_vis (B, S, D), ids_restore (B, L), mask_token (D,), pos (T, D), out (B, T, D)
    x_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr,
    # shapes: T = N_PREFIX + L output rows, L_KEEP = S - N_PREFIX visible rows
    T, L_KEEP, N_PREFIX, D,
    # strides (all rows contiguous)
    stride_xb, stride_xl, stride_ib, stride_pl, stride_ob, stride_ol,
    # meta
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # row r < N_PREFIX copies x_vis[b, r]; row N_PREFIX + l reads k = ids_restore[b, l]:
    # x_vis[b, N_PREFIX + k] if k < L_KEEP, else the mask token; then + pos[r]. x_vis is the
    # decoder embedding's output (rows contiguous): reads and writes are whole rows.
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < T
    body = rows >= N_PREFIX
    k = tl.load(ids_ptr + b * stride_ib + (rows - N_PREFIX), mask=rmask & body, other=0)
    k = k.to(tl.int32)  # < L: the 32-bit offsets inside an image below
    vis = rmask & ((~body) | ((k >= 0) & (k < L_KEEP)))
    src = tl.where(body, N_PREFIX + k, rows)  # row of x_vis
    x_img = x_ptr + b * stride_xb  # 64-bit image bases
    o_img = out_ptr + b * stride_ob
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        m = rmask[:, None] & cm[None, :]
        v = tl.load(x_img + (src[:, None] * stride_xl + c[None, :]),
                    mask=vis[:, None] & cm[None, :], other=0).to(ACC)
        t = tl.load(tok_ptr + c, mask=cm, other=0).to(ACC)
        v = tl.where(vis[:, None], v, t[None, :])
        if HAS_POS:
            v += tl.load(pos_ptr + (rows[:, None] * stride_pl + c[None, :]), mask=m,
                         other=0).to(ACC)
        tl.store(o_img + (rows[:, None] * stride_ol + c[None, :]), v, mask=m)


register_kernel(
    _scatter_tokens_fwd_kernel,
    signature={"x_ptr": "*{xt}", "ids_ptr": "*i64", "tok_ptr": "*{pt}", "pos_ptr": "*{pt}",
               "out_ptr": "*{ot}", "T": "i32", "L_KEEP": "i32", "N_PREFIX": "i32", "D": "i32",
               "stride_xb": "i32", "stride_xl": "i32", "stride_ib": "i32", "stride_pl": "i32",
               "stride_ob": "i32", "stride_ol": "i32", "HAS_POS": "constexpr",
               "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=_token_cfgs({"BLOCK_R": SCATTER_BLOCK_R, "BLOCK_D": SCATTER_BLOCK_D},
                        ({"HAS_POS": True}, {"HAS_POS": False})),
)


@triton.jit
def _scatter_tokens_bwd_kernel(
    # pointers: g (B, T, D), ids_restore (B, L), dx_vis (B, S, D), part (B * groups, D) acc:
    # one d mask_token partial row per (image, row group), dpos (T, D) acc (atomics) or unused
    g_ptr, ids_ptr, dx_ptr, part_ptr, dpos_ptr,
    # shapes
    T, L_KEEP, N_PREFIX, D,
    # strides (all rows contiguous)
    stride_gb, stride_gl, stride_ib, stride_dxb, stride_dxl, stride_dpl,
    # meta
    POS_ATOMIC: tl.constexpr, GROUP_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (row group, column chunk, image): GROUP_ROWS rows of g in BLOCK_R steps.
    # dx_vis[b, src(r)] = g[b, r] on visible rows (each x_vis row has exactly one source row,
    # ids_restore being a permutation: no zero fill); the removed rows are summed in
    # registers into this program's partial row of d mask_token (no atomics: the launcher
    # adds the B * groups partial rows in a fixed order); dpos[r] += g[b, r] with relaxed
    # atomics (B adds per element) unless the launcher column-sums g.
    ACC: tl.constexpr = tl.float64 if part_ptr.dtype.element_ty == tl.float64 else tl.float32
    grp = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    g_img = g_ptr + b * stride_gb
    dx_img = dx_ptr + b * stride_dxb
    for r0 in range(0, GROUP_ROWS, BLOCK_R):
        rows = grp * GROUP_ROWS + r0 + tl.arange(0, BLOCK_R)
        rmask = rows < T
        body = rows >= N_PREFIX
        k = tl.load(ids_ptr + b * stride_ib + (rows - N_PREFIX), mask=rmask & body, other=0)
        k = k.to(tl.int32)  # 32-bit offsets inside an image, 64-bit image bases
        vis = rmask & ((~body) | ((k >= 0) & (k < L_KEEP)))
        src = tl.where(body, N_PREFIX + k, rows)
        m = rmask[:, None] & cm[None, :]
        g = tl.load(g_img + (rows[:, None] * stride_gl + c[None, :]), mask=m, other=0)
        g = g.to(ACC)
        tl.store(dx_img + (src[:, None] * stride_dxl + c[None, :]), g,
                 mask=vis[:, None] & cm[None, :])
        acc += tl.sum(tl.where((rmask & ~vis)[:, None], g, 0.0), axis=0)
        if POS_ATOMIC:
            tl.atomic_add(dpos_ptr + (rows[:, None] * stride_dpl + c[None, :]), g, mask=m,
                          sem="relaxed")
    row = b * tl.num_programs(0) + grp
    tl.store(part_ptr + row * D + c, acc, mask=cm)


register_kernel(
    _scatter_tokens_bwd_kernel,
    signature={"g_ptr": "*{ot}", "ids_ptr": "*i64", "dx_ptr": "*{xt}", "part_ptr": "*fp32",
               "dpos_ptr": "*fp32", "T": "i32", "L_KEEP": "i32", "N_PREFIX": "i32", "D": "i32",
               "stride_gb": "i32", "stride_gl": "i32", "stride_ib": "i32", "stride_dxb": "i32",
               "stride_dxl": "i32", "stride_dpl": "i32", "POS_ATOMIC": "constexpr",
               "GROUP_ROWS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=_token_cfgs({"GROUP_ROWS": GROUP_ROWS, "BLOCK_R": GROUP_TILE,
                         "BLOCK_D": SCATTER_BLOCK_D},
                        ({"POS_ATOMIC": False}, {"POS_ATOMIC": True}), SCATTER_BWD_WARPS),
)


# ----------------------------------------------------------------------------- loss
@triton.jit
def _masked_patch_loss_kernel(
    # pointers: pred (B, L, P), imgs (B, C, H, W), mask (B·L,) acc, denom (1,) acc,
    # grad (B·L, P) fp32 for fp16/bf16 pred (else pred's dtype), loss (B·L,) acc partials
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
    # no loads (masked off) and store zero gradients. The gradient is stored in fp32 for half
    # inputs: at MAE-B it is ~3e-7, fp16-subnormal, until the upstream gradient multiplies.
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


def loss_block_m(block_p):
    # ~2048 pixels per program, at most 16 patches: 32 patches of 64 (the /4 small-image
    # patch) without the gradient pass took 168 registers and an 8-byte stack under triton 3.6
    return max(1, min(16, 2048 // block_p))


def loss_warps(block_p):
    return 4 if block_p * loss_block_m(block_p) <= 2048 else 8


def _loss_cfgs():
    out = []
    for p, c in LOSS_PATCHES:
        bp = next_power_of_2(p * p * c)
        for pt, gt in LOSS_DTYPES:
            for write in (True, False):  # no gradient pass under no_grad (evaluation)
                out.append(KernelConfig(
                    f"{pt} pred p{p} C{c}" + ("" if write else " no grad"),
                    {"PATCH": p, "CHANNELS": c, "NORM_PIX": True, "WRITE_GRAD": write,
                     "BLOCK_M": loss_block_m(bp), "BLOCK_P": bp},
                    types={"pt": pt, "gt": gt if write else "fp32", "it": "fp32"},
                    num_warps=loss_warps(bp), num_stages=LOSS_STAGES,
                    default=(p, c, pt, write) == (16, 3, "bf16", True)))
    return out


register_kernel(
    _masked_patch_loss_kernel,
    signature={"pred_ptr": "*{pt}", "img_ptr": "*{it}", "mask_ptr": "*fp32",
               "denom_ptr": "*fp32", "grad_ptr": "*{gt}", "loss_ptr": "*fp32", "N": "i32",
               "L": "i32", "GW": "i32", "stride_pb": "i32", "stride_pl": "i32",
               "stride_ib": "i32", "stride_ic": "i32", "stride_ih": "i32", "stride_iw": "i32",
               "PATCH": "constexpr", "CHANNELS": "constexpr", "NORM_PIX": "constexpr",
               "WRITE_GRAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_P": "constexpr"},
    configs=_loss_cfgs(),
)
