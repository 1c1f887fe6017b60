"""Fused iBOT patch loss: DINO's tempered softmax cross-entropy per masked patch token.

Zhou et al. 2022 (iBOT), masked image modelling with an online tokenizer; DINOv2 (Oquab et al.
2023) applies the patch head to the masked tokens only. Shapes: B images of N patch tokens,
K prototypes (65536 in DINOv2 ViT-L), mask (B, N) bool (True = masked for the student),
n_b = masked tokens of image b, M = sum_b n_b.

    student S, teacher T: (B, N, K) every token (iBOT), or (M, K) the masked tokens in
                          row-major mask order (DINOv2: mask.nonzero() order)
    P_j   = softmax((T_j - c) / tau_t)   (center c), or T_j itself (center None: the teacher
                                          already gives probabilities, e.g. Sinkhorn-Knopp)
    x_j   = S_j / tau_s,  LSE_j = logsumexp(x_j),  w_j = 1 / (B max(n_b(j), 1))
    loss  = sum_{masked j} w_j [ (sum_k P_j,k) LSE_j - <P_j, x_j> ]
    dS_j  = w_j [ (sum_k P_j,k) softmax(x_j) - P_j ] / tau_s   (times the upstream gradient)

(sum_k P = 1 for a softmax; kept for the probabilities mode, where it is whatever the caller
gives.) It is DINO's per-row math (`dino_loss.py`) with two differences: every row has its
own weight (an image with fewer masked tokens weighs each more; one with none adds 0 but
counts in B, iBOT's and DINOv2's normalisation) and there is no view pairing, so student row j
meets teacher row j only.

Both layouts become one row problem: rows (R, K) with weights w (R',) and, optionally, row
indices (R',) into them. The (M, K) layout has no indices (R' = R = M). The (B, N, K) layout
with a host mask takes the flat indices of the masked tokens (computed on the host: free, and
the kernels touch only those rows; the gradient's other rows are zeros); with a device mask
it has no indices and w = 0 on unmasked rows (reading which rows are masked would be a
device->host sync), so the kernels mask those rows' loads but still launch over all B*N rows.

Paths (`choose_backend`; SELFSUP_KERNELS forces one):
- "triton": three tile-parallel kernels. The forward takes, per (rows, column tile), the
  teacher's tile partials (max m, sum l = sum e^(z-m), a = sum e^(z-m)(z-m), and
  d = sum e^(z-m) x, unnormalised) and the student's (max, sum of exponentials), so no
  teacher-stats pass is needed before it: <P, x> = sum_j e^(m_j - M) d_j / L merges like the
  LSE itself (flash-decoding style, `dino_loss._merge_lse`). It also reduces the teacher's
  column sums for the center over its rows. A finish kernel merges the partials into row
  LSEs, the teacher entropy and the weighted loss terms; the backward recomputes dS from S,
  T and the two saved row LSEs (no dS buffer between the passes; the upstream gradient meets
  dS in fp32 before its one rounding, so GradScaler's 65536 keeps the ~1e-9 entries that
  fp16 would flush). No host sync: temperatures and the upstream gradient are device memory.
- "torch": the same algebra over blocks of rows (TORCH_BLOCK_ROWS); each block is scaled,
  soft-maxed and turned into its dS rows, so at most one block of fp32 probabilities exists
  at once. Peak extra memory = dS (fp32 for fp16 inputs, else the input dtype) + ~3 blocks.
  Backward scales that dS (`_custom_op.scaled_grad_buffer`), like DINO's portable path.
- "ref": `ibot_patch_loss_ref`, the formula written like the papers (the oracle).
Both fused paths run inside the custom ops ``torch.ops.selfsup.ibot_loss_fwd`` /
``ibot_loss_bwd`` (fake implementations, registered autograd), so torch.compile(fullgraph=True)
traces them. A temperature that changes per step is best a 0-d tensor (a float recompiles).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from . import _ibot_triton
from ._custom_op import (
    fused_op,
    join_temperature,
    placeholder,
    save_grad_buffer,
    scaled_grad_buffer,
    split_temperature,
)
from ._utils import check_same_device, check_tensor, choose_backend, compute_dtype
from .dino_loss import LOWP, _LOG_SOFTMAX_OUT, _exp_floor, _softmax_, _temperature, _unit_cols


# ----------------------------------------------------------------------------- reference
def ibot_patch_loss_ref(student_patches, teacher_patches, mask, center, *, student_temp=0.1,
                        teacher_temp=0.07):
    """The loss as the papers write it: a cross-entropy per token, a masked mean per image,
    a mean over images. Materialises (tokens, K) probabilities: the oracle, not for training."""
    acc = compute_dtype(student_patches.dtype)
    s, t = student_patches.to(acc), teacher_patches.to(acc).detach()
    if center is None:
        probs = t
    else:
        probs = F.softmax((t - center.to(acc).reshape(-1)) / teacher_temp, -1)
    ce = -(probs * F.log_softmax(s / student_temp, -1)).sum(-1)  # one per token (row)
    m = mask.to(device=ce.device)
    n_b = m.sum(1).clamp(min=1).to(acc)  # an image without a masked token: 0 / 1
    if ce.dim() == 2:  # iBOT: every token's loss, kept where masked
        per_image = (ce * m).sum(1) / n_b
        return per_image.mean()
    # DINOv2: the head ran on the masked tokens only; row j belongs to image img[j]
    img = m.nonzero()[:, 0]
    return (ce / n_b[img]).sum() / m.shape[0]


# ----------------------------------------------------------------------------- validation
def _host_mask(mask):
    """Whether the mask may be read on the host: host memory (no device sync), and not
    while torch.compile traces (nonzero's data-dependent shape would break the graph; the
    device routes below have static shapes). Tests patch this to run the device routes on
    CPU tensors."""
    return mask.device.type == "cpu" and not torch.compiler.is_compiling()


def _validate(student_patches, teacher_patches, mask, center, student_temp, teacher_temp):
    """Check the inputs; return (tau_s, tau_t) or raise ValueError naming the argument."""
    s = check_tensor("student_patches", student_patches, ndim=(2, 3))
    t = check_tensor("teacher_patches", teacher_patches, ndim=(2, 3))
    m = check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    if t.shape != s.shape:
        raise ValueError(f"teacher_patches must have student_patches' shape {tuple(s.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_patches must have student_patches' dtype {s.dtype}, got "
                         f"{t.dtype}")
    k = s.shape[-1]
    if k < 1 or m.shape[0] < 1:
        raise ValueError(f"student_patches must have K >= 1 columns and mask B >= 1 rows, got "
                         f"shapes {tuple(s.shape)} and {tuple(m.shape)}")
    if s.dim() == 3 and tuple(m.shape) != tuple(s.shape[:2]):
        raise ValueError(f"mask must have shape (B, N) = {tuple(s.shape[:2])} like "
                         f"student_patches (B, N, K), got {tuple(m.shape)}")
    if s.dim() == 2 and _host_mask(m):  # a host mask: counting is free
        n = int(m.sum())
        if n != s.shape[0]:
            raise ValueError(f"student_patches (M, K) must have M = mask.sum() = {n} rows "
                             f"(the masked tokens), got {s.shape[0]}")
    check_same_device(student_patches=s, teacher_patches=t)
    if m.device.type != "cpu" and m.device != s.device:
        raise ValueError(f"mask must be on the CPU or on the logits' device {s.device}, got "
                         f"{m.device}")
    ts = _temperature("student_temp", student_temp, s)
    tt = None
    if center is not None:
        c = check_tensor("center", center, ndim=(1, 2))
        if c.shape[-1] != k or (c.dim() == 2 and c.shape[0] != 1):
            raise ValueError(f"center must have shape (1, {k}) or ({k},), got {tuple(c.shape)}")
        check_same_device(student_patches=s, center=c)
        if c.dtype != s.dtype and not (c.dtype == torch.float32 and s.dtype in LOWP):
            raise ValueError(f"center must have the logits' dtype {s.dtype} (or float32 with "
                             f"fp16/bf16 logits), got {c.dtype}")
        tt = _temperature("teacher_temp", teacher_temp, s)
    return ts, tt


def _rows_and_weights(s, mask):
    """(rows (K-row matrix view of s), row indices or None, weights w) on s's device.

    w_j = 1/(B max(n_b, 1)) in the accumulation dtype. A host mask: computed on the host and
    copied (host->device, no sync); a device mask: computed there, with no host read."""
    acc = compute_dtype(s.dtype)
    b = mask.shape[0]
    n_b = mask.sum(1, dtype=acc).clamp_(min=1)
    w_img = 1.0 / (b * n_b)  # (B,)
    if s.dim() == 2:
        if _host_mask(mask):
            img = mask.nonzero()[:, 0]
        else:  # the image of each masked token in row-major order, M from the shape: no sync
            flat = (~mask).reshape(-1).to(torch.uint8)
            img = torch.argsort(flat, stable=True)[: s.shape[0]] // mask.shape[1]
        return s, None, w_img[img].to(s.device)
    rows = s.reshape(-1, s.shape[-1])
    if _host_mask(mask):
        idx = mask.reshape(-1).nonzero()[:, 0]
        w = w_img[idx // mask.shape[1]]
        return rows, idx.to(s.device), w.to(s.device)
    w = (mask.to(acc) * w_img[:, None]).reshape(-1)
    return rows, None, w.to(s.device)


# ----------------------------------------------------------------------------- portable path
# A (64, 65536) fp32 block is 16 MiB: few, large ops (see dino_loss.TORCH_BLOCK_B on why).
TORCH_BLOCK_ROWS = 64


def _grad_buffer_dtype(dtype):
    """fp32 for fp16 inputs: dS ~ 1e-9 at K = 65536 is below fp16's subnormals before the
    upstream gradient arrives (dino_loss._grad_buffer_dtype)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _bdot(a, b):
    """Row-wise dot products of two (n, K) blocks without an (n, K) product tensor."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def ibot_loss_fwd_torch(s, t, center, w, idx, student_temp, teacher_temp, need_grad, *,
                        block_rows=TORCH_BLOCK_ROWS):
    """Chunked forward over the weighted rows. Returns (loss, entropy, colsum, dS or None).

    s, t: (R, K); w: (R',) weights; idx: (R',) row indices or None (R' = R). entropy is the
    mean teacher entropy over rows with w > 0, colsum the teacher's column sums over them.
    """
    s, t = _unit_cols(s), _unit_cols(t)
    r, k = s.shape
    acc = compute_dtype(s.dtype)
    dev = s.device
    n_rows = w.shape[0]
    inv_ts = 1.0 / (student_temp.to(acc) if isinstance(student_temp, torch.Tensor)
                    else student_temp)
    probs_mode = center is None
    if not probs_mode:
        inv_tt = 1.0 / (teacher_temp.to(acc) if isinstance(teacher_temp, torch.Tensor)
                        else teacher_temp)
        c = center.detach().reshape(1, k).to(acc)
    floor = _exp_floor(acc, k)
    wact = w.to(acc)
    live = (wact != 0).to(acc)  # rows that count (all of them unless a device mask)

    ds = None
    if need_grad:
        alloc = torch.zeros if idx is not None else torch.empty
        ds = alloc(r, k, dtype=_grad_buffer_dtype(s.dtype), device=dev)
    direct = need_grad and idx is None and ds.dtype == acc
    nb = min(block_rows, max(n_rows, 1))
    xbuf = None if direct else torch.empty(nb, k, dtype=acc, device=dev)
    pbuf = torch.empty(nb, k, dtype=acc, device=dev)
    lbuf = torch.empty(nb, k, dtype=acc, device=dev)
    loss = torch.zeros((), dtype=acc, device=dev)
    ent = torch.zeros((), dtype=acc, device=dev)
    colsum = torch.zeros(k, dtype=acc, device=dev)
    for r0 in range(0, n_rows, block_rows):
        r1 = min(n_rows, r0 + block_rows)
        n = r1 - r0
        if idx is None:
            s_blk, t_blk = s[r0:r1], t[r0:r1]
        else:
            s_blk, t_blk = s.index_select(0, idx[r0:r1]), t.index_select(0, idx[r0:r1])
        wb, lb = wact[r0:r1], live[r0:r1]
        # teacher probabilities of this block only (never an (M, K) fp32 tensor)
        if probs_mode:
            p = pbuf[:n]
            p.copy_(t_blk)
            sum_p = p.sum(-1)
            plogp = torch.special.xlogy(p, p, out=lbuf[:n]).sum(-1)
            # where, not a product with the row mask: an unmasked row's "probabilities" (a
            # device mask keeps those rows) may be any logits, and xlogy(<0) is NaN
            ent -= torch.where(lb > 0, plogp, 0).sum()
        else:
            z = torch.sub(t_blk, c, out=pbuf[:n]).mul_(inv_tt)
            z.clamp_(min=z.amax(-1, keepdim=True) + floor)
            lsm = _LOG_SOFTMAX_OUT(z, -1, False, out=lbuf[:n])
            p = torch.exp(lsm, out=z)
            ent -= torch.where(lb > 0, _bdot(p, lsm), 0).sum()
            sum_p = None
        colsum += lb @ t_blk.to(acc)
        # student: x = s / tau_s in fp32, its LSE, then softmax in place, then dS
        x = ds[r0:r1] if direct else xbuf[:n]
        x.copy_(s_blk).mul_(inv_ts)
        cross = _bdot(p, x)  # <P_j, x_j>
        mx = x.amax(-1)
        x.clamp_(min=mx.unsqueeze(-1) + floor)
        _softmax_(x)
        lse = mx - x.amax(-1).log()  # p at the argmax is >= 1/K: its log is accurate
        mass = 1.0 if sum_p is None else sum_p
        loss += torch.dot(wb, mass * lse - cross)
        if need_grad:
            gw = (wb * inv_ts).unsqueeze(-1)  # w_j / tau_s
            if sum_p is not None:
                x.mul_(sum_p.unsqueeze(-1))
            x.sub_(p).mul_(gw)
            if idx is not None:
                ds.index_copy_(0, idx[r0:r1], x.to(ds.dtype))
            elif not direct:
                ds[r0:r1].copy_(x)
    count = live.sum().clamp(min=1)
    return loss, ent / count, colsum, ds


_TRITON_READY = True

# ----------------------------------------------------------------------------- custom ops
# (`_custom_op.py` has the conventions.) The forward op returns (loss, entropy, colsum) and
# what backward needs: Triton's saved row statistics (center copy, params, student LSE,
# teacher LSE or row mass; S, T, w and the indices are inputs), or the portable path's dS.
def _fwd_fake(s, t, center, w, idx, ts_tensor, ts, tt_tensor, tt, backend, need_grad):
    acc = compute_dtype(s.dtype)
    r, k = s.shape
    empty = functools.partial(s.new_empty, dtype=acc)
    if backend == "triton":
        saved = (empty(k if center is not None else 1), empty(3), empty(w.shape[0]),
                 empty(w.shape[0]))
        ds = s.new_empty(0)
    else:
        saved = tuple(empty(0) for _ in range(4))
        ds = s.new_empty((r, k) if need_grad else 0, dtype=_grad_buffer_dtype(s.dtype))
    return (empty(()), empty(()), empty(k), *saved, ds)


@fused_op("ibot_loss_fwd", fake=_fwd_fake)
def _ibot_fwd_op(s: torch.Tensor, t: torch.Tensor, center: torch.Tensor | None,
                 w: torch.Tensor, idx: torch.Tensor | None, ts_tensor: torch.Tensor | None,
                 ts: float, tt_tensor: torch.Tensor | None, tt: float, backend: str,
                 need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    dev = s.device
    ts_ = join_temperature(ts_tensor, ts, "student_temp", dev)
    tt_ = None if center is None else join_temperature(tt_tensor, tt, "teacher_temp", dev)
    acc = compute_dtype(s.dtype)
    if backend == "triton":
        loss, ent, colsum, saved = _ibot_triton.ibot_fwd_triton(s, t, center, w, idx, ts_, tt_)
        return loss, ent, colsum, *saved, placeholder(s)
    loss, ent, colsum, ds = ibot_loss_fwd_torch(s, t, center, w, idx, ts_, tt_, need_grad)
    empties = tuple(placeholder(s, acc) for _ in range(4))
    return loss, ent, colsum, *empties, placeholder(s) if ds is None else ds


@fused_op("ibot_loss_bwd",
          fake=lambda s, t, w, idx, c, par, lse_s, aux, probs, grad:
          torch.empty_like(s, memory_format=torch.contiguous_format))
def _ibot_bwd_op(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None,
                 c: torch.Tensor, par: torch.Tensor, lse_s: torch.Tensor, aux: torch.Tensor,
                 probs: bool, grad: torch.Tensor) -> torch.Tensor:
    """Triton's dS recompute as an op."""
    return _ibot_triton.ibot_bwd_triton(_unit_cols(s), _unit_cols(t), w, idx, c, par, lse_s,
                                        aux, probs, grad)


def _setup_context(ctx, inputs, output):
    s, t, center, w, idx = inputs[:5]
    backend = inputs[9]
    ctx.backend, ctx.dtype, ctx.probs = backend, s.dtype, center is None
    if backend == "triton":
        ctx.has_idx = idx is not None
        saved = (s, t, w, *output[3:7]) + ((idx,) if idx is not None else ())
        ctx.save_for_backward(*saved)
    else:
        save_grad_buffer(ctx, output[7])
    ctx.mark_non_differentiable(*output[1:])  # only the loss (no zero-filled dS grad)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 11
    if ctx.backend == "triton":
        s, t, w, c, par, lse_s, aux, *rest = ctx.saved_tensors
        ds = _ibot_bwd_op(s, t, w, rest[0] if ctx.has_idx else None, c, par, lse_s, aux,
                          ctx.probs, grad_loss)
    else:
        ds = scaled_grad_buffer(ctx, grad_loss, ctx.dtype)
    return ds, *([None] * 10)


_ibot_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _ibot_loss_with_stats(student_patches, teacher_patches, mask, center, *, student_temp=0.1,
                          teacher_temp=0.07):
    """(loss, teacher entropy over the masked tokens, their teacher column sums, their
    count as a tensor on the logits' device) from one pass."""
    ts, tt = _validate(student_patches, teacher_patches, mask, center, student_temp,
                       teacher_temp)
    backend = choose_backend(student_patches, teacher_patches, center,
                             unsupported=None if _TRITON_READY else "not written yet")
    s = student_patches
    rows, idx, w = _rows_and_weights(s, mask)
    t_rows = teacher_patches.reshape(rows.shape).detach()
    count = (w != 0).sum()
    if backend == "ref":
        loss = ibot_patch_loss_ref(s, teacher_patches, mask, center, student_temp=ts,
                                   teacher_temp=tt)
        with torch.no_grad():
            acc = compute_dtype(s.dtype)
            tr = t_rows.to(acc) if idx is None else t_rows.index_select(0, idx).to(acc)
            live = (w != 0).to(acc)
            if center is None:
                h = -torch.special.xlogy(tr, tr).sum(-1)
            else:
                logp = F.log_softmax((tr - center.reshape(1, -1).to(acc)) / tt, -1)
                h = -(logp.exp() * logp).sum(-1)
            ent = torch.where(live > 0, h, 0).sum() / count.clamp(min=1)
            colsum = live @ tr
        return loss, ent, colsum, count
    need_grad = torch.is_grad_enabled() and s.requires_grad
    c = None if center is None else center.detach()
    out = _ibot_fwd_op(rows, t_rows, c, w, idx, *split_temperature(ts),
                       *split_temperature(1.0 if tt is None else tt), backend, need_grad)
    return out[0], out[1], out[2], count


def ibot_patch_loss(student_patches, teacher_patches, mask, center, *, student_temp=0.1,
                    teacher_temp=0.07):
    """iBOT's masked-patch loss: DINO's cross-entropy per masked token, mean per image,
    mean over the B images.

    Args:
        student_patches: (B, N, K) logits of every patch token (iBOT; unmasked rows get a zero
            gradient), or (M, K) logits of the masked tokens only, in row-major mask order
            (mask.nonzero() order; DINOv2), M = mask.sum(). Gets the gradient.
        teacher_patches: same shape and dtype; no gradient.
        mask: (B, N) bool, True = masked for the student. Best on the CPU (the masks are
            drawn on the host): the weights and masked-row indices are then computed there
            for free and copied to the device without a sync, and M is checked. On the
            device there is no sync either, but M is not checked (that needs a host read),
            the (M, K) layout costs an argsort of B*N flags, and the (B, N, K) layout runs
            the kernels over all B*N rows (unmasked ones weighted 0, their loads masked).
        center: (K,) or (1, K): P = softmax((t - c) / teacher_temp); same dtype as the logits
            or fp32 with fp16/bf16 logits. None: teacher_patches are already probabilities
            (rows summing to 1, e.g. `sinkhorn_knopp`'s output); teacher_temp is unused.
        student_temp, teacher_temp: > 0; floats, or 1-element tensors (on the logits' device
            or the CPU), never read on the host when on an accelerator.
    Returns:
        0-dim loss (fp32 for fp16/bf16 inputs).
    Example:
        >>> mask = torch.rand(4, 9) < 0.4
        >>> s, t = torch.randn(4, 9, 100), torch.randn(4, 9, 100)
        >>> loss = ibot_patch_loss(s, t, mask, torch.zeros(100))
    """
    return _ibot_loss_with_stats(student_patches, teacher_patches, mask, center,
                                 student_temp=student_temp, teacher_temp=teacher_temp)[0]


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the paper's spelling
    """iBOT patch loss with the center as a buffer, updated after each forward.

    forward(student_patches, teacher_patches, mask, teacher_temp=None) -> loss uses the
    current center, then sets center <- m c + (1 - m) (mean teacher logits over the masked
    tokens), all-reduced across ranks (DINOv2's choice). `last_stats` holds
    "teacher_entropy" (a device tensor: no host read) of the last call.
    """

    def __init__(self, out_dim, *, student_temp=0.1, teacher_temp=0.07, center_momentum=0.9):
        super().__init__()
        self.out_dim, self.student_temp, self.teacher_temp = out_dim, student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict = {}

    def forward(self, student_patches, teacher_patches, mask, teacher_temp=None):
        tt = self.teacher_temp if teacher_temp is None else teacher_temp
        loss, ent, colsum, count = _ibot_loss_with_stats(
            student_patches, teacher_patches, mask, self.center,
            student_temp=self.student_temp, teacher_temp=tt)
        with torch.no_grad():
            self.last_stats = {"teacher_entropy": ent.detach()}
            total = dist.all_reduce_sum(colsum.reshape(1, -1).to(self.center.dtype))
            n = dist.all_reduce_sum(count.reshape(1).to(self.center.dtype))
            new = self.center * self.center_momentum + total * (
                (1 - self.center_momentum) / n.clamp(min=1))
            self.center.copy_(torch.where(n > 0, new, self.center))  # no masked token: keep
        return loss
