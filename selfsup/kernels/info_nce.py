"""Fused InfoNCE: MoCo's queue loss, MoCo v3's in-batch loss and SimCLR's NT-Xent.

SCAFFOLD (lead): the references and the public API; the portable and Triton paths are
being written. Shapes: N queries, M in-batch keys, K queued negatives, C dims.

    info_nce_queue:  logits_i = [q_i.k_i, q_i.queue_j] / T,   label 0
    info_nce_batch:  logits   = q k^T / T,                    label of row i = i + offset
    nt_xent:         z = [z1; z2] (2N rows), logits = z z^T / T with the diagonal excluded,
                     label of row i = i + N (mod 2N)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- references
def info_nce_queue_ref(q, k, queue, temperature, *, normalize=True):
    """MoCo v1/v2 as the paper's pseudocode writes it (materialized N x (1+K) logits)."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.detach().T  # (N, K)
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # (N, 1 + K)
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def info_nce_batch_ref(q, k, temperature, *, positive_offset=0, normalize=True):
    """MoCo v3's ctr() without the 2T factor: CE(q k^T / T, arange(N) + offset)."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature  # (N, M)
    labels = torch.arange(len(q), device=q.device) + positive_offset
    return F.cross_entropy(logits, labels)


def nt_xent_ref(z1, z2, temperature, *, normalize=True):
    """SimCLR's NT-Xent over 2N anchors; a row is never compared with itself."""
    z = torch.cat([z1, z2], 0)
    if normalize:
        z = F.normalize(z, dim=1)
    n = len(z1)
    logits = z @ z.T / temperature  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- public API
def info_nce_queue(q, k, queue, temperature, *, normalize=True):
    return info_nce_queue_ref(q, k, queue, temperature, normalize=normalize)


def info_nce_batch(q, k, temperature, *, positive_offset=0, normalize=True):
    return info_nce_batch_ref(q, k, temperature, positive_offset=positive_offset,
                              normalize=normalize)


def nt_xent(z1, z2, temperature, *, normalize=True):
    return nt_xent_ref(z1, z2, temperature, normalize=normalize)


class MoCoQueue(nn.Module):
    """Ring buffer of `size` normalized keys of width `dim` (buffers: queue, ptr)."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[0]
        keys = keys.detach().to(self.queue.dtype)[-size:]
        idx = (int(self.ptr) + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys
        self.ptr.fill_((int(self.ptr) + len(keys)) % size)
