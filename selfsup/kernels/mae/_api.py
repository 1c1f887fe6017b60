"""The public MAE ops: validation, dispatch, then the custom ops of `_ops.py`."""

from __future__ import annotations

import torch

from .._utils import choose_backend
from ._checks import _check_gather, _check_loss, _check_scatter, _deterministic
from ._ops import _gather_fwd_op, _loss_fwd_op, _scatter_fwd_op
from ._ref import gather_tokens_ref, masked_patch_loss_ref, scatter_tokens_ref


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
    return _gather_fwd_op(x, ids_keep, pos_embed, _deterministic(deterministic), backend)


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
    return _scatter_fwd_op(x_vis, ids_restore, mask_token, pos_embed, int(n_prefix),
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
    return _loss_fwd_op(pred, imgs, mask, int(patch_size), bool(norm_pix), need_grad,
                        backend)[0]
