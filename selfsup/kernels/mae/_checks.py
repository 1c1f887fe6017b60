"""Input validation for the MAE ops (ValueError naming the argument) and small dtype helpers."""

from __future__ import annotations

import numbers

import torch

from .._utils import check_same_device, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)


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
    # The range check reads the indices back: free for CPU tensors, but on an accelerator a
    # host synchronization inside every op, so it is skipped there (no .item(), no min/max
    # read). In-range ids on CUDA are the caller's contract; random_masking's are by
    # construction, and an out-of-range id is caught by the CPU tests of the same code.
    # Under torch.compile the values cannot be read while tracing: the op body checks them
    # (`_ops.py`), where they are real tensors.
    if upper is not None and not torch.compiler.is_compiling():
        _check_ids_range(name, ids, upper)


def _check_ids_range(name, ids, upper):
    """ValueError unless the CPU tensor `ids` lies in [0, upper) (accelerator ids: skipped)."""
    if ids.device.type == "cpu" and ids.numel():
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


def grad_buffer_dtype(dtype):
    """The dtype the loss writes d pred in: fp32 for fp16/bf16. The forward cannot know the
    upstream gradient, and 2 w d / (P n) is ~3e-7 at MAE-B, fp16-subnormal: rounded to fp16
    before GradScaler's 65536 arrived, 6% of the entries were 0 and the mean relative error
    15% (docs/kernels-mae.md). Backward multiplies in fp32 and rounds once."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
