"""VICReg loss without the D x D covariance matrices (Bardes et al. 2022).

z1, z2: (N, D) expander outputs of two views; X = z - mean (per view, over the batch).

    inv = mean_{n,d} (z1 - z2)^2
    var = mean_d relu(1 - sqrt(Var_n(z_d) + 1e-4))       per view, averaged over the two views
    cov = sum_{i != j} Cov_ij^2 / D,  Cov = X^T X / (N - 1)      per view, summed
    L = sim * inv + var_w * var + cov_w * cov               paper: 25, 25, 1

Never forming Cov: sum_ij Cov_ij^2 = <X X^T, X X^T>_F / (N-1)^2 (exact), and its diagonal
v_d = Cov_dd is the variance the hinge needs anyway. The FLOP / byte comparison is Barlow
Twins' (barlow_twins.py, docs/kernels-barlow-vicreg.md) with A = B = X, per view; the Triton
path is the same fused Gram sweep (`_gram_triton.py`, rstd = 1: centring only).

Backward (derived; gradcheck-tested), per view, s_d = sqrt(v_d + 1e-4):

    dL/dX = -var_w/2 [s < 1] X / (D s (N-1)) + cov_w 4/D ((X X^T) X / (N-1)^2 - X v / (N-1))
    dL/dz = dL/dX - mean_n dL/dX  (+ the invariance term 2 sim (z1 - z2) / (N D), +/- per view)

The hinge's kink (s = 1) takes relu's subgradient 0, as torch's relu.

Distributed: as the official code, the embeddings are all-gathered and every statistic
(and here the invariance mean too) is over the global batch: exactly the single-process loss
on the concatenated batch. Each rank's backward computes its own rows' gradient only (one
all-reduced D-vector per view for the centring); the local gradient is world_size x
d L / d z_local, the `selfsup.dist.all_gather_with_grad` convention that DDP's averaging
turns into the single-process gradient. As in barlow_twins.py, the collectives run outside
the custom ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist
from ._custom_op import all_reduce_sum, fused_op
from ._gram_torch import frob_cross, gram_apply
from ._gram_triton import gram_dot
from ._utils import choose_backend, compute_dtype
from .barlow_twins import check_pair, check_weight

VAR_EPS = 1e-4


def vicreg_loss_ref(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0,
                    cov: float = 1.0, upcast: bool = True) -> torch.Tensor:
    """The paper's pseudocode: materialises each view's D x D covariance."""
    if upcast:
        z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    x, y = z1 - z1.mean(0), z2 - z2.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + VAR_EPS), torch.sqrt(y.var(0) + VAR_EPS)
    var_l = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    off = ~torch.eye(d, dtype=torch.bool, device=z1.device)
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    cov_l = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim * inv + var * var_l + cov * cov_l


def _view(g: torch.Tensor, cdt: torch.dtype, triton: bool):
    """(mean, variances v, hinge mean, covariance penalty) of one gathered view."""
    x = g.to(cdt)
    n, d = x.shape
    mu = x.mean(0)
    x = x - mu
    v = x.pow(2).sum(0) / (n - 1)
    hinge = F.relu(1 - torch.sqrt(v + VAR_EPS)).mean()
    if triton and n <= d:
        ones = torch.ones_like(mu)
        frob = gram_dot(g, mu, ones, g, mu, ones)
    else:
        frob = frob_cross(x, x)
    return mu, v, hinge, (frob / (n - 1) ** 2 - v.pow(2).sum()) / d


def _view_grad(x: torch.Tensor, x_r: torch.Tensor, v: torch.Tensor, var: float,
               cov: float) -> torch.Tensor:
    """dL/dz for this rank's rows of one view (hinge and covariance terms), before the
    centring's column mean is subtracted (that sum is over every rank's rows)."""
    n, d = x.shape
    s = torch.sqrt(v + VAR_EPS)
    dx = (-(var / 2) / (d * (n - 1))) * torch.where(s < 1, 1 / s, 0.0) * x_r
    return dx + (4 * cov / d) * (gram_apply(x_r, x, x) / (n - 1) ** 2 - x_r * v / (n - 1))


# ----------------------------------------------------------------------------- custom ops
# `selfsup::vicreg_fwd` / `vicreg_bwd`, as Barlow Twins' (barlow_twins.py): the all-gather
# runs in the API before the forward op, the all-reduce of the two centring column sums in
# the registered backward between the bwd op and the plain-torch rest; no body communicates.
def _fwd_fake(z1, z2, g1, g2, sim, var, cov, backend, rank, world):
    cdt = compute_dtype(z1.dtype)
    d = z1.shape[1]
    return (z1.new_empty((), dtype=cdt), *(z1.new_empty(d, dtype=cdt) for _ in range(4)))


@fused_op("vicreg_fwd", fake=_fwd_fake)
def _fwd_op(z1: torch.Tensor, z2: torch.Tensor, g1: torch.Tensor | None,
            g2: torch.Tensor | None, sim: float, var: float, cov: float, backend: str,
            rank: int, world: int,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mu1, mu2, v1, v2) over the gathered batch g (z on one process); z1, z2 are this
    rank's rows, inputs so that their gradient is routed (rank, world: read by backward)."""
    g1, g2 = (z1, z2) if g1 is None else (g1, g2)
    cdt = compute_dtype(z1.dtype)
    with torch.autocast(z1.device.type, enabled=False):  # the GEMMs run in cdt, as eager did
        mu1, v1, h1, c1 = _view(g1, cdt, backend == "triton")
        mu2, v2, h2, c2 = _view(g2, cdt, backend == "triton")
        inv = (g1.to(cdt) - g2.to(cdt)).pow(2).mean()
        loss = sim * inv + var * (h1 + h2) / 2 + cov * (c1 + c2)
    return loss, mu1, mu2, v1, v2


def _bwd_fake(g1, g2, mu1, mu2, v1, v2, var, cov, lo, n_local):
    shape = (n_local, g1.shape[1])
    return mu1.new_empty(shape), mu1.new_empty(shape), mu1.new_empty((2, g1.shape[1]))


@fused_op("vicreg_bwd", fake=_bwd_fake)
def _bwd_op(g1: torch.Tensor, g2: torch.Tensor, mu1: torch.Tensor, mu2: torch.Tensor,
            v1: torch.Tensor, v2: torch.Tensor, var: float, cov: float, lo: int,
            n_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dz of rows lo..lo+n_local per view without the centring and invariance terms,
    their column sums): the Gram products; the sums still need the all-reduce over ranks."""
    cdt = mu1.dtype
    with torch.autocast(g1.device.type, enabled=False):
        x1, x2 = g1.to(cdt) - mu1, g2.to(cdt) - mu2
        hi = lo + n_local
        dx1 = _view_grad(x1, x1[lo:hi], v1, var, cov)
        dx2 = _view_grad(x2, x2[lo:hi], v2, var, cov)
        sums = torch.stack([dx1.sum(0), dx2.sum(0)])  # ~0 analytically (sum_n X = 0); exact
    return dx1, dx2, sums


def _setup_context(ctx, inputs, output):
    z1, z2, g1, g2, sim, var, cov, _backend, rank, world = inputs
    g1, g2 = (z1, z2) if g1 is None else (g1, g2)
    ctx.save_for_backward(g1, g2, *output[1:])
    ctx.w, ctx.dtype, ctx.world = (sim, var, cov), z1.dtype, world
    ctx.n_local = z1.shape[0]
    ctx.lo = rank * ctx.n_local
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *_unused):
    if grad is None:
        return (None,) * 10
    g1, g2, mu1, mu2, v1, v2 = ctx.saved_tensors
    sim, var, cov = ctx.w
    dx1, dx2, sums = _bwd_op(g1, g2, mu1, mu2, v1, v2, var, cov, ctx.lo, ctx.n_local)
    if ctx.world > 1:  # the centring's column sums over the global batch: the collective
        sums = all_reduce_sum(sums)
    cdt, (n, d), lo, hi = mu1.dtype, g1.shape, ctx.lo, ctx.lo + ctx.n_local
    d_inv = (2 * sim / (n * d)) * (g1[lo:hi].to(cdt) - g2[lo:hi].to(cdt))
    dz1 = (dx1 - sums[0] / n) + d_inv
    dz2 = (dx2 - sums[1] / n) - d_inv
    scale = grad.to(cdt) * ctx.world
    return ((dz1 * scale).to(ctx.dtype), (dz2 * scale).to(ctx.dtype), *(None,) * 8)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0,
                cov: float = 1.0) -> torch.Tensor:
    """VICReg loss of two views' embeddings, over the global batch when distributed.

    Args:
        z1, z2: (N, D) embeddings, same shape and dtype (fp16/bf16 computed in fp32, fp64 in
            fp64); N >= 2.
        sim, var, cov: invariance, variance and covariance weights, >= 0 (paper 25, 25, 1).
    Returns:
        scalar loss (fp32, or fp64 for fp64 inputs); gradients in the inputs' dtype.
    Example:
        >>> loss = vicreg_loss(torch.randn(8, 16), torch.randn(8, 16))
    """
    check_pair(z1, z2, "vicreg_loss")
    sim, var, cov = (check_weight("vicreg_loss", k, w)
                     for k, w in (("sim", sim), ("var", var), ("cov", cov)))
    too_big = "N x D >= 2^31 (int32 offsets)" if z1.numel() * dist.world_size() >= 2**31 else None
    backend = choose_backend(z1, z2, unsupported=too_big)
    if backend == "ref":
        z1, z2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
        return vicreg_loss_ref(z1, z2, sim, var, cov, upcast=False).to(compute_dtype(z1.dtype))
    world = dist.world_size()
    if world > 1:  # the collective outside the op (eager Python, visible to compile)
        g1, g2 = dist.all_gather_nograd(z1), dist.all_gather_nograd(z2)
    else:
        g1 = g2 = None
    return _fwd_op(z1, z2, g1, g2, sim, var, cov, backend, dist.rank(), world)[0]
