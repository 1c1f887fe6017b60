"""VICReg loss without the D x D covariance matrices.

Bardes et al. 2022. z1, z2: (N, D) expander outputs of two views.

    inv = mean_{n,d} (z1 - z2)^2
    var = mean_d relu(1 - sqrt(Var_n(z_d) + 1e-4))        per view, averaged over the views
    cov = sum_{i != j} Cov(z)_ij^2 / D,  Cov = Xc^T Xc / (N - 1)      per view, summed
    L = sim * inv + var_coeff * var + cov_coeff * cov      paper: 25, 25, 1

The portable path never forms Cov: sum_ij Cov_ij^2 = <Xc Xc^T, Xc Xc^T>_F / (N-1)^2 (an N x N
Gram, exact), and its diagonal is the per-feature variance already needed by the variance term.
At D = 8192 the naive Cov is 268 MB per view (fp32) and 2 N D^2 = 34 / 275 GFLOP at N = 256 /
2048; the Gram is N^2 (0.26 / 16.8 MB) and 2 N^2 D = 1.1 / 69 GFLOP. Both are plain GEMMs
(cuBLAS), so no Triton kernel is written: a tiled D x D sweep would redo the FLOPs the
identity avoids. For N > D the direct D x D covariance is the smaller tensor and is used.

Distributed: as the official code, the rows are gathered (with gradient) and every statistic
is over the global batch: exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist
from ._utils import forced_backend
from .barlow_twins import _check

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
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)  # writes 2 D^2
    cov_l = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d  # reads/copies 2 D^2
    return sim * inv + var * var_l + cov * cov_l


def _view_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance hinge mean, off-diagonal covariance penalty) of one view."""
    n, d = z.shape
    x = z - z.mean(0)
    v = x.pow(2).sum(0) / (n - 1)  # Cov_ii
    hinge = F.relu(1 - torch.sqrt(v + VAR_EPS)).mean()
    frob = (x @ x.T).pow(2).sum() if n <= d else (x.T @ x).pow(2).sum()
    return hinge, (frob / (n - 1) ** 2 - v.pow(2).sum()) / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0,
                cov: float = 1.0) -> torch.Tensor:
    """VICReg loss of two views' embeddings, over the global batch when distributed.

    Args:
        z1, z2: (N, D) embeddings (computed in fp32; fp64 stays fp64).
        sim, var, cov: invariance, variance and covariance weights (paper 25, 25, 1).
    Returns:
        scalar loss.
    Example:
        >>> loss = vicreg_loss(torch.randn(8, 16), torch.randn(8, 16))
    """
    _check(z1, z2, "vicreg_loss")
    for name, w in (("sim", sim), ("var", var), ("cov", cov)):
        if not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"vicreg_loss: {name} must be a number >= 0, got {w!r}")
    if dist.is_dist():
        z1, z2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
    if forced_backend() == "ref":
        return vicreg_loss_ref(z1, z2, sim, var, cov, upcast=False).float()
    with torch.autocast(z1.device.type, enabled=False):
        if z1.dtype in (torch.float16, torch.bfloat16):
            z1, z2 = z1.float(), z2.float()
        hx, cx = _view_terms(z1)
        hy, cy = _view_terms(z2)
        inv = (z1 - z2).pow(2).mean()
        return sim * inv + var * (hx + hy) / 2 + cov * (cx + cy)
