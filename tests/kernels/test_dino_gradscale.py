"""fp16 / bf16 DINO gradients at GradScaler's scale (issue 22.1).

dS = (n_v p - Q) / (tau_s B n_pairs) is ~1e-8 at K = 65536: under fp16's smallest subnormal.
GradScaler multiplies the loss by 65536 so such entries survive, but only if the kernel meets
that scale before it rounds dS to fp16 (the old kernels did not: at the production shape
below 65% of the fp16 entries were exactly 0, where torch's fp16 autocast gives 0.9% and the
exact gradient rounded to fp16 0.06%; docs/kernels-dino.md). Each path's gradient, upstream
65536, is judged against float64 on the same rounded inputs beside torch's own recipe
(`dino_loss_ref` on the fp16/bf16 logits under autocast, loss * 65536 backward), relative to
the gradient's magnitude (`selfsup.kernels.testing.assert_scaled_grad_verdict`):

- exact zeros <= 2x torch's (floored at one entry and at what rounding the exact gradient
  to the dtype leaves: nothing can do better);
- the mean and the largest element-wise relative error over the entries that the dtype
  holds as normal numbers <= 2x torch's (a flushed or subnormal-rounded entry has relative
  error ~1; the largest is set by entries where n_v p and Q nearly cancel);
- the largest absolute error <= 2x torch's, floored at the rounding of the exact gradient.

Logits are cosine-sized (|s| ~ 0.3, like a weight-normalised DINO head's output): the student
and teacher softmaxes are spread over many prototypes, so most exact entries lie in fp16's
range once scaled. Production shapes (K=65536, 2+10 views, B=16) on the portable path are
marked slow; K=8192 runs by default. The Triton path runs under the interpreter at K=4096,
2+10 views (the largest that runs in seconds there).
"""

import math

import pytest
import torch

from selfsup.kernels import dino_loss, dino_loss_ref
from selfsup.kernels.testing import assert_scaled_grad_verdict

SCALE = 65536.0
TAU_S, TAU_T = 0.1, 0.04


def make(v, b, k, dtype, scale=0.3):
    s = (torch.randn(v * b, k) * scale).to(dtype)
    t = (torch.randn(2 * b, k) * scale).to(dtype)
    c = (torch.randn(k) * 0.1).to(dtype).float()  # DINOLoss keeps an fp32 center
    return s, t, c


def scaled_grad(fn, s, t, c, *, autocast=None):
    s = s.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(s, t, c, student_temp=TAU_S, teacher_temp=TAU_T)
    (g,) = torch.autograd.grad(loss, s, grad_outputs=torch.full_like(loss, SCALE))
    return g


def metrics(g, exact, dtype):
    """(exact zeros, mean and max relative error over the normal-range entries, max
    absolute error)."""
    err = (g.double() - exact).abs()
    normal = exact.abs() >= torch.finfo(dtype).tiny
    rel = err[normal] / exact.abs()[normal]
    return int((g == 0).sum()), rel.mean().item(), rel.max().item(), err.max().item()


def audit(monkeypatch, path, v, b, k, dtype):
    s, t, c = make(v, b, k, dtype)
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    ours = scaled_grad(dino_loss, s, t, c)
    monkeypatch.setenv("SELFSUP_KERNELS", "ref")
    exact = scaled_grad(dino_loss_ref, s.double(), t.double(), c.double())
    theirs = scaled_grad(dino_loss_ref, s, t, c, autocast=dtype)
    assert ours.dtype == dtype and theirs.dtype == dtype
    assert exact.abs().max() > 1.0  # the scale did arrive: far above fp16's floor
    ours_m, torch_m = metrics(ours, exact, dtype), metrics(theirs, exact, dtype)
    floor_m = metrics(exact.to(dtype), exact, dtype)
    assert_scaled_grad_verdict(f"{path} {dtype} V={v} B={b} K={k}", ours_m, torch_m, floor_m,
                               ours.numel())


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_gradients_keep_the_loss_scale(seed, monkeypatch, dtype):
    audit(monkeypatch, "torch", 12, 16, 8192, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_gradients_keep_the_loss_scale_production(seed, monkeypatch, dtype):
    audit(monkeypatch, "torch", 12, 16, 65536, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gradients_keep_the_loss_scale(seed, monkeypatch, dtype):
    audit(monkeypatch, "triton", 12, 2, 4096, dtype)


def test_the_audit_catches_a_gradient_rounded_before_the_scale(seed, monkeypatch):
    """The check can fail: dS rounded to fp16 first, scaled afterwards (the old kernels'
    order) is refused."""
    import importlib

    dl = importlib.import_module("selfsup.kernels.dino_loss")
    real = dl._grad_buffer_dtype
    monkeypatch.setattr(dl, "_grad_buffer_dtype", lambda dtype: dtype)
    with pytest.raises(AssertionError, match="exact zeros|rel. error"):
        audit(monkeypatch, "torch", 12, 16, 8192, torch.float16)
    monkeypatch.setattr(dl, "_grad_buffer_dtype", real)


def test_the_verdict_holds_each_figure_to_twice_torchs_or_the_floor():
    ok = (3, 0.1, 0.2, 0.3)
    assert_scaled_grad_verdict("same", ok, ok, (0, 0.01, 0.01, 0.01), 100)
    for i, worse, match in ((0, 7, "exact zeros"), (1, 0.21, "mean rel. error"),
                            (2, 0.41, "max rel. error"), (3, 0.61, "max abs. error")):
        ours = list(ok)
        ours[i] = worse
        with pytest.raises(AssertionError, match=match):
            assert_scaled_grad_verdict("worse", ours, ok, (0, 0.01, 0.01, 0.01), 100)
    # torch's recipe overflowed (NaN figures): the rounded exact gradient is the only bar
    nan = (0, math.nan, math.nan, math.nan)
    assert_scaled_grad_verdict("nan", (1, 0.2, 0.2, 0.2), nan, (0, 0.1, 0.1, 0.1), 100)
    with pytest.raises(AssertionError, match="mean rel. error"):
        assert_scaled_grad_verdict("nan", (1, 0.21, 0.2, 0.2), nan, (0, 0.1, 0.1, 0.1), 100)
