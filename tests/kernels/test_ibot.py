"""iBOT patch loss: the portable and Triton paths against the papers' formula (the ref).

Triton runs through the interpreter on CPU: small shapes (K not a power of 2, N odd); small
forced tiles exercise the partial merges and the row loop. float64 comparisons are tight
(the kernels compute in float64 for float64 inputs). Both layouts ((B, N, K) with a host or a
device mask, gathered (M, K)), the center and probabilities modes, temperatures down to
0.04, upstream gradients != 1, fp16/bf16 at GradScaler's 65536, bad input.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.kernels import ibot_patch_loss, ibot_patch_loss_ref, iBOTPatchLoss
from selfsup.kernels.testing import TOL64, assert_scaled_grad_verdict

ib = importlib.import_module("selfsup.kernels.ibot")
tri = importlib.import_module("selfsup.kernels._ibot_triton")
PATHS = ["torch", "triton"]
SCALE = 65536.0


def make_mask(b, n, ratio=0.4):
    """Random mask with an image without a masked token (if b > 1) and one all masked (if
    b > 2): the normalisation's edge cases."""
    m = torch.rand(b, n) < ratio
    m[0, n // 2] = True
    if b > 1:
        m[1] = False
    if b > 2:
        m[2] = True
    return m


def make(b, n, k, *, probs=False, dtype=torch.float64, layout=3, mask=None, s_scale=2.0,
         t_scale=1.0):
    mask = make_mask(b, n) if mask is None else mask
    s = torch.randn(b, n, k, dtype=torch.float64) * s_scale
    t = torch.randn(b, n, k, dtype=torch.float64) * t_scale
    if probs:
        t = F.softmax(t * 3, -1)
    c = None if probs else torch.randn(k, dtype=torch.float64) * 0.3
    if layout == 2:
        s, t = s[mask], t[mask]
    c = None if c is None else c.to(dtype)
    return s.to(dtype).requires_grad_(), t.to(dtype), mask, c


def loss_and_grad(fn, s, t, mask, c, upstream=1.7, **kw):
    loss = fn(s, t, mask, c, **kw)
    (g,) = torch.autograd.grad(loss, s, grad_outputs=torch.tensor(upstream, dtype=loss.dtype))
    return loss.detach(), g


def assert_matches_ref(s, t, mask, c, upstream=1.7, **kw):
    l0, g0 = loss_and_grad(ibot_patch_loss_ref, s, t, mask, c, upstream, **kw)
    l1, g1 = loss_and_grad(ibot_patch_loss, s, t, mask, c, upstream, **kw)
    torch.testing.assert_close(l1, l0, **TOL64)
    torch.testing.assert_close(g1, g0, **TOL64)
    return l1, g1


def paper_loss(s, t, mask, c, tau_s, tau_t):
    """Independent of the ref: an explicit loop over images and their masked tokens."""
    b = mask.shape[0]
    total = 0.0
    for i in range(b):
        toks = mask[i].nonzero()[:, 0]
        if len(toks) == 0:
            continue
        si, ti = s[i, toks].double(), t[i, toks].double()
        p = ti if c is None else F.softmax((ti - c.double()) / tau_t, -1)
        total = total + (-(p * F.log_softmax(si / tau_s, -1)).sum(-1)).mean()
    return total / b


# ----------------------------------------------------------------------------- float64
def test_ref_is_the_papers_loss(seed):
    for probs in (False, True):
        s, t, mask, c = make(4, 9, 50, probs=probs)
        want = paper_loss(s, t, mask, c, 0.1, 0.04)
        torch.testing.assert_close(ibot_patch_loss_ref(s, t, mask, c, teacher_temp=0.04), want,
                                   **TOL64)
        got2 = ibot_patch_loss_ref(s[mask], t[mask], mask, c, teacher_temp=0.04)
        torch.testing.assert_close(got2, want, **TOL64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("layout", [3, 2])
@pytest.mark.parametrize("b,n,k", [(3, 7, 37), (4, 5, 300), (1, 9, 129)])
def test_float64_matches_ref(seed, backend, path, probs, layout, b, n, k):
    backend(path)
    s, t, mask, c = make(b, n, k, probs=probs, layout=layout)
    assert_matches_ref(s, t, mask, c, upstream=-2.3, student_temp=0.07, teacher_temp=0.04)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("probs", [False, True])
def test_layouts_agree(seed, backend, path, probs):
    """(B, N, K) and the gathered (M, K) give the same loss, and the 3-D gradient is the
    2-D one scattered to the masked rows (zero elsewhere)."""
    backend(path)
    s, t, mask, c = make(4, 7, 101, probs=probs)
    l3, g3 = loss_and_grad(ibot_patch_loss, s, t, mask, c, upstream=3.0)
    s2 = s.detach()[mask].requires_grad_()
    l2, g2 = loss_and_grad(ibot_patch_loss, s2, t[mask], mask, c, upstream=3.0)
    torch.testing.assert_close(l3, l2, **TOL64)
    torch.testing.assert_close(g3[mask], g2, **TOL64)
    assert (g3[~mask] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", [3, 2])
@pytest.mark.parametrize("probs", [False, True])
def test_device_mask_paths(seed, backend, path, monkeypatch, layout, probs):
    """A mask on the device takes sync-free routes (all B*N rows weighted, or an argsort for
    the gathered order); simulated on CPU by declaring the mask not host memory."""
    backend(path)
    s, t, mask, c = make(4, 7, 60, probs=probs, layout=layout)
    want = loss_and_grad(ibot_patch_loss_ref, s, t, mask, c, upstream=0.5)
    monkeypatch.setattr(ib, "_host_mask", lambda m: False)
    got = loss_and_grad(ibot_patch_loss, s, t, mask, c, upstream=0.5)
    torch.testing.assert_close(got[0], want[0], **TOL64)
    torch.testing.assert_close(got[1], want[1], **TOL64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
@pytest.mark.parametrize("student_temp", [0.04, 0.1])
def test_temperature_sweep(seed, backend, path, teacher_temp, student_temp):
    backend(path)
    s, t, mask, c = make(3, 5, 257, s_scale=5.0, t_scale=3.0)  # sharp softmaxes
    assert_matches_ref(s, t, mask, c, student_temp=student_temp, teacher_temp=teacher_temp)


@pytest.mark.parametrize("path", PATHS)
def test_tensor_temperatures_and_center_row(seed, backend, path):
    backend(path)
    s, t, mask, c = make(3, 5, 90, t_scale=3.0)
    # 0.125: exact in float32 (0.12 in a float32 tensor is 2e-8 off, more than TOL64 allows
    # once multiplied into logits of size ~10)
    want = loss_and_grad(ibot_patch_loss_ref, s, t, mask, c, student_temp=0.125,
                         teacher_temp=0.05)
    got = loss_and_grad(ibot_patch_loss, s, t, mask, c.reshape(1, -1),
                        student_temp=torch.tensor([0.125]),
                        teacher_temp=torch.tensor(0.05, dtype=torch.float64))
    torch.testing.assert_close(got[0], want[0], **TOL64)
    torch.testing.assert_close(got[1], want[1], **TOL64)


@pytest.mark.parametrize("bk,iters", [(64, 1), (128, 3), (32, 2)])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("with_idx", [False, True])
def test_triton_tile_merges_and_side_outputs(seed, bk, iters, probs, with_idx):
    """Small tiles: every row statistic is merged from ragged column-tile partials; iters > 1
    runs several row sub-blocks per program (some past the last row)."""
    b, n, k = 3, 7, 300
    s, t, mask, c = make(b, n, k, probs=probs, t_scale=4.0)
    rows, idx, w = ib._rows_and_weights(s.detach(), mask)
    t_rows = t.reshape(rows.shape)
    if not with_idx:  # gathered rows
        rows, t_rows, idx = rows[idx], t_rows[idx], None
    loss, ent, colsum, saved = tri.ibot_fwd_triton(rows, t_rows, c, w, idx, 0.1, 0.04,
                                                   block_k=bk, iters=iters)
    ds = tri.ibot_bwd_triton(rows, t_rows, w, idx, *saved, probs,
                             torch.tensor(-3.0, dtype=torch.float64))
    l0, g0 = loss_and_grad(ibot_patch_loss_ref, s, t, mask, c, upstream=-3.0,
                           teacher_temp=0.04)
    torch.testing.assert_close(loss, l0, **TOL64)
    g0 = g0.reshape(-1, k) if with_idx else g0[mask]
    torch.testing.assert_close(ds, g0, **TOL64)
    tm = t[mask].double()
    torch.testing.assert_close(ent, direct_entropy(tm, c, 0.04), **TOL64)
    torch.testing.assert_close(colsum, tm.sum(0), **TOL64)


def test_torch_ragged_blocks(seed):
    s, t, mask, c = make(4, 9, 70)
    rows, idx, w = ib._rows_and_weights(s.detach(), mask)
    loss, ent, colsum, ds = ib.ibot_loss_fwd_torch(rows, t.reshape(rows.shape), c, w, idx,
                                                   0.1, 0.04, True, block_rows=3)
    l0, g0 = loss_and_grad(ibot_patch_loss_ref, s, t, mask, c, upstream=1.0, teacher_temp=0.04)
    torch.testing.assert_close(loss, l0, **TOL64)
    torch.testing.assert_close(ds, g0.reshape(-1, 70), **TOL64)
    torch.testing.assert_close(ent, direct_entropy(t[mask], c, 0.04), **TOL64)
    torch.testing.assert_close(colsum, t[mask].sum(0), **TOL64)


@pytest.mark.parametrize("path", PATHS)
def test_finite_differences(seed, backend, path):
    backend(path)
    s, t, mask, c = make(3, 3, 9)
    _, grad = loss_and_grad(ibot_patch_loss, s, t, mask, c, upstream=1.0)
    eps = 1e-6
    for idx in [(0, 1, 0), (2, 0, 4), (2, 2, 8), (1, 1, 3)]:  # (1, ...): an unmasked image
        sp, sm = s.detach().clone(), s.detach().clone()
        sp[idx] += eps
        sm[idx] -= eps
        fd = (ibot_patch_loss(sp, t, mask, c) - ibot_patch_loss(sm, t, mask, c)) / (2 * eps)
        assert abs(fd.item() - grad[idx].item()) < 1e-7 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize("path", PATHS)
def test_backward_twice_no_grad_and_teacher_gets_none(seed, backend, path):
    backend(path)
    s, t, mask, c = make(3, 5, 50)
    t.requires_grad_()
    c.requires_grad_()
    ref = torch.autograd.grad(ibot_patch_loss_ref(s, t.detach(), mask, c.detach()), s)[0]
    loss = ibot_patch_loss(s, t, mask, c)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, ref, **TOL64)
    assert t.grad is None and c.grad is None
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * ref, **TOL64)
    with torch.no_grad():
        nl = ibot_patch_loss(s, t, mask, c)
    assert not nl.requires_grad
    torch.testing.assert_close(nl, loss.detach(), **TOL64)


@pytest.mark.parametrize("path", PATHS)
def test_no_masked_token_at_all(seed, backend, path):
    """M = 0: the loss is 0 and so is the gradient (both layouts)."""
    backend(path)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    s, t, _, c = make(2, 5, 30, mask=mask)
    loss, g = loss_and_grad(ibot_patch_loss, s, t, mask, c)
    assert loss.item() == 0.0 and (g == 0).all()
    s2 = torch.zeros(0, 30, dtype=torch.float64, requires_grad=True)
    assert ibot_patch_loss(s2, s2.detach(), mask, c).item() == 0.0


# ----------------------------------------------------------------------------- low precision
def scaled_grad(fn, s, t, mask, c, *, autocast=None):
    s = s.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(s, t, mask, c, student_temp=0.1, teacher_temp=0.04)
    (g,) = torch.autograd.grad(loss, s, grad_outputs=torch.full_like(loss, SCALE))
    return loss.detach(), g


def torch_recipe(s, t, mask, c, student_temp, teacher_temp):
    """What a plain implementation does in the logits' dtype (DINOv2's code in AMP)."""
    p = t if c is None else F.softmax((t - c.to(t.dtype)) / teacher_temp, -1)
    ce = -(p * F.log_softmax(s / student_temp, -1)).sum(-1)
    n_b = mask.sum(1).clamp(min=1)
    if s.dim() == 3:
        return ((ce * mask).sum(1) / n_b).mean()
    return (ce / n_b[mask.nonzero()[:, 0]]).sum() / mask.shape[0]


def metrics(g, exact, dtype):
    """(exact zeros, mean relative error over the entries the dtype holds as normal numbers,
    max relative error over the entries >= 1e-3 of the largest, max absolute error), as
    test_dino_gradscale. The max is taken over the larger entries (as test_mae_gradscale):
    where mass * softmax and P nearly cancel, fp32's own rounding sets it (seen at 2e-3 on
    one entry in a million in the probabilities mode), not the dtype's."""
    err = (g.double() - exact).abs()
    normal = exact.abs() >= torch.finfo(dtype).tiny
    rel = err[normal] / exact.abs()[normal]
    big = exact.abs() >= 1e-3 * exact.abs().max()
    rel_big = err[big] / exact.abs()[big]
    return int((g == 0).sum()), rel.mean().item(), rel_big.max().item(), err.max().item()


def audit(monkeypatch, path, b, n, k, dtype, probs=False):
    """Our gradient at upstream 65536 vs float64 on the same rounded inputs, beside torch's
    recipe in the dtype: zeros and errors within 2x of torch's (or of rounding the exact
    gradient, which nothing can beat). N = 32 keeps n_b >= 4 for the random images, so the
    scaled gradient (<= 65536 w / tau_s) stays inside fp16's range: with 3 masked tokens
    the exact gradient itself passed 65504 (GradScaler would skip that step)."""
    mask = make_mask(b, n, 0.5)
    s, t, _, c = make(b, n, k, probs=probs, dtype=dtype, layout=2, mask=mask, s_scale=0.3,
                      t_scale=0.3)
    c32 = None if c is None else c.float()  # iBOTPatchLoss keeps an fp32 center
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    l_ours, ours = scaled_grad(ibot_patch_loss, s, t, mask, c32)
    monkeypatch.setenv("SELFSUP_KERNELS", "ref")
    c64 = None if c is None else c.double()
    l64, exact = scaled_grad(ibot_patch_loss_ref, s.double(), t.double(), mask, c64)
    _, theirs = scaled_grad(torch_recipe, s, t, mask, c, autocast=dtype)
    assert ours.dtype == dtype and l_ours.dtype == torch.float32
    assert exact.abs().max() > 1.0  # the scale did arrive
    ours_m, torch_m = metrics(ours, exact, dtype), metrics(theirs, exact, dtype)
    floor_m = metrics(exact.to(dtype), exact, dtype)
    where = f"{path} {dtype} B={b} N={n} K={k} probs={probs}"
    # torch's fp16 recipe can itself give NaN here (its fp16 intermediates overflow at 65536):
    # the verdict then holds ours to the rounded exact gradient alone
    assert_scaled_grad_verdict(where, ours_m, torch_m, floor_m, ours.numel())
    assert abs(l_ours.item() - l64.item()) <= 1e-5 * abs(l64.item()) + 1e-6, where


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_gradients_keep_the_loss_scale(seed, monkeypatch, dtype, probs):
    audit(monkeypatch, "torch", 4, 32, 8192, dtype, probs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gradients_keep_the_loss_scale(seed, monkeypatch, dtype):
    audit(monkeypatch, "triton", 4, 32, 1024, dtype)


def test_the_audit_catches_a_gradient_rounded_before_the_scale(seed, monkeypatch):
    """The check can fail: dS rounded to fp16 before the scale meets it is refused."""
    monkeypatch.setattr(ib, "_grad_buffer_dtype", lambda dtype: dtype)
    with pytest.raises(AssertionError, match="exact zeros|rel. error"):
        audit(monkeypatch, "torch", 4, 32, 8192, torch.float16)


# ----------------------------------------------------------------------------- the module
def direct_entropy(t_rows, c, tau):
    p = t_rows.double() if c is None else F.softmax((t_rows.double() - c.double()) / tau, -1)
    return -torch.special.xlogy(p, p).sum(-1).mean()


@pytest.mark.parametrize("path", ["torch", "triton", "ref"])
def test_module_center_ema_and_entropy(seed, backend, path):
    backend(path)
    b, n, k, m = 3, 5, 80, 0.9
    crit = iBOTPatchLoss(k, center_momentum=m).double()
    crit.center.copy_(torch.randn(1, k, dtype=torch.float64))
    for layout in (3, 2):
        s, t, mask, _ = make(b, n, k, layout=layout, t_scale=2.0)
        old = crit.center.clone()
        loss = crit(s, t, mask, teacher_temp=0.05)
        want = ibot_patch_loss_ref(s, t, mask, old, teacher_temp=0.05)
        torch.testing.assert_close(loss, want, **TOL64)
        tm = t[mask] if layout == 3 else t
        # DINOv2: c <- m c + (1 - m) mean of the masked tokens' teacher logits
        torch.testing.assert_close(crit.center, old * m + (1 - m) * tm.mean(0, keepdim=True),
                                   **TOL64)
        torch.testing.assert_close(crit.last_stats["teacher_entropy"],
                                   direct_entropy(tm, old, 0.05), **TOL64)
        loss.backward()
    # no masked token anywhere: the center is kept
    mask = torch.zeros(b, n, dtype=torch.bool)
    old = crit.center.clone()
    crit(torch.randn(b, n, k, dtype=torch.float64), torch.randn(b, n, k, dtype=torch.float64),
         mask)
    torch.testing.assert_close(crit.center, old, **TOL64)


@pytest.mark.parametrize("path", PATHS)
def test_module_fp32_center_with_bf16_logits(seed, backend, path):
    backend(path)
    k = 200
    crit = iBOTPatchLoss(k)
    s, t, mask, _ = make(3, 5, k, dtype=torch.bfloat16)
    loss = crit(s, t, mask)
    loss.backward()
    assert crit.center.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    torch.testing.assert_close(crit.center, 0.1 * t[mask].float().mean(0, keepdim=True),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- validation
def _fixed_mask():
    return torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)


def _bad_cases():
    b, n, k = 2, 5, 16
    mask = _fixed_mask()
    m = int(mask.sum())
    yield "student_patches", dict(student_patches=torch.randn(b, n))  # 1-D rows
    yield "student_patches", dict(student_patches=torch.randn(b, n, k).long())
    yield "teacher_patches", dict(teacher_patches=torch.randn(b, n, k + 1))
    yield "teacher_patches", dict(teacher_patches=torch.randn(b, n, k).double())
    yield "teacher_patches", dict(teacher_patches=torch.randn(b, n, k, device="meta"))
    yield "mask", dict(mask=mask.float())
    yield "mask", dict(mask=torch.ones(b, n + 1, dtype=torch.bool))
    yield "mask", dict(mask=torch.ones(b * n, dtype=torch.bool))
    yield "M = mask.sum", dict(student_patches=torch.randn(m + 1, k),
                               teacher_patches=torch.randn(m + 1, k))
    yield "center", dict(center=torch.zeros(k + 1))
    yield "center", dict(center=torch.zeros(2, k))
    yield "center", dict(center=torch.zeros(k).half())
    yield "center", dict(center=torch.zeros(k, device="meta"))
    yield "student_temp", dict(student_temp=0.0)
    yield "student_temp", dict(student_temp=torch.tensor([0.1, 0.2]))
    yield "teacher_temp", dict(teacher_temp=-0.04)
    yield "teacher_temp", dict(teacher_temp=torch.tensor(0.05, device="meta"))


@pytest.mark.parametrize("path", ["torch", "triton", "ref"])
@pytest.mark.parametrize("arg,override", list(_bad_cases()))
def test_validation(backend, path, arg, override):
    backend(path)
    torch.manual_seed(0)
    b, n, k = 2, 5, 16
    kw = dict(student_patches=torch.randn(b, n, k), teacher_patches=torch.randn(b, n, k),
              mask=_fixed_mask(), center=torch.zeros(k), student_temp=0.1,
              teacher_temp=0.04)
    kw.update(override)
    with pytest.raises(ValueError, match=arg):
        ibot_patch_loss(**kw)


def test_center_none_ignores_teacher_temp():
    s, t, mask, _ = make(2, 5, 16, probs=True)
    assert torch.isfinite(ibot_patch_loss(s, t, mask, None, teacher_temp=-1.0))


# ----------------------------------------------------------------------------- custom ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("with_idx", [False, True])
def test_opcheck(seed, path, dtype, probs, with_idx):
    s, t, mask, c = make(3, 5, 37, probs=probs, dtype=dtype)
    rows, idx, w = ib._rows_and_weights(s.detach(), mask)
    t_rows = t.reshape(rows.shape)
    if not with_idx:
        rows, t_rows, idx = rows[idx], t_rows[idx], None
    rows = rows.detach().requires_grad_()
    for ts in ((None, 0.1), (torch.tensor(0.1, dtype=dtype), 0.0)):
        args = (rows, t_rows, c, w, idx, *ts, None, 0.04, path, True)
        torch.library.opcheck(ib._ibot_fwd_op, args)
    out = ib._ibot_fwd_op(*args)
    g = torch.tensor(1.7, dtype=out[0].dtype)
    if path == "triton":
        saved = [x.detach() for x in out[3:7]]
        torch.library.opcheck(ib._ibot_bwd_op, (rows.detach(), t_rows, w, idx, *saved, probs, g))


def test_ops_are_registered_in_the_selfsup_namespace():
    for name in ("ibot_loss_fwd", "ibot_loss_bwd"):
        assert hasattr(torch.ops.selfsup, name)


def _compiled(fn, **kw):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True, **kw), counter


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", [3, 2])
@pytest.mark.parametrize("probs", [False, True])
def test_compiled_matches_eager(seed, backend, path, layout, probs):
    """torch.compile(fullgraph=True) traces the host-mask call (as the device routes: no
    nonzero while tracing) and matches eager; a tensor temperature's new value reuses the
    graph."""
    torch._dynamo.reset()
    backend(path)
    s, t, mask, c = make(3, 5, 37, probs=probs, layout=layout)
    cfn, counter = _compiled(ibot_patch_loss)
    frames = []
    for tt in (torch.tensor(0.04, dtype=torch.float64), torch.tensor(0.07, dtype=torch.float64)):
        want = loss_and_grad(ibot_patch_loss, s, t, mask, c, teacher_temp=tt)
        got = loss_and_grad(cfn, s, t, mask, c, teacher_temp=tt)
        torch.testing.assert_close(got[0], want[0], **TOL64)
        torch.testing.assert_close(got[1], want[1], **TOL64)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]  # the new temperature: no recompile
    torch._dynamo.reset()


@pytest.mark.parametrize("path", PATHS)
def test_compiled_module_updates_its_center_like_eager(seed, backend, path):
    torch._dynamo.reset()
    backend(path)
    k = 37
    eager, compiled = iBOTPatchLoss(k).double(), iBOTPatchLoss(k).double()
    cmod, _ = _compiled(compiled)
    for _ in range(2):  # the second call sees the first one's center update
        s, t, mask, _c = make(3, 5, k, layout=2)
        want = loss_and_grad(lambda *a, **kw: eager(*a[:3]), s, t, mask, None)
        got = loss_and_grad(lambda *a, **kw: cmod(*a[:3]), s, t, mask, None)
        torch.testing.assert_close(got[0], want[0], **TOL64)
        torch.testing.assert_close(got[1], want[1], **TOL64)
        torch.testing.assert_close(compiled.center, eager.center, **TOL64)
        torch.testing.assert_close(compiled.last_stats["teacher_entropy"],
                                   eager.last_stats["teacher_entropy"], **TOL64)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- launches
def test_triton_launches_registered_configs_and_read_nothing_on_the_host(seed, monkeypatch):
    """Every launch (both layouts, both modes, bf16 at a DINOv2 head width's tiles) is a
    registered configuration, runs under device_guard, and no tensor is read on the host
    (on CUDA each read is a sync). K = 8192 (iBOT's head) keeps the registered finish tile."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from launch_recorder import LaunchRecorder

    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    inside = []

    class Guard:
        def __init__(self, t):
            self.t = t

        def __enter__(self):
            inside.append(1)

        def __exit__(self, *exc):
            inside.pop()

    monkeypatch.setattr(tri, "device_guard", Guard)
    k = 8192
    for probs in (False, True):
        for layout in (2, 3):
            mask = torch.zeros(2, 3, dtype=torch.bool)
            mask[0, 1] = mask[1, 0] = mask[1, 2] = True
            s, t, _, c = make(2, 3, k, probs=probs, dtype=torch.bfloat16, layout=layout,
                              mask=mask)
            c = None if c is None else c.float()
            with LaunchRecorder() as rec:
                def refuse(*a, **kw):
                    raise AssertionError("a tensor was read on the host")

                with monkeypatch.context() as mp:
                    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
                        mp.setattr(torch.Tensor, name, refuse)
                    # the host mask is read before the op (free on the host): done here first
                    rows, idx, w = ib._rows_and_weights(s, mask)
                    mp.setattr(ib, "_rows_and_weights", lambda *_a, r=(rows, idx, w): r)
                    mp.setattr(ib, "_validate",
                               lambda *_a, v=(0.1, None if probs else 0.07): v)
                    loss = ibot_patch_loss(s, t, mask, c)
                    loss.backward(torch.tensor(65536.0))
            assert rec.launches and not rec.unregistered(), [x.describe() for x in
                                                             rec.unregistered()]
            assert not inside
            want = ibot_patch_loss_ref(s.detach().double(), t.double(), mask,
                                       None if c is None else c.double())
            assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
