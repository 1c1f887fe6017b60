"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"),
the uniformity term DINOv2 adds on the student's cls features.

    x_i <- x_i / ||x_i||                      (rows L2-normalised first, as DINOv2 does)
    rho_i = min_{j != i} ||x_i - x_j||         (distance to the nearest other row)
    L = -1/B sum_i log(rho_i + eps)

It is the Kozachenko-Leonenko differential-entropy estimator up to constants: minimising it
pushes each feature away from its nearest neighbour, spreading the batch over the sphere.

Two paths:
- `koleo_loss_ref`: the formula on a full B x B distance matrix, the test oracle.
- `koleo_loss`: portable and chunked. The nearest neighbour of each row is an argmax of
  cosine similarity (on unit rows min distance == max cosine), found without gradient in row
  chunks so at most ~16M similarities exist at once; then rho_i is recomputed as the norm of
  one difference vector, with gradient. No B x B tensor is kept for backward.

Why eps sits inside the log and the distance is a difference norm: two equal rows (small
batches, a collapsed start) give rho = 0; log(0 + eps) is finite, and the norm's gradient at
a zero vector is 0 in torch (its subgradient), where sqrt(d^2) from a Gram matrix would give
inf * 0 = NaN. Low-precision inputs are computed in float32 (the argmax and the log both
need the range); the loss is returned in float32 and the gradient in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Similarities held at once while searching neighbours (float32: 64 MiB).
_CHUNK_ELEMS = 1 << 24


def _check(x: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D (B, D) tensor of features, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point (float16/bfloat16/float32/float64), "
                         f"got {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 rows (a nearest neighbour needs another "
                         f"row), got B={x.shape[0]}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps log finite for coinciding rows), got {eps}")


def koleo_loss_ref(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean_i log(min_{j != i} ||x_i - x_j|| + eps) on L2-normalised rows; full B x B."""
    _check(x, eps)
    xn = F.normalize(x, dim=-1)
    dist = (xn[:, None, :] - xn[None, :, :]).norm(dim=-1)  # (B, B)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    rho = dist.masked_fill(eye, float("inf")).min(dim=1).values
    return -torch.log(rho + eps).mean()


@torch.no_grad()
def nearest_neighbours(xn: torch.Tensor) -> torch.Tensor:
    """(B, D) unit rows -> (B,) index of each row's nearest other row, chunked over rows."""
    b = xn.shape[0]
    rows = max(1, _CHUNK_ELEMS // b)
    out = torch.empty(b, dtype=torch.long, device=xn.device)
    for r0 in range(0, b, rows):
        r1 = min(r0 + rows, b)
        # autocast off: a bf16 matmul could pick the wrong one of two close neighbours
        with torch.autocast(xn.device.type, enabled=False):
            sim = xn[r0:r1] @ xn.T  # (C, B)
        idx = torch.arange(r0, r1, device=xn.device)
        sim[idx - r0, idx] = float("-inf")  # a row is not its own neighbour
        out[r0:r1] = sim.argmax(dim=1)
    return out


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of (B, D) features x (B >= 2), rows L2-normalised inside; a float32 scalar.

    Differentiable in x; finite (value and gradient) when rows coincide. See module doc.
    """
    _check(x, eps)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = F.normalize(x.to(compute), dim=-1)
    nn_idx = nearest_neighbours(xn.detach())
    rho = torch.linalg.vector_norm(xn - xn[nn_idx], dim=-1)  # (B,), differentiable
    return -torch.log(rho + eps).mean()
