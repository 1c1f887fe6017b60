"""autograd.Functions and the public MAE ops."""

from __future__ import annotations

import torch

from .._utils import choose_backend
from ._checks import _check_gather, _check_loss, _check_scatter, _deterministic
from ._launch import (
    gather_tokens_bwd,
    gather_tokens_fwd,
    masked_patch_loss_fwd,
    scatter_tokens_bwd,
    scatter_tokens_fwd,
    x_is_dl,
)
from ._ref import gather_tokens_ref, masked_patch_loss_ref, scatter_tokens_ref
from ._torch import (
    _gather_bwd_torch,
    _gather_fwd_torch,
    _loss_fwd_torch,
    _scatter_bwd_torch,
    _scatter_fwd_torch,
)


# ============================================================================ autograd
class GatherTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed, deterministic, backend):
        fwd = gather_tokens_fwd if backend == "triton" else _gather_fwd_torch
        ctx.save_for_backward(ids_keep)
        ctx.meta = (x.shape, x.dtype, None if pos_embed is None else pos_embed.dtype,
                    deterministic, backend, x_is_dl(x))
        return fwd(x, ids_keep, pos_embed)

    @staticmethod
    def backward(ctx, g):
        (ids_keep,) = ctx.saved_tensors
        x_shape, x_dtype, pos_dtype, det, backend, x_dl = ctx.meta
        need_pos = pos_dtype is not None and ctx.needs_input_grad[2]
        if backend == "triton":  # dx in x's own layout
            dx, dpos = gather_tokens_bwd(g, ids_keep, x_shape, x_dtype, pos_dtype, need_pos,
                                         det, x_dl)
        else:
            dx, dpos = _gather_bwd_torch(g, ids_keep, x_shape, x_dtype, pos_dtype, need_pos,
                                         det)
        return (dx if ctx.needs_input_grad[0] else None), None, dpos, None, None


class ScatterTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_vis, ids_restore, mask_token, pos_embed, n_prefix, deterministic,
                backend):
        fwd = scatter_tokens_fwd if backend == "triton" else _scatter_fwd_torch
        ctx.save_for_backward(ids_restore)
        ctx.meta = (x_vis.shape, x_vis.dtype, mask_token.shape, mask_token.dtype,
                    None if pos_embed is None else pos_embed.dtype, n_prefix, deterministic,
                    backend)
        return fwd(x_vis, ids_restore, mask_token, pos_embed, n_prefix)

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        x_shape, x_dtype, tok_shape, tok_dtype, pos_dtype, n_prefix, det, backend = ctx.meta
        need_pos = pos_dtype is not None and ctx.needs_input_grad[3]
        if backend == "triton":
            dx, dtok, dpos = scatter_tokens_bwd(g, ids_restore, x_shape, x_dtype, n_prefix,
                                                need_pos, det)
        else:
            dx, dtok, dpos = _scatter_bwd_torch(g, ids_restore, x_shape, x_dtype, n_prefix,
                                                need_pos)
        dtok = dtok.to(tok_dtype).reshape(tok_shape)
        dpos = dpos.to(pos_dtype) if dpos is not None else None
        return (dx if ctx.needs_input_grad[0] else None, None,
                dtok if ctx.needs_input_grad[2] else None, dpos, None, None, None)


class MaskedPatchLossFunction(torch.autograd.Function):
    """Forward computes loss and d loss / d pred together; backward scales by the upstream."""

    @staticmethod
    def forward(ctx, pred, imgs, mask, patch_size, norm_pix, need_grad, backend):
        fwd = masked_patch_loss_fwd if backend == "triton" else _loss_fwd_torch
        loss, grad = fwd(pred, imgs, mask, patch_size, norm_pix, need_grad)
        ctx.dtype = pred.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        if grad.dtype != ctx.dtype:
            # fp16/bf16: the fp32 gradient meets the upstream (GradScaler's scale) first, then
            # one rounding into a fresh tensor (a retained graph can run this again)
            return (torch.mul(grad, g, out=torch.empty_like(grad, dtype=ctx.dtype)),
                    None, None, None, None, None, None)
        if grad.device.type != "cpu":  # a fresh buffer is cheap here; nothing read back
            return grad * g, None, None, None, None, None, None
        # CPU: the first backward scales the saved gradient in place: no second (B, L, P)
        # buffer (a fresh buffer's page faults cost as much as the whole scaling pass).
        # `.data` keeps autograd's version counter unchanged, so a repeated backward through
        # a retained graph (gradcheck, retain_graph=True) can undo the first upstream by a
        # ratio (the check reads host memory: no synchronization).
        applied = getattr(ctx, "applied", None)
        if applied is None:
            ctx.applied = g.detach().clone()
            out = grad.data.mul_(g)  # a 0-dim g keeps grad's dtype
        else:
            if not bool(torch.isfinite(applied) & (applied != 0)):
                raise RuntimeError("masked_patch_loss: a repeated backward after an upstream "
                                   f"gradient of {applied.item()} cannot be recovered; "
                                   "recompute the loss")
            out = grad * (g / applied)
        return out, None, None, None, None, None, None


# ============================================================================ public API
def gather_tokens(x, ids_keep, pos_embed=None, *, deterministic=None):
    """Keep the rows `ids_keep` of `x` (+ pos_embed, added first): the MAE encoder's masking.

    Args:
        x: (B, L, D) float tokens; any strides.
        ids_keep: (B, L_keep) int32/int64, distinct per row (`random_masking`).
        pos_embed: optional (1, L, D), added to every row before the selection.
        deterministic: reduce d pos_embed in a fixed order instead of with atomics (CUDA).
            None follows `torch.are_deterministic_algorithms_enabled()`.
    Returns: (B, L_keep, D), dtype promoted over x and pos_embed.
    Gradients: x (zero on dropped rows) and pos_embed.
    """
    _check_gather(x, ids_keep, pos_embed)
    backend = choose_backend(x, ids_keep, pos_embed)
    if backend == "ref":
        return gather_tokens_ref(x, ids_keep, pos_embed)
    return GatherTokensFunction.apply(x, ids_keep, pos_embed, _deterministic(deterministic),
                                      backend)


def scatter_tokens(x_vis, ids_restore, mask_token, pos_embed=None, *, n_prefix=1,
                   deterministic=None):
    """Assemble the MAE decoder input: visible tokens back in place, mask_token elsewhere.

    Args:
        x_vis: (B, n_prefix + L_keep, D); the n_prefix leading (cls) rows stay in front.
        ids_restore: (B, L) int32/int64, a permutation per row (`random_masking`).
        mask_token: (1, 1, D) or (D,).
        pos_embed: optional (1, n_prefix + L, D), added last.
        n_prefix: number of leading rows passed through (1 = cls token, 0 = none).
        deterministic: see `gather_tokens`; reduces d pos_embed and d mask_token in fixed order.
    Returns: (B, n_prefix + L, D), dtype promoted over the inputs.
    Gradients: x_vis, mask_token and pos_embed.
    """
    _check_scatter(x_vis, ids_restore, mask_token, pos_embed, n_prefix)
    backend = choose_backend(x_vis, ids_restore, mask_token, pos_embed)
    if backend == "ref":
        return scatter_tokens_ref(x_vis, ids_restore, mask_token, pos_embed, n_prefix=n_prefix)
    return ScatterTokensFunction.apply(x_vis, ids_restore, mask_token, pos_embed, int(n_prefix),
                                       _deterministic(deterministic), backend)


def masked_patch_loss(pred, imgs, mask, patch_size, *, norm_pix=True):
    """MAE loss: per-patch pixel MSE against the (normalized) target, mean over masked patches.

    Args:
        pred: (B, L, p*p*C), patch vectors in (row, column, channel) order.
        imgs: (B, C, H, W), read in place by stride (no patchify copy); H, W multiples of p.
        mask: (B, L), 1 = removed (scored), 0 = kept; any real or bool dtype.
        patch_size: p.
        norm_pix: normalize each target patch by its mean and unbiased variance (+1e-6).
    Returns: scalar Σ mask·mse / max(Σ mask, 1) (fp32, or fp64 for fp64 inputs).
    Gradient: pred only (computed in the forward pass, zero on kept patches).
    """
    _check_loss(pred, imgs, mask, patch_size, norm_pix)
    backend = choose_backend(pred, imgs, mask)
    if backend == "ref":
        return masked_patch_loss_ref(pred, imgs, mask, patch_size, norm_pix=norm_pix)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    return MaskedPatchLossFunction.apply(pred, imgs, mask, int(patch_size), bool(norm_pix),
                                         need_grad, backend)
