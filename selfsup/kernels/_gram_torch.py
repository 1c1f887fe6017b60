"""Portable pieces shared by Barlow Twins and VICReg: D x D products without the D x D matrix.

Both losses reduce a D x D matrix M = U^T W / N built from (N, D) batches (U = A, W = B for
Barlow Twins' cross-correlation; U = W = X for VICReg's covariance). Two routes, picked by
shape, each never holding more than the smaller of N x N and a D x CHUNK slab:

- Gram route (2N <= D): ||U^T W||_F^2 = <U U^T, W W^T>_F and (U U^T) W-type products use
  N x N Grams: 4 N^2 D FLOPs against the direct product's 2 N D^2.
- direct route (2N > D): M is computed a column slab at a time (CHUNK columns) and reduced
  or applied at once; the full D x D is never held, and here D^2 < 4 N^2 anyway.
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 2**22  # a D x CHUNK slab of the direct route holds at most this many entries


def use_gram(n: int, d: int) -> bool:
    """Whether the N x N Gram route does fewer FLOPs than the direct D x D one."""
    return 2 * n <= d


def _chunk(d: int) -> int:
    return max(1, min(d, CHUNK_ELEMS // max(d, 1)))


def frob_cross(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||U^T W||_F^2 for (N, D) U, W (U may be W: VICReg)."""
    n, d = u.shape
    if use_gram(n, d):
        gu = u @ u.T
        gw = gu if w is u else w @ w.T
        return (gu * gw).sum()
    step = _chunk(d)
    total = u.new_zeros(())
    for j in range(0, d, step):
        total = total + (u.T @ w[:, j:j + step]).pow(2).sum()
    return total


def gram_apply(u_r: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """U_r U^T W for local rows U_r (n_r, D) of U (N, D) and W (N, D): the Gram-times-batch
    products of both losses' backward (Barlow: dA ~ B_r B^T A; VICReg: X_r X^T X)."""
    n, d = u.shape
    if use_gram(n, d):
        return (u_r @ u.T) @ w
    step = _chunk(d)
    out = torch.empty_like(u_r)
    for j in range(0, d, step):  # column slab j of U^T W, applied at once
        out[:, j:j + step] = u_r @ (u.T @ w[:, j:j + step])
    return out
