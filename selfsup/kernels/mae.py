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
- "torch": the portable path, custom autograd.Functions of few ops: row index_select /
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

import numbers

import torch

from ._registry import KernelConfig, register_kernel
from ._triton import tl, triton
from ._utils import cdiv, check_same_device, check_tensor, choose_backend, next_power_of_2

NORM_PIX_EPS = 1.0e-6
INDEX_DTYPES = (torch.int32, torch.int64)


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


# ============================================================================ validation
def _check_masking(batch, length, mask_ratio, device, noise):
    for name, v in (("batch", batch), ("length", length)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if (not isinstance(mask_ratio, numbers.Real) or isinstance(mask_ratio, bool)
            or not 0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    if noise is not None:
        check_tensor("noise", noise, ndim=2)
        if tuple(noise.shape) != (batch, length):
            raise ValueError(f"noise must have shape (batch, length) = ({batch}, {length}), "
                             f"got {tuple(noise.shape)}")
        if device is not None and not _same_device(torch.device(device), noise.device):
            raise ValueError(f"device {device} differs from noise's device {noise.device}")


def _same_device(a, b):
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_patch_size(p, hw):
    if not isinstance(p, numbers.Integral) or isinstance(p, bool) or p < 1:
        raise ValueError(f"patch_size must be a positive int, got {p!r}")
    h, w = int(hw[0]), int(hw[1])
    if h % p or w % p:
        raise ValueError(f"patch_size {p} must divide the image height and width, got {h}x{w}")


def _check_ids(name, ids, batch, max_cols=None, upper=None):
    check_tensor(name, ids, ndim=2, dtypes=INDEX_DTYPES)
    if ids.shape[0] != batch:
        raise ValueError(f"{name} must have {batch} rows (the batch), got shape {tuple(ids.shape)}")
    if max_cols is not None and ids.shape[1] > max_cols:
        raise ValueError(f"{name} has {ids.shape[1]} columns, more than the {max_cols} tokens")
    # a range check reads the indices back: free on CPU, a synchronization on CUDA (skipped)
    if upper is not None and ids.device.type == "cpu" and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} values must lie in [0, {upper}), got [{lo}, {hi}]")


def _check_pos(pos_embed, rows, d):
    if pos_embed is None:
        return
    check_tensor("pos_embed", pos_embed, ndim=3)
    if tuple(pos_embed.shape) != (1, rows, d):
        raise ValueError(f"pos_embed must have shape (1, {rows}, {d}), "
                         f"got {tuple(pos_embed.shape)}")


def _check_gather(x, ids_keep, pos_embed):
    check_tensor("x", x, ndim=3)
    b, length, d = x.shape
    _check_ids("ids_keep", ids_keep, b, max_cols=length, upper=length)
    _check_pos(pos_embed, length, d)
    check_same_device(x=x, ids_keep=ids_keep, pos_embed=pos_embed)


def _check_scatter(x_vis, ids_restore, mask_token, pos_embed, n_prefix):
    check_tensor("x_vis", x_vis, ndim=3)
    b, s, d = x_vis.shape
    if not isinstance(n_prefix, numbers.Integral) or isinstance(n_prefix, bool) or n_prefix < 0:
        raise ValueError(f"n_prefix must be an int >= 0, got {n_prefix!r}")
    if n_prefix > s:
        raise ValueError(f"n_prefix={n_prefix} exceeds the {s} rows of x_vis")
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
    length = ids_restore.shape[1]
    if s - n_prefix > length:
        raise ValueError(f"x_vis has {s - n_prefix} visible rows, more than ids_restore's "
                         f"{length} positions")
    _check_ids("ids_restore", ids_restore, b, upper=length)
    check_tensor("mask_token", mask_token, ndim=(1, 3))
    if mask_token.numel() != d or mask_token.shape[-1] != d:
        raise ValueError(f"mask_token must have shape (1, 1, {d}) or ({d},), "
                         f"got {tuple(mask_token.shape)}")
    _check_pos(pos_embed, n_prefix + length, d)
    check_same_device(x_vis=x_vis, ids_restore=ids_restore, mask_token=mask_token,
                      pos_embed=pos_embed)


def _check_loss(pred, imgs, mask, patch_size, norm_pix):
    check_tensor("pred", pred, ndim=3)
    check_tensor("imgs", imgs, ndim=4)
    check_tensor("mask", mask, ndim=2, dtypes=None)
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be a real or bool tensor, got {mask.dtype}")
    b, c, h, w = imgs.shape
    _check_patch_size(patch_size, (h, w))
    length, dim = (h // patch_size) * (w // patch_size), patch_size * patch_size * c
    if pred.shape[0] != b or pred.shape[1] != length:
        raise ValueError(f"pred must have shape (B={b}, L={length}, p*p*C={dim}) for imgs of "
                         f"shape {tuple(imgs.shape)} and patch {patch_size}, "
                         f"got {tuple(pred.shape)}")
    if pred.shape[2] != dim:
        raise ValueError(f"pred's last dim must be p*p*C = {dim}, got {pred.shape[2]}")
    if tuple(mask.shape) != (b, length):
        raise ValueError(f"mask must have shape ({b}, {length}), got {tuple(mask.shape)}")
    if norm_pix and dim < 2:
        raise ValueError("norm_pix needs at least 2 pixels per patch (p*p*C >= 2) for the "
                         f"unbiased variance; got patch_size={patch_size} with {c} channel")
    check_same_device(pred=pred, imgs=imgs, mask=mask)


def _acc_dtype(*dtypes):
    """fp64 when any input is fp64 (exact tests), else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _rowmajor(t):
    """`t` itself when its last dim is contiguous (what the kernels assume), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _deterministic(flag):
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


# ============================================================================ Triton kernels
# Shared conventions: program (b, row block); whole D-rows move in BLOCK_D column chunks; row
# offsets are int64 (row × stride overflows int32 at ViT-H batch sizes); the accumulation dtype
# is fp64 when the output/accumulator pointer is fp64, else fp32 (bf16 math is upcast).
@triton.jit
def _gather_tokens_fwd_kernel(
    # pointers: x (B, L, D), ids (B, L_keep) int32|int64, pos (L, D) rows, out (B, L_keep, D)
    x_ptr, ids_ptr, pos_ptr, out_ptr,
    # shapes
    L_KEEP, D,
    # strides, in elements (pos and out rows are contiguous; x may be transposed)
    stride_xb, stride_xl, stride_xd, stride_ib, stride_pl, stride_ob, stride_ol,
    # meta
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[b, j, :] = x[b, k, :] + pos[k, :],  k = ids[b, j]
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < L_KEEP
    k = tl.load(ids_ptr + b * stride_ib + rows, mask=rmask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + b * stride_xb + k[:, None] * stride_xl
    p_rows = pos_ptr + k[:, None] * stride_pl
    o_rows = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_ol
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        v = tl.load(x_rows + c[None, :] * stride_xd, mask=m, other=0).to(ACC)
        if HAS_POS:
            v += tl.load(p_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(o_rows + c[None, :], v, mask=m)  # cast to out's dtype on store


_TOKEN_CONSTS = {"BLOCK_R": 4, "BLOCK_D": 512}
register_kernel(
    _gather_tokens_fwd_kernel,
    signature={"x_ptr": "*{xt}", "ids_ptr": "*i64", "pos_ptr": "*{pt}", "out_ptr": "*{ot}",
               "L_KEEP": "i32", "D": "i32", "stride_xb": "i32", "stride_xl": "i32",
               "stride_xd": "i32", "stride_ib": "i32", "stride_pl": "i32", "stride_ob": "i32",
               "stride_ol": "i32", "HAS_POS": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_D": "constexpr"},
    configs=[
        KernelConfig("fp32 R4 D512", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "fp32", "pt": "fp32", "ot": "fp32"}, num_warps=4,
                     default=True),
        KernelConfig("amp bf16 x + fp32 pos", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "bf16", "pt": "fp32", "ot": "fp32"}, num_warps=4),
    ],
)


@triton.jit
def _gather_tokens_bwd_kernel(
    # pointers: g (B, L_keep, D), ids (B, L_keep), dx (B, L, D) zero-filled, dpos (L, D) acc
    g_ptr, ids_ptr, dx_ptr, dpos_ptr,
    # shapes
    L_KEEP, D,
    # strides (g rows contiguous; dx and dpos are ours, contiguous)
    stride_gb, stride_gl, stride_ib, stride_dxb, stride_dxl, stride_dpl,
    # meta
    POS_ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx[b, k, :] = g[b, j, :] (rows of ids_keep are distinct: plain stores); dropped rows keep
    # the launcher's zeros.  dpos[k, :] += g[b, j, :] with fp32 atomics (<= B adds per row).
    ACC: tl.constexpr = tl.float64 if dpos_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < L_KEEP
    k = tl.load(ids_ptr + b * stride_ib + rows, mask=rmask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    g_rows = g_ptr + b * stride_gb + rows[:, None].to(tl.int64) * stride_gl
    dx_rows = dx_ptr + b * stride_dxb + k[:, None] * stride_dxl
    dp_rows = dpos_ptr + k[:, None] * stride_dpl
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        g = tl.load(g_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(dx_rows + c[None, :], g, mask=m)
        if POS_ATOMIC:
            tl.atomic_add(dp_rows + c[None, :], g, mask=m)


register_kernel(
    _gather_tokens_bwd_kernel,
    signature={"g_ptr": "*{gt}", "ids_ptr": "*i64", "dx_ptr": "*{xt}", "dpos_ptr": "*fp32",
               "L_KEEP": "i32", "D": "i32", "stride_gb": "i32", "stride_gl": "i32",
               "stride_ib": "i32", "stride_dxb": "i32", "stride_dxl": "i32",
               "stride_dpl": "i32", "POS_ATOMIC": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_D": "constexpr"},
    configs=[KernelConfig("fp32 R4 D512 atomics", {"POS_ATOMIC": True, **_TOKEN_CONSTS},
                          types={"gt": "fp32", "xt": "fp32"}, num_warps=4, default=True)],
)


@triton.jit
def _scatter_tokens_fwd_kernel(
    # pointers: x_vis (B, S, D), ids_restore (B, L), mask_token (D,), pos (T, D), out (B, T, D)
    x_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr,
    # shapes: T = N_PREFIX + L output rows, L_KEEP = S − N_PREFIX visible rows
    T, L_KEEP, N_PREFIX, D,
    # strides (all rows contiguous)
    stride_xb, stride_xl, stride_ib, stride_pl, stride_ob, stride_ol,
    # meta
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # row r < N_PREFIX copies x_vis[b, r]; row N_PREFIX + l reads k = ids_restore[b, l]:
    # x_vis[b, N_PREFIX + k] if k < L_KEEP, else the mask token; then + pos[r].
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < T
    body = rows >= N_PREFIX
    k = tl.load(ids_ptr + b * stride_ib + (rows - N_PREFIX), mask=rmask & body, other=0)
    k = k.to(tl.int64)
    vis = rmask & ((~body) | ((k >= 0) & (k < L_KEEP)))
    src = tl.where(body, N_PREFIX + k, rows.to(tl.int64))  # row of x_vis
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + b * stride_xb + src[:, None] * stride_xl
    p_rows = pos_ptr + rows[:, None].to(tl.int64) * stride_pl
    o_rows = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_ol
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        m = rmask[:, None] & cm[None, :]
        v = tl.load(x_rows + c[None, :], mask=vis[:, None] & cm[None, :], other=0).to(ACC)
        t = tl.load(tok_ptr + c, mask=cm, other=0).to(ACC)
        v = tl.where(vis[:, None], v, t[None, :])
        if HAS_POS:
            v += tl.load(p_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(o_rows + c[None, :], v, mask=m)


register_kernel(
    _scatter_tokens_fwd_kernel,
    signature={"x_ptr": "*{xt}", "ids_ptr": "*i64", "tok_ptr": "*{pt}", "pos_ptr": "*{pt}",
               "out_ptr": "*{ot}", "T": "i32", "L_KEEP": "i32", "N_PREFIX": "i32", "D": "i32",
               "stride_xb": "i32", "stride_xl": "i32", "stride_ib": "i32", "stride_pl": "i32",
               "stride_ob": "i32", "stride_ol": "i32", "HAS_POS": "constexpr",
               "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=[
        KernelConfig("fp32 R4 D512", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "fp32", "pt": "fp32", "ot": "fp32"}, num_warps=4,
                     default=True),
        KernelConfig("amp bf16 x + fp32 token/pos", {"HAS_POS": True, **_TOKEN_CONSTS},
                     types={"xt": "bf16", "pt": "fp32", "ot": "fp32"}, num_warps=4),
    ],
)


@triton.jit
def _scatter_tokens_bwd_kernel(
    # pointers: g (B, T, D), ids_restore (B, L), dx_vis (B, S, D) zero-filled,
    # dtok (D,) acc [atomics] or (programs, D) partials [deterministic], dpos (T, D) acc
    g_ptr, ids_ptr, dx_ptr, dtok_ptr, dpos_ptr,
    # shapes
    T, L_KEEP, N_PREFIX, D,
    # strides (all rows contiguous)
    stride_gb, stride_gl, stride_ib, stride_dxb, stride_dxl, stride_dpl,
    # meta
    POS_ATOMIC: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx_vis[b, src(r)] = g[b, r] on visible rows; d mask_token = Σ_removed rows g[b, r], summed
    # per program in registers, then one atomic (or one partial row) per program and chunk;
    # dpos[r] += g[b, r] with atomics (B adds per row) unless the launcher column-sums g.
    ACC: tl.constexpr = tl.float64 if dpos_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < T
    body = rows >= N_PREFIX
    k = tl.load(ids_ptr + b * stride_ib + (rows - N_PREFIX), mask=rmask & body, other=0)
    k = k.to(tl.int64)
    vis = rmask & ((~body) | ((k >= 0) & (k < L_KEEP)))
    removed = rmask & ~vis
    src = tl.where(body, N_PREFIX + k, rows.to(tl.int64))
    cols = tl.arange(0, BLOCK_D)
    g_rows = g_ptr + b * stride_gb + rows[:, None].to(tl.int64) * stride_gl
    dx_rows = dx_ptr + b * stride_dxb + src[:, None] * stride_dxl
    dp_rows = dpos_ptr + rows[:, None].to(tl.int64) * stride_dpl
    part = dtok_ptr + (b * tl.num_programs(1) + rb) * D  # this program's partial row
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        m = rmask[:, None] & cm[None, :]
        g = tl.load(g_rows + c[None, :], mask=m, other=0).to(ACC)
        tl.store(dx_rows + c[None, :], g, mask=vis[:, None] & cm[None, :])
        tok = tl.sum(tl.where(removed[:, None], g, 0.0), axis=0)  # (BLOCK_D,)
        if DETERMINISTIC:
            tl.store(part + c, tok, mask=cm)
        else:
            tl.atomic_add(dtok_ptr + c, tok, mask=cm)
        if POS_ATOMIC:
            tl.atomic_add(dp_rows + c[None, :], g, mask=m)


register_kernel(
    _scatter_tokens_bwd_kernel,
    signature={"g_ptr": "*{gt}", "ids_ptr": "*i64", "dx_ptr": "*{xt}", "dtok_ptr": "*fp32",
               "dpos_ptr": "*fp32", "T": "i32", "L_KEEP": "i32", "N_PREFIX": "i32", "D": "i32",
               "stride_gb": "i32", "stride_gl": "i32", "stride_ib": "i32", "stride_dxb": "i32",
               "stride_dxl": "i32", "stride_dpl": "i32", "POS_ATOMIC": "constexpr",
               "DETERMINISTIC": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=[KernelConfig("fp32 R4 D512 atomics",
                          {"POS_ATOMIC": True, "DETERMINISTIC": False, **_TOKEN_CONSTS},
                          types={"gt": "fp32", "xt": "fp32"}, num_warps=4, default=True)],
)


@triton.jit
def _sum_over_batch_kernel(
    # pointers: src (B, R, D) rows contiguous, dst (R, D) acc
    src_ptr, dst_ptr,
    # shapes and strides
    B, R, D, stride_sb, stride_sr, stride_dr,
    # meta
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dst[r, d] = Σ_b src[b, r, d] in the fixed order b = 0..B−1: the deterministic column
    # reduction for d pos_embed (no atomics, same bits every run).
    ACC: tl.constexpr = tl.float64 if dst_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (rows < R)[:, None] & (cols < D)[None, :]
    src = src_ptr + rows[:, None].to(tl.int64) * stride_sr + cols[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for _ in range(0, B):
        acc += tl.load(src, mask=m, other=0).to(ACC)
        src += stride_sb  # 64-bit pointer step: b·stride never overflows int32
    tl.store(dst_ptr + rows[:, None].to(tl.int64) * stride_dr + cols[None, :], acc, mask=m)


register_kernel(
    _sum_over_batch_kernel,
    signature={"src_ptr": "*fp32", "dst_ptr": "*fp32", "B": "i32", "R": "i32", "D": "i32",
               "stride_sb": "i32", "stride_sr": "i32", "stride_dr": "i32",
               "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
    configs=[KernelConfig("fp32 R4 D128", {"BLOCK_R": 4, "BLOCK_D": 128}, num_warps=4,
                          default=True)],
    hot=False,  # only on the deterministic path
)


@triton.jit
def _masked_patch_loss_kernel(
    # pointers: pred (B, L, P), imgs (B, C, H, W), mask (B·L,) acc, denom (1,) acc,
    # grad (B·L, P) pred dtype, loss (B·L,) acc per-patch partials
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
    # no loads (masked off) and store zero gradients.
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


def _loss_cfg(label, p, c, pt="fp32", default=False):
    bp = next_power_of_2(p * p * c)
    return KernelConfig(label, {"PATCH": p, "CHANNELS": c, "NORM_PIX": True, "WRITE_GRAD": True,
                                "BLOCK_M": _loss_block_m(bp), "BLOCK_P": bp},
                        types={"pt": pt, "it": "fp32"}, num_warps=_loss_warps(bp),
                        default=default)


def _loss_block_m(block_p):
    return max(1, min(128, 2048 // block_p))  # ~2048 pixels per program


def _loss_warps(block_p):
    return 4 if block_p * _loss_block_m(block_p) <= 2048 else 8


register_kernel(
    _masked_patch_loss_kernel,
    signature={"pred_ptr": "*{pt}", "img_ptr": "*{it}", "mask_ptr": "*fp32",
               "denom_ptr": "*fp32", "grad_ptr": "*{pt}", "loss_ptr": "*fp32", "N": "i32",
               "L": "i32", "GW": "i32", "stride_pb": "i32", "stride_pl": "i32",
               "stride_ib": "i32", "stride_ic": "i32", "stride_ih": "i32", "stride_iw": "i32",
               "PATCH": "constexpr", "CHANNELS": "constexpr", "NORM_PIX": "constexpr",
               "WRITE_GRAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_P": "constexpr"},
    configs=[
        _loss_cfg("fp32 p16 C3 norm_pix", 16, 3, default=True),
        _loss_cfg("amp bf16 pred p16 C3 norm_pix", 16, 3, pt="bf16"),
        _loss_cfg("fp32 p14 C3 norm_pix (ViT-H)", 14, 3),
    ],
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
        grad = torch.empty(b * length, p_dim, device=pred.device, dtype=pred.dtype)
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
            grad.index_copy_(0, rows[i:j], diff.mul_(scale[i:j]).to(pred.dtype))
    loss = torch.dot(sq.square_(), w_rows) / (p_dim * denom)
    return loss, (grad.view(b, length, p_dim) if need_grad else None)


# ============================================================================ autograd
class GatherTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed, deterministic, backend):
        fwd = gather_tokens_fwd if backend == "triton" else _gather_fwd_torch
        ctx.save_for_backward(ids_keep)
        ctx.meta = (x.shape, x.dtype, None if pos_embed is None else pos_embed.dtype,
                    deterministic, backend)
        return fwd(x, ids_keep, pos_embed)

    @staticmethod
    def backward(ctx, g):
        (ids_keep,) = ctx.saved_tensors
        x_shape, x_dtype, pos_dtype, det, backend = ctx.meta
        need_pos = pos_dtype is not None and ctx.needs_input_grad[2]
        bwd = gather_tokens_bwd if backend == "triton" else _gather_bwd_torch
        dx, dpos = bwd(g, ids_keep, x_shape, x_dtype, pos_dtype, need_pos, det)
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
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        # The first backward scales the saved gradient in place: no second (B, L, P) buffer
        # (on CPU a fresh buffer's page faults cost as much as the whole scaling pass). `.data`
        # keeps autograd's version counter unchanged, so a repeated backward through a retained
        # graph (gradcheck, retain_graph=True) can undo the first upstream by a ratio.
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
