"""Launchers of the MAE Triton kernels: buffers, grids, constexprs."""

from __future__ import annotations

import torch

from .._utils import cdiv, next_power_of_2
from ._checks import _acc_dtype, _rowmajor
from ._kernels import (
    _gather_tokens_bwd_kernel,
    _gather_tokens_fwd_kernel,
    _loss_block_m,
    _loss_warps,
    _masked_patch_loss_kernel,
    _scatter_tokens_bwd_kernel,
    _scatter_tokens_fwd_kernel,
    _sum_over_batch_kernel,
)


# ============================================================================ launchers
def _token_blocks(d):
    return 4, min(512, max(16, next_power_of_2(d)))


def gather_tokens_fwd(x, ids_keep, pos_embed):
    b, length, d = x.shape
    lk = ids_keep.shape[1]
    dt = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    out = torch.empty(b, lk, d, device=x.device, dtype=dt)
    if out.numel() == 0:
        return out
    ids = ids_keep.contiguous()
    pos = _rowmajor(pos_embed[0]) if pos_embed is not None else x
    br, bd = _token_blocks(d)
    _gather_tokens_fwd_kernel[(b, cdiv(lk, br))](
        x, ids, pos, out, lk, d, x.stride(0), x.stride(1), x.stride(2), ids.stride(0),
        pos.stride(0) if pos_embed is not None else 0, out.stride(0), out.stride(1),
        HAS_POS=pos_embed is not None, BLOCK_R=br, BLOCK_D=bd, num_warps=4)
    return out


def gather_tokens_bwd(g, ids_keep, x_shape, x_dtype, pos_dtype, need_pos, deterministic):
    b, length, d = x_shape
    lk = ids_keep.shape[1]
    acc = _acc_dtype(g.dtype, x_dtype)
    g, ids = _rowmajor(g), ids_keep.contiguous()
    # deterministic: dx is written in the accumulation dtype, then column-summed for dpos
    scratch = deterministic and need_pos
    dx = torch.zeros(x_shape, device=g.device, dtype=acc if scratch else x_dtype)
    dpos = torch.zeros(length, d, device=g.device, dtype=acc) if need_pos else None
    if g.numel():
        br, bd = _token_blocks(d)
        _gather_tokens_bwd_kernel[(b, cdiv(lk, br))](
            g, ids, dx, dpos if need_pos else dx, lk, d, g.stride(0), g.stride(1),
            ids.stride(0), dx.stride(0), dx.stride(1), d,
            POS_ATOMIC=need_pos and not deterministic, BLOCK_R=br, BLOCK_D=bd, num_warps=4)
    if scratch:
        _sum_over_batch(dx, dpos)
    dpos = dpos.to(pos_dtype).unsqueeze(0) if need_pos else None
    return dx.to(x_dtype), dpos


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
    br, bd = _token_blocks(d)
    _scatter_tokens_fwd_kernel[(b, cdiv(t, br))](
        x, ids, tok, pos, out, t, s - n_prefix, n_prefix, d, x.stride(0), x.stride(1),
        ids.stride(0), pos.stride(0) if pos_embed is not None else 0, out.stride(0),
        out.stride(1), HAS_POS=pos_embed is not None, BLOCK_R=br, BLOCK_D=bd, num_warps=4)
    return out


def scatter_tokens_bwd(g, ids_restore, x_shape, x_dtype, n_prefix, need_pos, deterministic):
    b, s, d = x_shape
    t = g.shape[1]
    acc = _acc_dtype(g.dtype, x_dtype)
    g, ids = _rowmajor(g), ids_restore.contiguous()
    br, bd = _token_blocks(d)
    grid = (b, cdiv(t, br))
    dx = torch.zeros(x_shape, device=g.device, dtype=x_dtype)
    # per-program partial rows (deterministic) or one atomically accumulated row
    dtok = torch.zeros((grid[0] * grid[1] if deterministic else 1, d), device=g.device,
                       dtype=acc)
    dpos = torch.zeros(t, d, device=g.device, dtype=acc) if need_pos else None
    if g.numel():
        _scatter_tokens_bwd_kernel[grid](
            g, ids, dx, dtok, dpos if need_pos else dtok, t, s - n_prefix, n_prefix, d,
            g.stride(0), g.stride(1), ids.stride(0), dx.stride(0), dx.stride(1), d,
            POS_ATOMIC=need_pos and not deterministic, DETERMINISTIC=deterministic,
            BLOCK_R=br, BLOCK_D=bd, num_warps=4)
        if need_pos and deterministic:
            _sum_over_batch(g, dpos)
    return dx, dtok.sum(0), (dpos.unsqueeze(0) if need_pos else None)


def _sum_over_batch(src, dst):
    """dst (R, D) = Σ_b src (B, R, D), fixed order."""
    b, r, d = src.shape
    bd = min(128, max(16, next_power_of_2(d)))
    _sum_over_batch_kernel[(cdiv(r, 4), cdiv(d, bd))](
        src, dst, b, r, d, src.stride(0), src.stride(1), dst.stride(0),
        BLOCK_R=4, BLOCK_D=bd, num_warps=4)


def masked_patch_loss_fwd(pred, imgs, mask, patch_size, norm_pix, need_grad):
    """(loss, grad_pred or None) in one pass over the masked patches."""
    b, c, h, w = imgs.shape
    length, p_dim = pred.shape[1], pred.shape[2]
    acc = _acc_dtype(pred.dtype, imgs.dtype)
    pred = _rowmajor(pred)
    wts = mask.reshape(-1).to(acc).contiguous()  # (B·L,)
    denom = wts.sum().clamp_min(1).reshape(1)  # stays on the device: no host sync
    grad = torch.empty(b, length, p_dim, device=pred.device, dtype=pred.dtype) if need_grad \
        else None
    part = torch.empty(b * length, device=pred.device, dtype=acc)
    bp = next_power_of_2(p_dim)
    bm = _loss_block_m(bp)
    n = b * length
    if n:
        _masked_patch_loss_kernel[(cdiv(n, bm),)](
            pred, imgs, wts, denom, grad if need_grad else part, part, n, length,
            w // patch_size, pred.stride(0), pred.stride(1), imgs.stride(0), imgs.stride(1),
            imgs.stride(2), imgs.stride(3), PATCH=patch_size, CHANNELS=c, NORM_PIX=norm_pix,
            WRITE_GRAD=need_grad, BLOCK_M=bm, BLOCK_P=bp, num_warps=_loss_warps(bp))
    return part.sum(), grad
