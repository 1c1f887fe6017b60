"""Barlow Twins loss without the D x D cross-correlation matrix (Zbontar et al. 2021).

z1, z2: (N, D) projector outputs of two views. Each is standardised per feature over the batch,
A = (z1 - mean) / sqrt(var + 1e-5) (biased var: the official BatchNorm1d(affine=False)), then

    C = A^T B / N                                    (D, D) cross-correlation
    L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

Never forming C: C_ii = sum_n A_ni B_ni / N is a column sum and
sum_ij C_ij^2 = ||A^T B||_F^2 / N^2 = <A A^T, B B^T>_F / N^2 (exact), so

    L = sum_i (C_ii - 1)^2 - lambd sum_i C_ii^2 + lambd <A A^T, B B^T>_F / N^2.

Backward (derived; gradcheck-tested), with k_i = (2 (C_ii - 1) - 2 lambd C_ii) / N:

    dL/dA = B diag(k) + 2 lambd / N^2 (B B^T) A       dL/dB = A diag(k) + 2 lambd / N^2 (A A^T) B

and through the standardisation (BatchNorm's backward, exact with the eps):
dz = rstd (dA - mean_n dA - A mean_n(dA * A)). For 2N > D the products go through C instead
((B B^T) A = N B C^T), a column slab at a time (_gram_torch.py).

Which form pays, at D = 8192 (fp32; docs/kernels-barlow-vicreg.md):
                         N = 256                       N = 2048
  (a) naive C = A^T B    34 GFLOP fwd, C = 268 MB      275 GFLOP fwd, C = 268 MB
  (b) Gram, 2 GEMMs      2.1 GFLOP, 2 x 0.26 MB        137 GFLOP, 2 x 16.8 MB
  (c) tiled C sweep      34 GFLOP, nothing stored      275 GFLOP, nothing stored
  (b') fused Gram sweep  1.1 GFLOP, nothing stored     69 GFLOP, nothing stored
(c) saves (a)'s memory but keeps its FLOPs; the Gram form does 2 N^2 D-4 N^2 D against
2 N D^2, so it wins whenever N < D. The Triton path is (b'): `_gram_triton.py` sweeps the
upper triangle of both Grams tile by tile, standardising in registers, and reduces the
product there (half the FLOPs of (b), no N x N or standardised copy written). The backward
needs the Gram as a GEMM operand, so it is two cuBLAS products per view (4 N^2 D / view).

Distributed: the paper all-reduces C. Here every rank all-gathers z (N_global x D, smaller
than C whenever N_global < D), computes the global statistics and loss, and its backward
computes only its own rows' gradient (two all-reduced D-vectors for the global BatchNorm
backward). As `selfsup.dist.all_gather_with_grad`, the local gradient is world_size x
d L / d z_local (every rank holds the same global loss): DDP's gradient averaging then
gives exactly the single-process gradient of the concatenated batch. Both collectives run
outside the custom ops (the gather in the API, the all-reduce in the registered backward):
docs/kernels-custom-ops.md says why.
"""

from __future__ import annotations

import math

import torch

from .. import dist
from ._custom_op import all_reduce_sum, fused_op
from ._gram_torch import frob_cross, gram_apply
from ._gram_triton import gram_dot
from ._utils import FLOAT_DTYPES, check_same_device, choose_backend, compute_dtype

EPS = 1e-5  # BatchNorm1d's


# ----------------------------------------------------------------------------- checks
def check_pair(z1: object, z2: object, name: str) -> None:
    """ValueError naming the argument unless z1, z2 are same-shape (N >= 2, D) float tensors
    on one device."""
    for arg, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor) or z.ndim != 2:
            raise ValueError(f"{name}: {arg} must be a 2-D (N, D) tensor, got "
                             f"{getattr(z, 'shape', type(z).__name__)}")
        if z.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: {arg} must be float16/bfloat16/float32/float64, "
                             f"got {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(f"{name}: z2 must have z1's shape {tuple(z1.shape)}, got "
                         f"{tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise ValueError(f"{name}: z2 must have z1's dtype {z1.dtype}, got {z2.dtype}")
    if z1.shape[0] < 2:
        raise ValueError(f"{name}: z1 needs a batch of N >= 2 rows for its statistics, "
                         f"got N={z1.shape[0]}")
    if z1.shape[1] < 1:
        raise ValueError(f"{name}: z1 needs D >= 1 features, got shape {tuple(z1.shape)}")
    check_same_device(z1=z1, z2=z2)


def check_weight(name: str, arg: str, value: object) -> float:
    """The weight as a float, or ValueError unless it is a finite number >= 0."""
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is
    # symbolic, and math.isfinite of it breaks the graph (a comparison guards on it instead)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (value >= 0 and value != math.inf):  # NaN fails both
        raise ValueError(f"{name}: {arg} must be a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- reference
def standardize(z: torch.Tensor) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps) over the batch (biased var: BatchNorm1d(affine=False))."""
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    mu = z.mean(0)
    var = (z - mu).pow(2).mean(0)
    return (z - mu) * torch.rsqrt(var + EPS)


def barlow_twins_loss_ref(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051,
                          upcast: bool = True) -> torch.Tensor:
    """The paper's pseudocode: BatchNorm without affine, C = A^T B / N materialised (D x D)."""
    if upcast:
        z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    c = standardize(z1).T @ standardize(z2) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off = ~torch.eye(d, dtype=torch.bool, device=c.device)
    off_diag = c[off].pow(2).sum()
    return on_diag + lambd * off_diag


# ----------------------------------------------------------------------------- custom ops
# The loss as `selfsup::barlow_twins_fwd` / `barlow_twins_bwd` (conventions: _custom_op.py,
# docs/kernels-custom-ops.md). The collectives stay outside both ops, in eager Python: the
# API all-gathers z before the forward op (g1, g2; None on one process), and the registered
# backward all-reduces the bwd op's four column sums before the plain-torch BatchNorm
# backward. An op body never calls torch.distributed, so its fake is exact and compile sees
# the ops as pure functions of their tensors.
def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(0)
    return mu, torch.rsqrt((x - mu).pow(2).mean(0) + EPS)


def _fwd_fake(z1, z2, g1, g2, lambd, backend, rank, world):
    cdt = compute_dtype(z1.dtype)
    d = z1.shape[1]
    return (z1.new_empty((), dtype=cdt), *(z1.new_empty(d, dtype=cdt) for _ in range(5)))


@fused_op("barlow_twins_fwd", fake=_fwd_fake)
def _fwd_op(z1: torch.Tensor, z2: torch.Tensor, g1: torch.Tensor | None,
            g2: torch.Tensor | None, lambd: float, backend: str, rank: int, world: int,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """(loss, mu1, rstd1, mu2, rstd2, diag C) over the gathered batch g (z on one process);
    z1, z2 are this rank's rows, inputs only so that their gradient is routed (rank, world:
    where they sit in g, read by backward)."""
    g1, g2 = (z1, z2) if g1 is None else (g1, g2)
    cdt = compute_dtype(z1.dtype)
    with torch.autocast(z1.device.type, enabled=False):  # the GEMMs run in cdt, as eager did
        x1, x2 = g1.to(cdt), g2.to(cdt)
        n, d = x1.shape
        mu1, rs1 = _stats(x1)
        mu2, rs2 = _stats(x2)
        a, b = (x1 - mu1) * rs1, (x2 - mu2) * rs2
        c = (a * b).sum(0) / n
        if backend == "triton" and n <= d:  # the fused sweep pays up to N = D (half the FLOPs)
            frob = gram_dot(g1, mu1, rs1, g2, mu2, rs2)
        else:
            frob = frob_cross(a, b)
        loss = (c - 1).pow(2).sum() + lambd * (frob / (n * n) - c.pow(2).sum())
    return loss, mu1, rs1, mu2, rs2, c


def _bwd_fake(g1, g2, mu1, rs1, mu2, rs2, c, lambd, lo, n_local):
    shape = (n_local, g1.shape[1])
    return (mu1.new_empty(shape), mu1.new_empty(shape), mu1.new_empty((4, g1.shape[1])))


@fused_op("barlow_twins_bwd", fake=_bwd_fake)
def _bwd_op(g1: torch.Tensor, g2: torch.Tensor, mu1: torch.Tensor, rs1: torch.Tensor,
            mu2: torch.Tensor, rs2: torch.Tensor, c: torch.Tensor, lambd: float, lo: int,
            n_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dA, dL/dB of rows lo..lo+n_local, their column sums [dA, dA*A, dB, dB*B]): the
    Gram products (cuBLAS on every path); the sums still need the all-reduce over ranks."""
    cdt = c.dtype
    with torch.autocast(g1.device.type, enabled=False):
        a, b = (g1.to(cdt) - mu1) * rs1, (g2.to(cdt) - mu2) * rs2
        n = a.shape[0]
        a_r, b_r = a[lo:lo + n_local], b[lo:lo + n_local]
        k = (2 * (c - 1) - 2 * lambd * c) / n
        s = 2 * lambd / (n * n)
        da = b_r * k + s * gram_apply(b_r, b, a)
        db = a_r * k + s * gram_apply(a_r, a, b)
        sums = torch.stack([da.sum(0), (da * a_r).sum(0), db.sum(0), (db * b_r).sum(0)])
    return da, db, sums


def _setup_context(ctx, inputs, output):
    z1, z2, g1, g2, lambd, _backend, rank, world = inputs
    g1, g2 = (z1, z2) if g1 is None else (g1, g2)
    ctx.save_for_backward(g1, g2, *output[1:])
    ctx.lambd, ctx.dtype, ctx.world = lambd, z1.dtype, world
    ctx.n_local = z1.shape[0]
    ctx.lo = rank * ctx.n_local
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *_unused):
    if grad is None:
        return (None,) * 8
    g1, g2, mu1, rs1, mu2, rs2, c = ctx.saved_tensors
    da, db, sums = _bwd_op(g1, g2, mu1, rs1, mu2, rs2, c, ctx.lambd, ctx.lo, ctx.n_local)
    if ctx.world > 1:  # BatchNorm's backward over the global batch: the only collective
        sums = all_reduce_sum(sums)
    # BatchNorm backward (plain torch; A's local rows recomputed: elementwise)
    cdt, n, hi = c.dtype, g1.shape[0], ctx.lo + ctx.n_local
    a_r = (g1[ctx.lo:hi].to(cdt) - mu1) * rs1
    b_r = (g2[ctx.lo:hi].to(cdt) - mu2) * rs2
    dz1 = rs1 * (da - sums[0] / n - a_r * (sums[1] / n))
    dz2 = rs2 * (db - sums[2] / n - b_r * (sums[3] / n))
    # upstream (GradScaler's scale) in the compute dtype before rounding to the input's
    scale = grad.to(cdt) * ctx.world
    return ((dz1 * scale).to(ctx.dtype), (dz2 * scale).to(ctx.dtype),
            None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """Barlow Twins loss of two views' projections, over the global batch when distributed.

    Args:
        z1, z2: (N, D) projections, same shape and dtype (fp16/bf16 computed in fp32, fp64
            in fp64); N >= 2.
        lambd: weight of the off-diagonal (redundancy) term, >= 0; paper 0.0051.
    Returns:
        scalar loss (fp32, or fp64 for fp64 inputs); gradients in the inputs' dtype.
    Example:
        >>> loss = barlow_twins_loss(torch.randn(8, 16), torch.randn(8, 16))
    """
    check_pair(z1, z2, "barlow_twins_loss")
    lambd = check_weight("barlow_twins_loss", "lambd", lambd)
    too_big = "N x D >= 2^31 (int32 offsets)" if z1.numel() * dist.world_size() >= 2**31 else None
    backend = choose_backend(z1, z2, unsupported=too_big)
    if backend == "ref":
        z1, z2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
        loss = barlow_twins_loss_ref(z1, z2, lambd, upcast=False)
        return loss.to(compute_dtype(z1.dtype))
    world = dist.world_size()
    if world > 1:  # the collective outside the op (eager Python, visible to compile)
        g1, g2 = dist.all_gather_nograd(z1), dist.all_gather_nograd(z2)
    else:
        g1 = g2 = None
    return _fwd_op(z1, z2, g1, g2, lambd, backend, dist.rank(), world)[0]
