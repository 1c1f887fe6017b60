"""The portable MAE path: few large torch ops, deterministic on CPU."""

from __future__ import annotations

import torch

from ._checks import _acc_dtype, grad_buffer_dtype
from ._ref import NORM_PIX_EPS


# ============================================================================ portable path
LOSS_CHUNK_PIXELS = 1 << 20  # masked pixels per chunk and thread: 4 MB fp32 temporaries
TOKEN_CHUNK_ELEMENTS = 1 << 20  # pos elements added per step and thread in the gather


def _batch_rows(ids, stride):
    """Flat row numbers b·stride + ids[b, j], (B·n,) int64."""
    offs = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) * stride
    return (ids.long() + offs).reshape(-1)


def _gather_fwd_torch(x, ids_keep, pos_embed):
    b = x.shape[0]
    bidx = torch.arange(b, device=x.device).unsqueeze(1)
    ids = ids_keep.long()
    out = x[bidx, ids]  # (B, L_keep, D): reads only the kept rows, any layout of x
    if pos_embed is None:
        return out
    dt = torch.promote_types(out.dtype, pos_embed.dtype)
    out = out.to(dt)
    pos = pos_embed[0]
    # add the selected pos rows a few images at a time: cache-sized temporaries, never a
    # second (B, L_keep, D) buffer
    step = _chunk(ids.shape[1] * x.shape[2], TOKEN_CHUNK_ELEMENTS)
    for i in range(0, b, step):
        out[i:i + step] += pos[ids[i:i + step]]
    return out


def _gather_bwd_torch(g, ids_keep, x_shape, x_dtype, pos_dtype, need_pos, deterministic):
    b, length, d = x_shape
    acc = _acc_dtype(g.dtype, x_dtype)
    rows = _batch_rows(ids_keep, length)
    g2 = g.reshape(-1, d)
    dx = torch.zeros(b * length, d, device=g.device, dtype=x_dtype)
    dx.index_copy_(0, rows, g2.to(x_dtype))
    dpos = None
    if need_pos:
        if deterministic:  # a batch sum instead of index_add_'s CUDA atomics
            src = dx if dx.dtype == acc else torch.zeros(b * length, d, device=g.device,
                                                         dtype=acc).index_copy_(0, rows,
                                                                                g2.to(acc))
            dpos = src.view(b, length, d).sum(0)
        else:  # index_add_ is deterministic on CPU, atomic on CUDA
            dpos = torch.zeros(length, d, device=g.device, dtype=acc)
            dpos.index_add_(0, ids_keep.reshape(-1).long(), g2.to(acc))
        dpos = dpos.to(pos_dtype).unsqueeze(0)
    return dx.view(x_shape), dpos


def _scatter_fwd_torch(x_vis, ids_restore, mask_token, pos_embed, n_prefix):
    b, s, d = x_vis.shape
    length = ids_restore.shape[1]
    lk = s - n_prefix
    dt = torch.promote_types(x_vis.dtype, mask_token.dtype)
    if pos_embed is not None:
        dt = torch.promote_types(dt, pos_embed.dtype)
    out = torch.empty(b, n_prefix + length, d, device=x_vis.device, dtype=dt)
    tok = mask_token.reshape(1, 1, d)
    # every body row first gets mask_token + pos (one broadcast write), then the visible rows
    # are overwritten: the kept token k sits at position ids_shuffle[b, k]
    body = out[:, n_prefix:]
    if pos_embed is None:
        body.copy_(tok.expand(b, length, d))
        out[:, :n_prefix] = x_vis[:, :n_prefix]
    else:
        body.copy_((pos_embed[:, n_prefix:] + tok).expand(b, length, d))
        out[:, :n_prefix] = x_vis[:, :n_prefix] + pos_embed[:, :n_prefix]
    keep_pos = torch.argsort(ids_restore.long(), dim=1)[:, :lk] + n_prefix  # (B, L_keep)
    vals = x_vis[:, n_prefix:]
    if pos_embed is not None:
        vals = vals + pos_embed[0][keep_pos]
    out[torch.arange(b, device=out.device).unsqueeze(1), keep_pos] = vals.to(dt)
    return out


def _scatter_bwd_torch(g, ids_restore, x_shape, x_dtype, n_prefix, need_pos):
    b, s, d = x_shape
    lk = s - n_prefix
    acc = _acc_dtype(g.dtype, x_dtype)
    keep_pos = torch.argsort(ids_restore.long(), dim=1)[:, :lk] + n_prefix
    prefix = torch.arange(n_prefix, device=g.device).expand(b, n_prefix)
    src = torch.cat([prefix, keep_pos], 1)  # (B, S): the g row feeding each x_vis row
    vis = g[torch.arange(b, device=g.device).unsqueeze(1), src]  # (B, S, D), one gather
    colsum = g.sum(0, dtype=acc)  # (T, D) = dpos; deterministic
    # removed rows = all body rows − visible body rows: no pass over a (B, L, D) selection
    dtok = colsum[n_prefix:].sum(0) - vis[:, n_prefix:].sum((0, 1), dtype=acc)
    dpos = colsum.unsqueeze(0) if need_pos else None
    return vis.to(x_dtype), dtok, dpos


def _patch_rows(imgs, p):
    """(flat rows view, per-patch row offsets (R,), channel-interleaved?) for gathering patches
    as whole contiguous pixel rows with one index_select.

    NCHW memory: rows of p pixels of one channel, a patch is C·p rows in (c, i) order (its
    vector needs a (c, i, j) -> (i, j, c) interleave later). NHWC (channels_last) memory: rows
    of p·C values, a patch is p rows already in the (i, j, c) order of `pred`.
    """
    b, c, h, w = imgs.shape
    gw = w // p
    if c > 1 and imgs.is_contiguous(memory_format=torch.channels_last):
        flat = imgs.permute(0, 2, 3, 1).reshape(b * h * gw, p * c)  # a view
        offs = torch.arange(p, device=imgs.device) * gw  # row i of the patch
        return flat, offs, False
    flat = imgs.contiguous().view(b * c * h * gw, p)  # a view unless imgs is oddly strided
    ci = torch.arange(c, device=imgs.device).unsqueeze(1) * h + torch.arange(p, device=imgs.device)
    return flat, (ci * gw).reshape(-1), c > 1


def _chunk(elements_per_item, budget):
    """Items per chunk: `budget` elements per thread (each thread gets a cache-sized slab, and
    fewer, larger ops keep a contended 2-thread machine from stalling at every op's barrier)."""
    return max(1, budget * torch.get_num_threads() // max(1, elements_per_item))


def _loss_fwd_torch(pred, imgs, mask, patch_size, norm_pix, need_grad):
    b, c, h, w = imgs.shape
    p = patch_size
    length, p_dim = pred.shape[1], pred.shape[2]
    gw = w // p
    acc = _acc_dtype(pred.dtype, imgs.dtype)
    flat, offs, interleave = _patch_rows(imgs, p)
    pred2 = pred.reshape(b * length, p_dim)
    wts = mask.reshape(-1).to(acc)
    denom = wts.sum().clamp_min(1)
    rows = wts.nonzero().squeeze(1)  # masked patches only, in memory order
    # per masked patch, all at once: its first pixel row, weight and gradient scale
    bi, li = rows // length, rows % length
    gh = li // gw
    first = bi * (flat.shape[0] // b) + gh * (p * gw) + (li - gh * gw)
    src = (first.unsqueeze(1) + offs).view(-1)  # every pixel row of every masked patch
    per = offs.numel()
    w_rows = wts[rows]
    scale = (w_rows * (2.0 / p_dim) / denom).unsqueeze(1)  # d loss / d diff
    sq = torch.empty(rows.numel(), device=pred.device, dtype=acc)  # |diff| per patch
    grad = None
    if need_grad:
        # fp32 for fp16/bf16 pred: the upstream gradient multiplies before the rounding
        grad = torch.empty(b * length, p_dim, device=pred.device,
                           dtype=grad_buffer_dtype(pred.dtype))
        grad.index_fill_(0, (wts == 0).nonzero().squeeze(1), 0)
    step = _chunk(p_dim, LOSS_CHUNK_PIXELS)
    for i in range(0, rows.numel(), step):
        j = min(i + step, rows.numel())
        t = flat.index_select(0, src[i * per:j * per]).view(-1, p_dim).to(acc)
        if norm_pix:  # statistics do not depend on the pixel order
            t -= t.mean(-1, keepdim=True)
            var = torch.linalg.vector_norm(t, dim=-1, keepdim=True).square_().div_(p_dim - 1)
            t *= var.add_(NORM_PIX_EPS).rsqrt_()
        diff = pred2.index_select(0, rows[i:j]).to(acc)
        if interleave:  # (c, i, j) -> (i, j, c), folded into the subtraction
            diff.view(-1, p * p, c).sub_(t.view(-1, c, p * p).transpose(1, 2))
        else:
            diff.sub_(t)
        torch.linalg.vector_norm(diff, dim=-1, out=sq[i:j])
        if need_grad:
            grad.index_copy_(0, rows[i:j], diff.mul_(scale[i:j]).to(grad.dtype))
    loss = torch.dot(sq.square_(), w_rows) / (p_dim * denom)
    return loss, (grad.view(b, length, p_dim) if need_grad else None)
