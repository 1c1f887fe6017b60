"""Launchers of the MAE Triton kernels: buffers, grids, constexprs.

Each launch passes the num_warps / num_stages its configuration is registered with
(`_kernels.py`), runs under the tensors' device guard, and reads nothing back to the host:
grids come from shapes, the loss denominator stays a device tensor.
"""

from __future__ import annotations

import torch

from .._utils import cdiv, device_guard, next_power_of_2
from ._checks import _acc_dtype, _rowmajor, grad_buffer_dtype
from ._kernels import (
    BLOCK_D,
    BLOCK_L,
    GATHER_WARPS,
    GROUP_ROWS,
    GROUP_TILE,
    LOSS_STAGES,
    SCATTER_BLOCK_D,
    SCATTER_BLOCK_R,
    SCATTER_BWD_WARPS,
    TOKEN_STAGES,
    TOKEN_WARPS,
    _gather_tokens_bwd_kernel,
    _gather_tokens_fwd_kernel,
    _masked_patch_loss_kernel,
    _scatter_tokens_bwd_kernel,
    _scatter_tokens_fwd_kernel,
    loss_block_m,
    loss_warps,
)


# ----------------------------------------------------------------------------- layouts
def token_layout(x):
    """(x_dl, x) for the gather: x_dl when x is (B, D, L) in memory with unit stride along L
    (PatchEmbed's `conv(x).flatten(2).transpose(1, 2)`), else rows with unit stride along D
    (a copy only when neither axis is unit-stride)."""
    if x_is_dl(x):
        return True, x
    return False, _rowmajor(x)


def x_is_dl(x):
    """Whether (B, L, D) `x` has unit stride along L (and not along D)."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1


def _dl_stride(x, x_dl):
    """The non-unit stride the kernels take: d's when x_dl, else l's."""
    return x.stride(2) if x_dl else x.stride(1)


def _inverse_ids(ids_keep, length):
    """(B, L) int32: the output row of each patch, -1 for dropped ones. Two small device ops,
    no host read; what lets the gather walk x along L."""
    b, lk = ids_keep.shape
    inv = torch.full((b, length), -1, device=ids_keep.device, dtype=torch.int32)
    rows = torch.arange(lk, device=ids_keep.device, dtype=torch.int32).expand(b, lk)
    return inv.scatter_(1, ids_keep.long(), rows)


def _empty_like_layout(shape, x_dl, **kw):
    """A (B, L, D) buffer in the gather's input layout: (B, D, L) memory when x_dl."""
    b, length, d = shape
    if x_dl:
        return torch.empty(b, d, length, **kw).transpose(1, 2)
    return torch.empty(b, length, d, **kw)


# ----------------------------------------------------------------------------- gather
def gather_tokens_fwd(x, ids_keep, pos_embed):
    b, length, d = x.shape
    lk = ids_keep.shape[1]
    dt = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    out = torch.empty(b, lk, d, device=x.device, dtype=dt)
    if out.numel() == 0:
        return out
    x_dl, x = token_layout(x)
    pos = _rowmajor(pos_embed[0]) if pos_embed is not None else out
    with device_guard(x):
        inv = _inverse_ids(ids_keep, length)
        _gather_tokens_fwd_kernel[(cdiv(length, BLOCK_L), b)](
            x, inv, pos, out, length, d, x.stride(0), _dl_stride(x, x_dl),
            pos.stride(0) if pos_embed is not None else 0, out.stride(0), out.stride(1),
            HAS_POS=pos_embed is not None, X_DL=x_dl, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D,
            num_warps=GATHER_WARPS, num_stages=TOKEN_STAGES)
    return out


def gather_tokens_bwd(g, ids_keep, x_shape, x_dtype, pos_dtype, need_pos, deterministic,
                      x_dl=False):
    """(dx in the forward input's layout, dpos or None). `x_dl` is `token_layout`'s answer
    for the forward's x."""
    b, length, d = x_shape
    acc = _acc_dtype(g.dtype, x_dtype)
    g = _rowmajor(g)
    # deterministic: dx is written in the accumulation dtype, then summed over the batch by
    # torch (a fixed-order reduction) for dpos
    scratch = deterministic and need_pos
    dx = _empty_like_layout(x_shape, x_dl, device=g.device, dtype=acc if scratch else x_dtype)
    atomic = need_pos and not deterministic
    dpos = torch.zeros(length, d, device=g.device, dtype=acc) if atomic else None
    if dx.numel():
        with device_guard(g):
            inv = _inverse_ids(ids_keep, length)
            _gather_tokens_bwd_kernel[(cdiv(length, BLOCK_L), b)](
                g, inv, dx, dpos if atomic else g, length, d, g.stride(0), g.stride(1),
                dx.stride(0), _dl_stride(dx, x_dl), d, POS_ATOMIC=atomic, X_DL=x_dl,
                BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=GATHER_WARPS,
                num_stages=TOKEN_STAGES)
    if scratch:
        dpos = dx.sum(0)
        dx = dx.to(x_dtype)
    return dx, (dpos.to(pos_dtype).unsqueeze(0) if need_pos else None)


# ----------------------------------------------------------------------------- scatter
def scatter_tokens_fwd(x_vis, ids_restore, mask_token, pos_embed, n_prefix):
    b, s, d = x_vis.shape
    length = ids_restore.shape[1]
    t = n_prefix + length
    dt = torch.promote_types(x_vis.dtype, mask_token.dtype)
    if pos_embed is not None:
        dt = torch.promote_types(dt, pos_embed.dtype)
    out = torch.empty(b, t, d, device=x_vis.device, dtype=dt)
    if out.numel() == 0:
        return out
    x, ids = _rowmajor(x_vis), ids_restore.contiguous()
    tok = mask_token.reshape(d).contiguous()
    pos = _rowmajor(pos_embed[0]) if pos_embed is not None else tok
    with device_guard(x):
        _scatter_tokens_fwd_kernel[(cdiv(t, SCATTER_BLOCK_R), b)](
            x, ids, tok, pos, out, t, s - n_prefix, n_prefix, d, x.stride(0), x.stride(1),
            ids.stride(0), pos.stride(0) if pos_embed is not None else 0, out.stride(0),
            out.stride(1), HAS_POS=pos_embed is not None, BLOCK_R=SCATTER_BLOCK_R,
            BLOCK_D=SCATTER_BLOCK_D, num_warps=TOKEN_WARPS, num_stages=TOKEN_STAGES)
    return out


def scatter_tokens_bwd(g, ids_restore, x_shape, x_dtype, n_prefix, need_pos, deterministic):
    """(dx_vis, d mask_token (D,) acc, dpos (1, T, D) acc or None)."""
    b, s, d = x_shape
    t = g.shape[1]
    acc = _acc_dtype(g.dtype, x_dtype)
    g, ids = _rowmajor(g), ids_restore.contiguous()
    grid = (cdiv(t, GROUP_ROWS), cdiv(d, SCATTER_BLOCK_D), b)
    dx = torch.empty(x_shape, device=g.device, dtype=x_dtype)  # every row written once
    part = torch.empty(grid[0] * b, d, device=g.device, dtype=acc)
    atomic = need_pos and not deterministic
    dpos = torch.zeros(t, d, device=g.device, dtype=acc) if atomic else None
    if g.numel():
        with device_guard(g):
            _scatter_tokens_bwd_kernel[grid](
                g, ids, dx, part, dpos if atomic else part, t, s - n_prefix, n_prefix, d,
                g.stride(0), g.stride(1), ids.stride(0), dx.stride(0), dx.stride(1), d,
                POS_ATOMIC=atomic, GROUP_ROWS=GROUP_ROWS, BLOCK_R=GROUP_TILE,
                BLOCK_D=SCATTER_BLOCK_D, num_warps=SCATTER_BWD_WARPS, num_stages=TOKEN_STAGES)
    else:
        part.zero_()
    if need_pos and deterministic:
        dpos = g.sum(0, dtype=acc)  # torch's column reduction: fixed order, no atomics
    return dx, part.sum(0), (dpos.unsqueeze(0) if need_pos else None)


# ----------------------------------------------------------------------------- loss
def masked_patch_loss_fwd(pred, imgs, mask, patch_size, norm_pix, need_grad):
    """(loss, grad_pred or None) in one pass over the masked patches; grad_pred is in
    `grad_buffer_dtype(pred.dtype)` (fp32 for fp16/bf16: the caller rounds after scaling)."""
    b, c, h, w = imgs.shape
    length, p_dim = pred.shape[1], pred.shape[2]
    acc = _acc_dtype(pred.dtype, imgs.dtype)
    pred = _rowmajor(pred)
    wts = mask.reshape(-1).to(acc).contiguous()  # (B·L,)
    denom = wts.sum().clamp_min(1).reshape(1)  # stays on the device: no host sync
    grad = torch.empty(b, length, p_dim, device=pred.device,
                       dtype=grad_buffer_dtype(pred.dtype)) if need_grad else None
    part = torch.empty(b * length, device=pred.device, dtype=acc)
    bp = next_power_of_2(p_dim)
    bm = loss_block_m(bp)
    n = b * length
    if n:
        with device_guard(pred):
            _masked_patch_loss_kernel[(cdiv(n, bm),)](
                pred, imgs, wts, denom, grad if need_grad else part, part, n, length,
                w // patch_size, pred.stride(0), pred.stride(1), imgs.stride(0),
                imgs.stride(1), imgs.stride(2), imgs.stride(3), PATCH=patch_size, CHANNELS=c,
                NORM_PIX=norm_pix, WRITE_GRAD=need_grad, BLOCK_M=bm, BLOCK_P=bp,
                num_warps=loss_warps(bp), num_stages=LOSS_STAGES)
    return part.sum(), grad
