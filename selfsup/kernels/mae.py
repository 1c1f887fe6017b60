"""MAE masking kernels: random masking, token gather/scatter, the masked norm-pix loss.

SCAFFOLD (lead): the references and the public API; the portable and Triton paths are being
written. Shapes: B images, L patches, L_keep visible, D width, p patch size.
"""

from __future__ import annotations

import torch


def random_masking(batch, length, mask_ratio, *, device=None, generator=None, noise=None):
    """(ids_keep (B, L_keep), ids_restore (B, L), mask (B, L): 0 kept, 1 removed)."""
    if noise is None:
        noise = torch.rand(batch, length, device=device, generator=generator)
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def patchify(imgs, patch_size):
    """(B, C, H, W) -> (B, L, p*p*C), patch vector order (row, column, channel)."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, patch_size, *, image_size=None):
    """(B, L, p*p*C) -> (B, C, H, W); image_size (H, W) defaults to a square grid."""
    b, n, d = x.shape
    p = patch_size
    if image_size is None:
        gh = gw = int(round(n ** 0.5))
    else:
        gh, gw = image_size[0] // p, image_size[1] // p
    c = d // (p * p)
    x = x.reshape(b, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, gh * p, gw * p)


def gather_tokens_ref(x, ids_keep, pos_embed=None):
    if pos_embed is not None:
        x = x + pos_embed
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_ref(x_vis, ids_restore, mask_token, pos_embed=None, *, n_prefix=1):
    b, _, d = x_vis.shape
    length = ids_restore.shape[1]
    n_mask = length + n_prefix - x_vis.shape[1]
    tokens = torch.cat([x_vis[:, n_prefix:], mask_token.reshape(1, 1, d).expand(b, n_mask, d)], 1)
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    out = torch.cat([x_vis[:, :n_prefix], tokens], 1)
    return out + pos_embed if pos_embed is not None else out


def masked_patch_loss_ref(pred, imgs, mask, patch_size, *, norm_pix=True):
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def gather_tokens(x, ids_keep, pos_embed=None):
    return gather_tokens_ref(x, ids_keep, pos_embed)


def scatter_tokens(x_vis, ids_restore, mask_token, pos_embed=None, *, n_prefix=1):
    return scatter_tokens_ref(x_vis, ids_restore, mask_token, pos_embed, n_prefix=n_prefix)


def masked_patch_loss(pred, imgs, mask, patch_size, *, norm_pix=True):
    return masked_patch_loss_ref(pred, imgs, mask, patch_size, norm_pix=norm_pix)
