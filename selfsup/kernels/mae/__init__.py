"""MAE masking kernels: random masking, token gather/scatter and the masked norm-pix loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2022). Shapes: B images, L
patches, L_keep = int(L·(1 − ratio)) visible, D width, p patch size, C channels,
P = p²·C pixels per patch, T = n_prefix + L decoder tokens.

Forward and gradients (every op is a row copy plus a column reduction):

- random_masking: ids_shuffle = argsort(noise); ids_keep = ids_shuffle[:, :L_keep];
  ids_restore = argsort(ids_shuffle); mask[b, l] = ids_restore[b, l] >= L_keep (1 = removed).
- gather_tokens: out[b, j] = x[b, k] + pos[k] with k = ids_keep[b, j].
  dx[b, k] = g[b, j] (dropped rows 0);  dpos[k] = Σ_b,j g[b, j] over ids_keep[b, j] = k.
- scatter_tokens: out[b, i] = x_vis[b, i] + pos[i] for i < n_prefix, and for l < L
  out[b, n_prefix + l] = (x_vis[b, n_prefix + k] if k < L_keep else mask_token) + pos[n_prefix + l]
  with k = ids_restore[b, l].  dx_vis = the visible rows of g;  d mask_token = Σ of the removed
  rows of g;  dpos = Σ_b g[b].
- masked_patch_loss: t = the image patch, vector order (row in patch, column, channel) as the
  official `patchify`; with norm_pix t = (t − mean)/sqrt(var_unbiased + 1e-6). Per patch
  mse = Σ (pred − t)²/P. loss = Σ_l mask·mse / max(Σ mask, 1), and
  d pred = 2·mask·(pred − t)/(P·max(Σ mask, 1)), zero on kept patches. The gradient is computed
  in the forward pass (the loss is a scalar); backward only scales it. No gradient to imgs.

Paths (`choose_backend`, ``SELFSUP_KERNELS`` forces one):

- "triton": one program per (image, block of rows) copies whole D-rows through loaded
  (B, L_keep) / (B, L) indices (int32 or int64), never a (B, L, D) index tensor. The backward
  scatters rows and reduces pos_embed / mask_token gradients with fp32 atomics, or, with
  ``deterministic=True`` (default: ``torch.are_deterministic_algorithms_enabled()``), with a
  fixed-order column sum over the batch and per-program partials summed by torch. The loss is one
  kernel reading pred and imgs by stride (no patchify copy), masked patches only.
  fp64 inputs compute in fp64 (tight float64 tests); everything else accumulates in fp32.
- "torch": the portable path, in the same custom ops as the kernels (`_ops.py`: fake impls and
  registered autograd, so torch.compile(fullgraph=True) traces them), few ops: row index_select /
  index_copy on flattened (B·L, D) rows, the loss over chunks of masked patches only, with its
  gradient written in the forward pass. Every reduction is deterministic on CPU; on CUDA
  ``deterministic=True`` swaps index_add_ (atomics) for a batch sum.
- "ref": the paper's code, below; the test oracle and the benchmark baseline.

Contract shared by the fused paths: ids_keep rows are distinct and ids_restore rows are
permutations of 0..L-1 (what random_masking returns). Index values are range-checked for CPU
inputs only (a check on CUDA would synchronize). Mixed float dtypes are promoted like torch
(autocast: bf16 activations + fp32 pos_embed / mask_token give fp32 outputs); gradients come
back in each input's own dtype.
"""

from __future__ import annotations

from ._api import gather_tokens, masked_patch_loss, scatter_tokens
from ._checks import INDEX_DTYPES
from ._launch import (  # the launchers, as before the split (explicit re-exports)
    gather_tokens_bwd as gather_tokens_bwd,
    gather_tokens_fwd as gather_tokens_fwd,
    masked_patch_loss_fwd as masked_patch_loss_fwd,
    scatter_tokens_bwd as scatter_tokens_bwd,
    scatter_tokens_fwd as scatter_tokens_fwd,
)
from ._ref import (
    NORM_PIX_EPS,
    gather_tokens_ref,
    masked_patch_loss_ref,
    patchify,
    random_masking,
    scatter_tokens_ref,
    unpatchify,
)

__all__ = [
    "INDEX_DTYPES",
    "NORM_PIX_EPS",
    "gather_tokens",
    "gather_tokens_ref",
    "masked_patch_loss",
    "masked_patch_loss_ref",
    "patchify",
    "random_masking",
    "scatter_tokens",
    "scatter_tokens_ref",
    "unpatchify",
]
