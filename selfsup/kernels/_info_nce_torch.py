"""InfoNCE's portable path (chunked torch, any device) and MoCo's key queue.

The math is `info_nce.py`'s (its docstring has the formulas); this file holds what runs without
Triton: the queue sweep in key chunks with an online max, the in-batch / NT-Xent sweep in row
chunks across the full key width, and `MoCoQueue`, the ring buffer of negatives.

`temperature` is a Python float or a 0-d tensor on the inputs' device: every use below is a
tensor op (``x * (1 / temperature)``), so a tensor temperature is never read on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import check_tensor, compute_dtype

CHUNK_ELEMS = 1 << 20  # logits per step of the portable sweeps: N=256 x 4096 keys, 4 MB fp32
QUEUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def chunk_elems(device: torch.device) -> int:
    """Logits per chunk. Every large op is a fork/join of the intra-op thread team, and on a
    shared 2-core machine each join can wait a whole time slice (ROOFLINE: chunked MoCo went
    303 -> 1,494 ms at 2 threads), so with more than one thread (or on a GPU, per launch) the
    chunks are 4x larger: 16 MB of fp32 logits instead of 4 MB, a quarter of the ops."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return CHUNK_ELEMS
    return 4 * CHUNK_ELEMS


def queue_sweep_torch(q, k, queue, temperature, *, compute_dq):
    """MoCo queue loss in key chunks with an online max; never materializes N x K.

    Returns (loss_rows, dq | None, coef) like `info_nce.info_nce_fwd`. Per chunk: one GEMM for
    the logits, in-place exp, one GEMM into the running sum p.key (few ops: 2-thread CPUs
    collapse under many small ones). Half inputs are computed in fp32 (the chunk is upcast).
    """
    acc_dt = compute_dtype(q.dtype)
    inv_t = 1.0 / temperature
    qs = q.to(acc_dt) * inv_t  # (N, C), scaled once
    kp = k.to(acc_dt)
    pos = (qs * kp).sum(1)  # (N,) positive logits
    m, l = pos.clone(), torch.ones_like(pos)  # the positive starts the running sums  # noqa: E741
    acc = kp.clone() if compute_dq else None  # sum_j exp(s_j - m) key_j, positive included
    step = max(1, min(len(queue), chunk_elems(q.device) // len(q)))
    buf = torch.empty(len(q), step, device=q.device, dtype=acc_dt)
    for start in range(0, len(queue), step):
        chunk = queue[start:start + step].to(acc_dt)  # (Kc, C), a view when fp32
        s = torch.mm(qs, chunk.T, out=buf[:, :len(chunk)])  # (N, Kc)
        m_new = torch.maximum(m, s.amax(1))
        s.sub_(m_new[:, None]).exp_()
        alpha = (m - m_new).exp_()
        l.mul_(alpha).add_(s.sum(1))
        if compute_dq:
            acc.mul_(alpha[:, None]).addmm_(s, chunk)
        m = m_new
    lse = m + l.log()
    dq = (acc / l[:, None] - kp).mul_(inv_t) if compute_dq else None
    coef = (pos - lse).exp_().sub_(1.0).mul_(inv_t)
    return lse - pos, dq, coef


def rows_sweep_torch(q, keys, temperature, pos_idx, *, self_mask, compute_dq, compute_dk):
    """In-batch / NT-Xent loss in row chunks across the full key width.

    Each chunk's log_softmax is exact, and its probabilities feed both gradients at once:
    dq = (p @ keys - keys[pos]) / T and dk += p^T @ q_chunk (then minus q at the positives).
    Returns (loss_rows, dq | None, dk | None).
    """
    acc_dt = compute_dtype(q.dtype)
    inv_t = 1.0 / temperature
    qc, kc = q.to(acc_dt), keys.to(acc_dt)
    qs = qc * inv_t
    (n, c), m = q.shape, keys.shape[0]
    rows = max(1, min(n, chunk_elems(q.device) // m))
    loss = torch.empty(n, device=q.device, dtype=acc_dt)
    dq = torch.empty(n, c, device=q.device, dtype=acc_dt) if compute_dq else None
    dk = torch.zeros(m, c, device=q.device, dtype=acc_dt) if compute_dk else None
    s_buf = torch.empty(rows, m, device=q.device, dtype=acc_dt)
    lp_buf = torch.empty_like(s_buf)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = torch.mm(qs[r0:r1], kc.T, out=s_buf[:r1 - r0])  # (R, M)
        if self_mask:
            s.diagonal(r0).fill_(float("-inf"))  # entries (i, r0 + i): the row itself
        lp = torch.log_softmax(s, 1, out=lp_buf[:r1 - r0])
        loss[r0:r1] = lp.gather(1, pos_idx[r0:r1, None])[:, 0].neg_()
        if compute_dq or compute_dk:
            p = lp.exp_()
            if compute_dq:
                torch.mm(p, kc, out=dq[r0:r1])
            if compute_dk:
                dk.addmm_(p.T, qc[r0:r1])
    if compute_dq:
        dq.sub_(kc[pos_idx]).mul_(inv_t)
    if compute_dk:
        dk.index_add_(0, pos_idx, qc, alpha=-1.0).mul_(inv_t)
    return loss, dq, dk


class MoCoQueue(nn.Module):
    """Ring buffer of `size` keys of width `dim`, initialized to random unit vectors.

    Buffers: ``queue`` (size, dim) and ``ptr`` (the next slot to overwrite, a 0-d long), so the
    state_dict round-trips. `enqueue` takes batches of any length: one that does not divide
    `size` wraps around, and one longer than `size` keeps its last `size` keys, exactly as if
    its rows had been enqueued one by one.

    `dtype` is the dtype the keys are stored (and the loss kernels read them) in: the training
    dtype. A bf16 run keeps a bf16 queue, so the fused loss runs its bf16 configuration on
    16 MB of keys instead of promoting everything to fp32 (tf32x3 MMAs, 32 MB) or casting the
    whole queue every step (48 MB more traffic); MoCo's keys are unit vectors, exact enough in
    bf16 (autocast would round them to bf16 for `q @ queue.T` anyway). `load_state_dict`
    converts a checkpoint's queue to this dtype, so fp32 and bf16 checkpoints load either way.

    The write pointer lives on the device and the ring write is index arithmetic there
    (`index_copy_` at (ptr + t) % size): `enqueue` never reads ``ptr`` on the host, so a step
    does not wait for the GPU, and no Python-side copy can drift from the buffer (after
    load_state_dict, or a buffer broadcast across ranks).
    """

    def __init__(self, dim: int, size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if dtype not in QUEUE_DTYPES:
            raise ValueError(f"dtype must be one of {QUEUE_DTYPES}, got {dtype!r}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1).to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        return self.queue.shape[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, dtype={self.queue.dtype}"

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (B, dim) over the oldest entries; any B >= 0. No host sync."""
        check_tensor("keys", keys, ndim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have dim={self.dim} columns, got shape "
                             f"{tuple(keys.shape)}")
        n, size = keys.shape[0], self.size
        if n == 0:
            return
        skip = max(0, n - size)  # rows that would be overwritten within this batch
        keys = keys[skip:].detach().to(device=self.queue.device, dtype=self.queue.dtype)
        slots = torch.arange(skip, n, device=self.queue.device).add_(self.ptr).remainder_(size)
        self.queue.index_copy_(0, slots, keys)  # distinct slots: one writer each
        self.ptr.add_(n).remainder_(size)
