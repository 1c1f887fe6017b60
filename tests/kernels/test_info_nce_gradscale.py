"""fp16 / bf16 gradients at GradScaler's scale (issue 22.1), the InfoNCE family.

GradScaler multiplies the loss by 65536 so that small fp16 gradient entries survive; a kernel
that rounds its gradient to fp16 *before* that scale arrives flushes them to zero (DINO and
MAE did). Here the upstream gradient is 65536 and each path's gradients are judged against
float64 on the same rounded inputs: the count of exactly-zero entries and the largest
element-wise error must stay within 2x of what torch itself gives computing the reference
under fp16/bf16 autocast (the GradScaler recipe). Floors: for zeros, the entries whose exact
value is within torch's own error of 0; for the error, that of rounding the exact gradient to
the dtype (nothing can do better).

Production shapes on the portable path (MoCo N=256, C=128, K=65536 is marked slow; K=8192
runs by default; SimCLR 2N=512; MoCo v3 256 x 1024, C=256); the Triton path under the
interpreter at the largest shapes that run in seconds. fp16 runs natively there; bf16 goes
through the interpreter's fp32 upcast (INTERPRETER_CONSTEXPRS).
"""

import pytest
import torch
import torch.nn.functional as F

from selfsup.kernels import info_nce_batch, info_nce_queue, nt_xent
from selfsup.kernels.info_nce import info_nce_batch_ref, info_nce_queue_ref, nt_xent_ref

SCALE = 65536.0
OPS = {
    "queue": (info_nce_queue, info_nce_queue_ref, 0.2),
    "batch": (info_nce_batch, info_nce_batch_ref, 0.2),
    "nt_xent": (nt_xent, nt_xent_ref, 0.1),
}


def make(kind, n, c, m, dtype):
    if kind == "queue":  # MoCo: k requires grad here too, to audit its gradient
        args = [torch.randn(n, c), torch.randn(n, c), F.normalize(torch.randn(m, c), dim=1)]
    elif kind == "batch":
        args = [torch.randn(n, c), torch.randn(m, c)]
    else:
        args = [torch.randn(n, c), torch.randn(n, c)]
    return [a.to(dtype) for a in args]


def scaled_grads(fn, args, temperature, *, autocast=None):
    leaves = [a.detach().clone().requires_grad_(i < 2) for i, a in enumerate(args)]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(*leaves, temperature)
    return torch.autograd.grad(loss, leaves[:2], grad_outputs=torch.full_like(loss, SCALE))


def audit(monkeypatch, backend, kind, n, c, m, dtype):
    fused, ref, temperature = OPS[kind]
    args = make(kind, n, c, m, dtype)
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    ours = scaled_grads(fused, args, temperature)
    monkeypatch.setenv("SELFSUP_KERNELS", "ref")
    exact = scaled_grads(ref, [a.double() for a in args], temperature)
    theirs = scaled_grads(ref, args, temperature, autocast=dtype)
    for name, o, e, t in zip(("d0", "d1"), ours, exact, theirs, strict=True):
        assert o.dtype == dtype and t.dtype == dtype
        zeros, torch_zeros = int((o == 0).sum()), int((t == 0).sum())
        err, torch_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        floor = (e.to(dtype).double() - e).abs().max().item()
        # entries within torch's own error of 0 may legitimately come out as 0 (a handful of
        # 32768 here); an underflow flush zeroes most of the tensor (DINO had 99.98%)
        near_zero = int((e.abs() <= torch_err).sum())
        assert zeros <= 2 * max(torch_zeros, near_zero, 1), (
            f"{kind} {name} {dtype}: {zeros} exact zeros of {o.numel()}, torch {torch_zeros}, "
            f"{near_zero} within torch's error of 0")
        assert err <= 2 * max(torch_err, floor), (
            f"{kind} {name} {dtype}: max error {err:.3e} > 2 x torch's {torch_err:.3e}")
        assert e.abs().max() > 1.0  # the scale did arrive: gradients far above fp16's floor


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,n,c,m", [("queue", 256, 128, 8192), ("nt_xent", 256, 128, 0),
                                        ("batch", 256, 256, 1024)])
def test_portable_gradients_keep_the_loss_scale(seed, monkeypatch, kind, n, c, m, dtype):
    audit(monkeypatch, "torch", kind, n, c, m, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_moco_production_scale(seed, monkeypatch, dtype):
    audit(monkeypatch, "torch", "queue", 256, 128, 65536, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,n,c,m", [("queue", 64, 128, 4096), ("nt_xent", 64, 128, 0),
                                        ("batch", 64, 256, 256)])
def test_triton_gradients_keep_the_loss_scale(seed, monkeypatch, kind, n, c, m, dtype):
    audit(monkeypatch, "triton", kind, n, c, m, dtype)
