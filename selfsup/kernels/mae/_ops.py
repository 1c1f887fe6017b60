"""The MAE ops as torch custom ops (issue 23.1; `.._custom_op` has the conventions).

Forward ops run a launcher pair's forward (Triton or portable, by the `backend` the API chose);
the registered autograd saves the indices (and the loss's d pred, computed in its forward) and
calls the backward op. Outputs are fresh tensors; the fakes reproduce each path's layout (the
Triton gather's dx keeps x's (B, D, L) memory when x has it). Index range checks read the ids,
so under torch.compile the API skips them and the forward bodies do them (CPU tensors only, as
eagerly: on CUDA it would be a host sync).
"""

from __future__ import annotations

import torch

from .._custom_op import fused_op, placeholder, save_grad_buffer, scaled_grad_buffer
from ._checks import _acc_dtype, _check_ids_range, grad_buffer_dtype
from ._launch import (
    _empty_like_layout,
    gather_tokens_bwd,
    gather_tokens_fwd,
    masked_patch_loss_fwd,
    scatter_tokens_bwd,
    scatter_tokens_fwd,
    x_is_dl,
)
from ._torch import (
    _gather_bwd_torch,
    _gather_fwd_torch,
    _loss_fwd_torch,
    _scatter_bwd_torch,
    _scatter_fwd_torch,
)

Tensor = torch.Tensor


def _promoted(*ts):
    dt = ts[0].dtype
    for t in ts[1:]:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


# ----------------------------------------------------------------------------- gather
def _gather_fwd_fake(x, ids_keep, pos_embed, deterministic, backend):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]),
                       dtype=_promoted(x, pos_embed))


@fused_op("mae_gather_fwd", fake=_gather_fwd_fake)
def _gather_fwd_op(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None, deterministic: bool,
                   backend: str) -> Tensor:
    _check_ids_range("ids_keep", ids_keep, x.shape[1])
    fwd = gather_tokens_fwd if backend == "triton" else _gather_fwd_torch
    return fwd(x, ids_keep, pos_embed)


def _gather_bwd_fake(g, ids_keep, length, x_dtype, pos_dtype, need_pos, deterministic,
                     x_dl, backend):
    b, _, d = g.shape
    dl = backend == "triton" and x_dl
    dx = _empty_like_layout((b, length, d), dl, device=g.device, dtype=x_dtype)
    dpos = g.new_empty((1, length, d) if need_pos else 0, dtype=pos_dtype or g.dtype)
    return dx, dpos


@fused_op("mae_gather_bwd", fake=_gather_bwd_fake)
def _gather_bwd_op(g: Tensor, ids_keep: Tensor, length: int, x_dtype: torch.dtype,
                   pos_dtype: torch.dtype | None, need_pos: bool, deterministic: bool,
                   x_dl: bool, backend: str) -> tuple[Tensor, Tensor]:
    shape = (g.shape[0], length, g.shape[2])
    if backend == "triton":  # dx in x's own layout
        dx, dpos = gather_tokens_bwd(g, ids_keep, shape, x_dtype, pos_dtype, need_pos,
                                     deterministic, x_dl)
    else:
        dx, dpos = _gather_bwd_torch(g, ids_keep, shape, x_dtype, pos_dtype, need_pos,
                                     deterministic)
    return dx, placeholder(g, pos_dtype) if dpos is None else dpos


def _gather_setup(ctx, inputs, output):
    x, ids_keep, pos_embed, deterministic, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.meta = (x.shape[1], x.dtype, None if pos_embed is None else pos_embed.dtype,
                deterministic, backend, x_is_dl(x))


def _gather_backward(ctx, g):
    (ids_keep,) = ctx.saved_tensors
    length, x_dtype, pos_dtype, deterministic, backend, x_dl = ctx.meta
    need_pos = pos_dtype is not None and ctx.needs_input_grad[2]
    dx, dpos = _gather_bwd_op(g, ids_keep, length, x_dtype, pos_dtype, need_pos,
                              deterministic, x_dl, backend)
    return (dx if ctx.needs_input_grad[0] else None), None, (dpos if need_pos else None), \
        None, None


_gather_fwd_op.register_autograd(_gather_backward, setup_context=_gather_setup)


# ----------------------------------------------------------------------------- scatter
def _scatter_fwd_fake(x_vis, ids_restore, mask_token, pos_embed, n_prefix, deterministic,
                      backend):
    b, _, d = x_vis.shape
    return x_vis.new_empty((b, n_prefix + ids_restore.shape[1], d),
                           dtype=_promoted(x_vis, mask_token, pos_embed))


@fused_op("mae_scatter_fwd", fake=_scatter_fwd_fake)
def _scatter_fwd_op(x_vis: Tensor, ids_restore: Tensor, mask_token: Tensor,
                    pos_embed: Tensor | None, n_prefix: int, deterministic: bool, backend: str
                    ) -> Tensor:
    _check_ids_range("ids_restore", ids_restore, ids_restore.shape[1])
    fwd = scatter_tokens_fwd if backend == "triton" else _scatter_fwd_torch
    return fwd(x_vis, ids_restore, mask_token, pos_embed, n_prefix)


def _scatter_bwd_fake(g, ids_restore, s, x_dtype, n_prefix, need_pos, deterministic, backend):
    b, t, d = g.shape
    acc = _acc_dtype(g.dtype, x_dtype)
    return (g.new_empty((b, s, d), dtype=x_dtype), g.new_empty(d, dtype=acc),
            g.new_empty((1, t, d) if need_pos else 0, dtype=acc))


@fused_op("mae_scatter_bwd", fake=_scatter_bwd_fake)
def _scatter_bwd_op(g: Tensor, ids_restore: Tensor, s: int, x_dtype: torch.dtype,
                    n_prefix: int, need_pos: bool, deterministic: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx_vis, d mask_token (D,), dpos (1, T, D) or empty), the last two in the accumulation
    dtype."""
    shape = (g.shape[0], s, g.shape[2])
    if backend == "triton":
        dx, dtok, dpos = scatter_tokens_bwd(g, ids_restore, shape, x_dtype, n_prefix,
                                            need_pos, deterministic)
    else:
        dx, dtok, dpos = _scatter_bwd_torch(g, ids_restore, shape, x_dtype, n_prefix,
                                            need_pos)
    acc = _acc_dtype(g.dtype, x_dtype)
    return dx, dtok, placeholder(g, acc) if dpos is None else dpos


def _scatter_setup(ctx, inputs, output):
    x_vis, ids_restore, mask_token, pos_embed, n_prefix, deterministic, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (x_vis.shape[1], x_vis.dtype, mask_token.shape, mask_token.dtype,
                None if pos_embed is None else pos_embed.dtype, n_prefix, deterministic,
                backend)


def _scatter_backward(ctx, g):
    (ids_restore,) = ctx.saved_tensors
    s, x_dtype, tok_shape, tok_dtype, pos_dtype, n_prefix, det, backend = ctx.meta
    need_pos = pos_dtype is not None and ctx.needs_input_grad[3]
    dx, dtok, dpos = _scatter_bwd_op(g, ids_restore, s, x_dtype, n_prefix, need_pos, det,
                                     backend)
    return (dx if ctx.needs_input_grad[0] else None, None,
            dtok.to(tok_dtype).reshape(tok_shape) if ctx.needs_input_grad[2] else None,
            dpos.to(pos_dtype) if need_pos else None, None, None, None)


_scatter_fwd_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# ----------------------------------------------------------------------------- loss
def _loss_fwd_fake(pred, imgs, mask, patch_size, norm_pix, need_grad, backend):
    acc = _acc_dtype(pred.dtype, imgs.dtype)
    return (pred.new_empty((), dtype=acc),
            pred.new_empty(pred.shape if need_grad else 0, dtype=grad_buffer_dtype(pred.dtype)))


@fused_op("mae_loss_fwd", fake=_loss_fwd_fake)
def _loss_fwd_op(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool,
                 need_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d pred in `grad_buffer_dtype` or empty): one pass."""
    fwd = masked_patch_loss_fwd if backend == "triton" else _loss_fwd_torch
    loss, grad = fwd(pred, imgs, mask, patch_size, norm_pix, need_grad)
    return loss, placeholder(pred, grad_buffer_dtype(pred.dtype)) if grad is None else grad


def _loss_setup(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    save_grad_buffer(ctx, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else a pred-sized zero fill for the grad output


def _loss_backward(ctx, g, _grad_of_grad):
    # the upstream gradient (GradScaler's scale) meets the fp32 d pred before its one rounding
    # to fp16/bf16 (a fresh tensor); eager CPU fp32/fp64 is scaled in place (`_custom_op`)
    if not ctx.needs_input_grad[0] or g is None:
        return (None,) * 7
    return scaled_grad_buffer(ctx, g, ctx.dtype), None, None, None, None, None, None


_loss_fwd_op.register_autograd(_loss_backward, setup_context=_loss_setup)
