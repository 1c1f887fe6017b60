"""MAE references, written like the paper's code: the test oracle and benchmark baseline.

Also the index and patch helpers every path shares (`random_masking`, `patchify`,
`unpatchify`). See the package docstring for the algebra.
"""

from __future__ import annotations

import numbers

import torch

from .._utils import check_tensor
from ._checks import _check_masking, _check_patch_size

NORM_PIX_EPS = 1.0e-6


# ============================================================================ references
def random_masking(batch, length, mask_ratio, *, device=None, generator=None, noise=None):
    """Per-sample random masking by argsort of uniform noise, exactly as the official MAE.

    Args: batch B, length L, mask_ratio in [0, 1); noise (B, L) replaces torch.rand when given.
    Returns: ids_keep (B, L_keep) int64, ids_restore (B, L) int64,
    mask (B, L) float32 with 0 = kept, 1 = removed, in the original order.
    """
    _check_masking(batch, length, mask_ratio, device, noise)
    if noise is None:
        noise = torch.rand(batch, length, device=device, generator=generator)  # U(0, 1)
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # unshuffle: 0 kept, 1 removed
    return ids_keep, ids_restore, mask


def patchify(imgs, patch_size):
    """(B, C, H, W) -> (B, L, p*p*C), patch vector order (row, column, channel)."""
    check_tensor("imgs", imgs, ndim=4, dtypes=None)
    _check_patch_size(patch_size, imgs.shape[-2:])
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, patch_size, *, image_size=None):
    """(B, L, p*p*C) -> (B, C, H, W); image_size (H, W) defaults to a square grid."""
    check_tensor("x", x, ndim=3, dtypes=None)
    b, n, d = x.shape
    p = patch_size
    if not isinstance(p, numbers.Integral) or p < 1 or d % (p * p):
        raise ValueError(f"patch_size must be a positive int with p*p dividing x.shape[-1]={d}, "
                         f"got {p!r}")
    if image_size is None:
        gh = gw = int(round(n ** 0.5))
    else:
        gh, gw = image_size[0] // p, image_size[1] // p
    if gh * gw != n:
        raise ValueError(f"image_size {image_size} with patch {p} does not hold {n} patches")
    c = d // (p * p)
    x = x.reshape(b, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, gh * p, gw * p)


def gather_tokens_ref(x, ids_keep, pos_embed=None):
    if pos_embed is not None:
        x = x + pos_embed  # reads BLD + LD, writes BLD: pos on every token, 75% then dropped
    # the expanded int64 index is a view; gather writes B·L_keep·D
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_ref(x_vis, ids_restore, mask_token, pos_embed=None, *, n_prefix=1):
    b, _, d = x_vis.shape
    length = ids_restore.shape[1]
    n_mask = length + n_prefix - x_vis.shape[1]
    # cat writes B·L·D (visible rows + mask-token copies), gather another B·L·D
    tokens = torch.cat([x_vis[:, n_prefix:], mask_token.reshape(1, 1, d).expand(b, n_mask, d)], 1)
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    out = torch.cat([x_vis[:, :n_prefix], tokens], 1)  # writes B·T·D
    return out + pos_embed if pos_embed is not None else out  # reads and writes B·T·D


def masked_patch_loss_ref(pred, imgs, mask, patch_size, *, norm_pix=True):
    target = patchify(imgs, patch_size)  # copies every pixel (B·L·P)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5  # two more B·L·P passes
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L): every patch, kept ones included
    return (loss * mask).sum() / mask.sum().clamp_min(1)
