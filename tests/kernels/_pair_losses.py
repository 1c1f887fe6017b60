"""Checks shared by test_barlow_twins.py and test_vicreg.py: both losses take two (N, D) views.

Each `check_*` takes the public op, its `*_ref` and the keyword weights. The Triton path runs
through the interpreter on CPU, so its shapes stay small but cross the 64-row Gram tiles
(N = 70, 130) and the 32-feature D sweep (odd D); fp64 runs in fp64 there (tight TOL64).
"""

import pytest
import torch

from selfsup.kernels import _gram_torch
from selfsup.kernels.testing import TOL64, fresh_seed

SCALE = 65536.0  # GradScaler's initial scale
UPSTREAM = 1.7

# (N, D): N < D, N > D, 2N > D > N (direct route), N, D odd and off every tile size,
# several Gram tiles (N = 70, 130 > 64) for the Triton sweep.
SHAPES = [(37, 50), (7, 90), (70, 20), (70, 151), (130, 33), (2, 3)]


def views(n, d, dtype=torch.float64, corr=0.6):
    """Two correlated views, off-centre and off-scale (the standardisation must matter)."""
    fresh_seed()
    base = torch.randn(n, d, dtype=torch.float64) * 1.5 + 0.3
    z1 = base + torch.randn(n, d, dtype=torch.float64) * 0.4
    z2 = corr * base + torch.randn(n, d, dtype=torch.float64) * 0.8 - 0.2
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()


def loss_grads(fn, z1, z2, upstream, **kw):
    loss = fn(z1, z2, **kw)
    g = torch.autograd.grad(loss, (z1, z2), grad_outputs=torch.tensor(upstream, dtype=loss.dtype))
    return loss.detach(), g


def check_matches_ref(monkeypatch, fn, ref, path, n, d, **kw):
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    z1, z2 = views(n, d)
    l0, g0 = loss_grads(ref, z1, z2, UPSTREAM, **kw)
    l1, g1 = loss_grads(fn, z1, z2, UPSTREAM, **kw)
    assert l1.dtype == torch.float64
    torch.testing.assert_close(l1, l0, **TOL64)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **TOL64)


def check_chunked_direct_route(monkeypatch, fn, ref, **kw):
    """2N > D with slabs of 3 columns: the chunk loops, not one slab, are compared."""
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setattr(_gram_torch, "CHUNK_ELEMS", 3 * 11)
    z1, z2 = views(40, 11)
    l0, g0 = loss_grads(ref, z1, z2, UPSTREAM, **kw)
    l1, g1 = loss_grads(fn, z1, z2, UPSTREAM, **kw)
    torch.testing.assert_close(l1, l0, **TOL64)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **TOL64)


def check_gradcheck(monkeypatch, fn, path, n, d, **kw):
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    z1, z2 = views(n, d)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, **kw), (z1, z2))


def check_lowp(monkeypatch, fn, ref, path, dtype, n, d, **kw):
    """fp16/bf16 inputs, upstream 65536: the gradient must equal the float64 gradient of the
    same rounded inputs, scaled, then rounded to the dtype (to within a few of its ulps of the
    gradient's size), and no entry may underflow to 0 that the scaled exact one keeps."""
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    z1, z2 = views(n, d, dtype)
    l0, g0 = loss_grads(ref, z1, z2, SCALE, **kw)  # ref upcasts the rounded inputs to fp64
    l1, g1 = loss_grads(fn, z1, z2, SCALE, **kw)
    assert l1.dtype == torch.float32
    torch.testing.assert_close(l1.double(), l0, rtol=1e-4, atol=1e-5)
    eps = torch.finfo(dtype).eps
    for g, exact in zip(g1, g0):
        assert g.dtype == dtype
        rounded = exact.to(dtype)
        assert torch.isfinite(rounded).all(), "test sizes must keep the scaled gradient finite"
        err = (g.double() - exact).abs().max().item()
        assert err <= 4 * eps * exact.abs().max().item(), (err, exact.abs().max().item())
        kept = rounded != 0
        assert (g[kept] != 0).all()


def check_bad_input(fn, name, weights):
    z = torch.randn(8, 5)
    cases = [
        ((torch.randn(8), z), "z1"),
        ((z, torch.randn(8, 6)), "z2"),
        ((z, z.double()), "z2"),
        ((z.long(), z.long()), "z1"),
        ((torch.randn(1, 5), torch.randn(1, 5)), "N >= 2"),
        ((z, z.to("meta")), "device"),
    ]
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn(*args)
    for w in weights:
        for bad in (-0.1, float("nan"), "1"):
            with pytest.raises(ValueError, match=f"{name}: {w} must be"):
                fn(z, z, **{w: bad})
