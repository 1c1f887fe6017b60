"""fp16 / bf16 gradients of the MAE loss at GradScaler's scale (issue 22.1).

d pred = 2 w (pred - t) / (P n) with P = 768 pixels per patch and n = 9408 masked patches at
MAE-B (B=64, 224 px, ratio 0.75): ~3e-7 |pred - t|, inside fp16's subnormal range (below
6.1e-5, spacing 6e-8) or under it. GradScaler multiplies the loss by 65536 so that the gradient
lands in fp16's normal range, but only if the kernel meets that scale before it rounds to fp16.
The old kernels rounded first (docs/kernels-mae.md has the before/after figures). Each path's
gradient, upstream 65536, is judged against float64 on the same rounded inputs, beside torch's
own recipe (`masked_patch_loss_ref` on the fp16/bf16 prediction under autocast, loss * 65536
backward):

- exact zeros where the exact gradient is not 0 (kept patches have a zero gradient on every
  path) <= 2x torch's, floored at one entry and at what rounding the exact gradient to the
  dtype leaves;
- the mean element-wise relative error over the entries the dtype holds as normal numbers,
  the largest over the entries >= 1e-3 of the largest, and the largest absolute error, <= 2x
  torch's (floored at the rounding of the exact gradient).

The portable path runs at MAE-B shapes, B=64. The Triton path runs under the interpreter at
B=4 by default (224 px, the same P; n is 16x smaller, so its unscaled gradient sits 16x
higher, still fp16-subnormal: the old kernel left 0.4% zeros and 1.5% mean error there) and
at B=64 when slow tests are selected (~80 s per dtype).
"""

import pytest
import torch

from selfsup.kernels import masked_patch_loss, masked_patch_loss_ref, random_masking
from selfsup.kernels.testing import assert_scaled_grad_verdict

SCALE = 65536.0
PATCH = 16


def make(b, dtype, size=224):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    imgs = torch.rand(b, 3, size, size, generator=g)  # fp32 pixels, as the loaders give
    length = (size // PATCH) ** 2
    _, _, mask = random_masking(b, length, 0.75, generator=g)
    # a prediction early in training: small, so pred - target ~ the normalized target, N(0, 1)
    pred = (torch.randn(b, length, PATCH * PATCH * 3, generator=g) * 0.1).to(dtype)
    return pred, imgs, mask


def scaled_grad(fn, pred, imgs, mask, *, autocast=None):
    pred = pred.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(pred, imgs, mask, PATCH, norm_pix=True)
    (g,) = torch.autograd.grad(loss, pred, grad_outputs=torch.full_like(loss, SCALE))
    return g


def metrics(g, exact, dtype):
    """(exact zeros where the exact gradient is not, mean and max relative error over the
    normal-range entries, max absolute error)."""
    err = (g.double() - exact).abs()
    normal = exact.abs() >= torch.finfo(dtype).tiny
    rel = err[normal] / exact.abs()[normal]
    # the largest relative error is taken where |exact| >= 1e-3 of its maximum: below that,
    # pred ~ target cancels and the fp32 target normalization of either path (not the dtype)
    # sets the error, so torch's and ours differ by luck (seen: 2.1x once in ~10 seeds)
    big = exact.abs() >= max(torch.finfo(dtype).tiny, 1e-3 * exact.abs().max().item())
    rel_big = err[big] / exact.abs()[big]
    return (int(((g == 0) & (exact != 0)).sum()), rel.mean().item(), rel_big.max().item(),
            err.max().item())


def measure(monkeypatch, path, b, dtype):
    """(ours, torch's, the exact gradient rounded to dtype) metrics, and the entry count."""
    pred, imgs, mask = make(b, dtype)
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    ours = scaled_grad(masked_patch_loss, pred, imgs, mask)
    monkeypatch.setenv("SELFSUP_KERNELS", "ref")
    exact = scaled_grad(masked_patch_loss_ref, pred.double(), imgs.double(), mask)
    theirs = scaled_grad(masked_patch_loss_ref, pred, imgs, mask, autocast=dtype)
    assert ours.dtype == dtype and theirs.dtype == dtype
    assert exact.abs().max() > 1e-3  # the scale did arrive: far above fp16's floor
    n = int((exact != 0).sum())
    return (metrics(ours, exact, dtype), metrics(theirs, exact, dtype),
            metrics(exact.to(dtype), exact, dtype), n)


def audit(monkeypatch, path, b, dtype):
    ours_m, torch_m, floor_m, n = measure(monkeypatch, path, b, dtype)
    assert_scaled_grad_verdict(f"{path} {dtype} B={b}", ours_m, torch_m, floor_m, n)


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_gradients_keep_the_loss_scale(seed, monkeypatch, dtype):
    audit(monkeypatch, "torch", 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gradients_keep_the_loss_scale(seed, monkeypatch, dtype):
    audit(monkeypatch, "triton", 4, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gradients_keep_the_loss_scale_mae_b(seed, monkeypatch, dtype):
    audit(monkeypatch, "triton", 64, dtype)  # ~80 s per dtype under the interpreter


def test_the_audit_catches_a_gradient_rounded_before_the_scale(seed, monkeypatch):
    """The check can fail: the gradient rounded to fp16 first and scaled afterwards (the old
    kernels' order) is refused at MAE-B."""
    import importlib

    tp = importlib.import_module("selfsup.kernels.mae._torch")
    monkeypatch.setattr(tp, "grad_buffer_dtype", lambda dtype: dtype)
    with pytest.raises(AssertionError, match="exact zeros|rel. error"):
        audit(monkeypatch, "torch", 64, torch.float16)
