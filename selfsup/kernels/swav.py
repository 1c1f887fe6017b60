"""SwAV: swapped prediction of Sinkhorn-Knopp codes.

Caron et al. 2020. V views (2 global + n local), B images each, K prototypes.
scores s_v = normalize(z_v) @ normalize(C)^T, (B, K). For each assigned view a (the two
global crops):

    q_a = sinkhorn_knopp(s_a, eps = 0.05, 3 iterations)        (B, K), no gradient
    L   = mean_a mean_{v != a} mean_b -sum_k q_a log softmax(s_v / T)    T = 0.1

Sinkhorn-Knopp makes Q = exp(s / eps)^T (K, B_global) doubly stochastic (rows sum to 1/K,
columns to 1/B_global) by alternating normalisations; the sums over the batch are
all-reduced across ranks (the official code's exact scheme), so each rank's codes are those
of one process on the concatenated batch. A queue of past embeddings (scored against the
current prototypes) may be prepended to s_a; only the current batch's codes are used.

The scores are (V B, K) with K = 3000: small next to the encoder, so the loss is plain torch
(log_softmax + a dot): one read of the scores per pass; no fused kernel pays here.
"""

from __future__ import annotations

import torch

from .. import dist


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float = 0.05,
                   n_iters: int = 3) -> torch.Tensor:
    """Codes Q (B, K) for scores (B, K), equipartitioned over the global batch.

    Args:
        scores: (B, K) this rank's scores (prototype cosines).
        temperature: epsilon, the entropy regularisation (paper 0.05).
        n_iters: alternating normalisations (paper 3).
    Returns:
        (B, K) codes, each row summing to 1 (after the last column normalisation): float32
        (float64 for float64 scores), computed in float64.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"sinkhorn_knopp: scores must be a 2-D (B, K) tensor, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"sinkhorn_knopp: temperature must be > 0, got {temperature!r}")
    if not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"sinkhorn_knopp: n_iters must be an int >= 1, got {n_iters!r}")
    if not scores.is_floating_point():
        raise ValueError(f"sinkhorn_knopp: scores must be floating point, got {scores.dtype}")
    # float64 throughout: at small eps a prototype far from every sample has exp() of its
    # scores below fp32's range (cos gaps of 2 / 0.005 = 400 nats), its row sum 0 and its
    # codes 0 / 0; the (B + queue, K) matrix is a few MB, so the cost is nothing
    s = scores.double()
    # the global max cancels in the normalisations; it keeps exp() finite at small eps
    m = s.max().reshape(1)
    if dist.is_dist():
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp((s - m) / temperature).T  # (K, B)
    n_total = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    dist.all_reduce_sum(n_total)
    k = q.shape[0]
    q /= dist.all_reduce_sum(q.sum().reshape(1))
    for _ in range(n_iters):
        q /= dist.all_reduce_sum(q.sum(dim=1, keepdim=True))  # rows: each prototype 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # columns: each sample 1/B (local sums suffice)
        q /= n_total
    q = (q * n_total).T
    return q if scores.dtype == torch.float64 else q.float()


def sinkhorn_knopp_ref(scores: torch.Tensor, temperature: float = 0.05,
                       n_iters: int = 3) -> torch.Tensor:
    """The paper's Algorithm (one process, float64, no max shift): the test oracle."""
    q = torch.exp(scores.double() / temperature).T  # (K, B)
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def swav_loss_ref(scores: torch.Tensor, codes: torch.Tensor, n_views: int,
                  temperature: float = 0.1) -> torch.Tensor:
    """The paper's loop. scores (V B, K) view-major; codes (A, B, K) for views 0..A-1."""
    b = scores.shape[0] // n_views
    total = 0.0
    for a in range(codes.shape[0]):
        sub = 0.0
        for v in range(n_views):
            if v == a:
                continue
            logp = torch.log_softmax(scores[v * b:(v + 1) * b].double() / temperature, dim=1)
            sub = sub - (codes[a].double() * logp).sum(1).mean()
        total = total + sub / (n_views - 1)
    return total / codes.shape[0]


def swav_loss(scores: torch.Tensor, codes: torch.Tensor, n_views: int,
              temperature: float = 0.1) -> torch.Tensor:
    """Swapped-prediction loss: each assigned view's codes predicted from every other view.

    Args:
        scores: (V B, K) prototype scores of all V views, view-major (gradient flows).
        codes: (A, B, K) codes of the first A views (from sinkhorn_knopp, no gradient).
        n_views: V.
        temperature: softmax temperature T (paper 0.1).
    Returns:
        scalar loss (fp32).
    """
    if not isinstance(scores, torch.Tensor) or not isinstance(codes, torch.Tensor):
        raise ValueError("swav_loss: scores and codes must be tensors")
    if scores.ndim != 2 or not isinstance(n_views, int) or n_views < 2 \
            or scores.shape[0] % n_views or scores.shape[0] == 0:
        raise ValueError(f"swav_loss: scores must be (n_views * B, K) with n_views >= 2, got "
                         f"{tuple(scores.shape)} and n_views={n_views!r}")
    b, k = scores.shape[0] // n_views, scores.shape[1]
    if codes.ndim != 3 or codes.shape[1:] != (b, k) or not 1 <= codes.shape[0] <= n_views:
        raise ValueError(f"swav_loss: codes must be (A, B={b}, K={k}) with 1 <= A <= "
                         f"{n_views}, got {tuple(codes.shape)}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"swav_loss: temperature must be > 0, got {temperature!r}")
    n_assign = codes.shape[0]
    dt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(scores.to(dt).view(n_views, b, k) / temperature, dim=2)
    # sum over v != a of <q_a, logp_v> = <q_a, sum_v logp_v> - <q_a, logp_a>
    q = codes.to(dt)
    cross = (q * logp.sum(0, keepdim=True)).sum() - (q * logp[:n_assign]).sum()
    return -cross / (b * (n_views - 1) * n_assign)
