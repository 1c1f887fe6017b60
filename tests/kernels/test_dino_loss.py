"""DINO loss: the portable and Triton paths against the official pair loop (dino_loss_ref).

Triton runs through the interpreter on CPU, so its shapes stay small (odd K, few rows); the
column loop is exercised by forcing a small tile. float64 comparisons are tight for both
paths (the kernels compute in float64 for float64 inputs).
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.kernels import DINOLoss, dino_loss, dino_loss_ref, teacher_temp_schedule
from selfsup.kernels.testing import TOL64, assert_lowp_close

dl = importlib.import_module("selfsup.kernels.dino_loss")  # the module (the package
# attribute `dino_loss` is the function)
PATHS = ["torch", "triton"]


def make(v, g, b, k, dtype=torch.float64, s_scale=2.0, t_scale=1.0):
    s = (torch.randn(v * b, k, dtype=torch.float64) * s_scale).to(dtype).requires_grad_()
    t = (torch.randn(g * b, k, dtype=torch.float64) * t_scale).to(dtype)
    c = (torch.randn(k, dtype=torch.float64) * 0.3).to(dtype)
    return s, t, c


def loss_and_grad(fn, s, t, c, upstream=1.7, **kw):
    loss = fn(s, t, c, **kw)
    (grad,) = torch.autograd.grad(loss, s, grad_outputs=torch.tensor(upstream, dtype=loss.dtype))
    return loss.detach(), grad


def assert_matches_ref(s, t, c, **kw):
    l0, g0 = loss_and_grad(dino_loss_ref, s, t, c, **kw)
    l1, g1 = loss_and_grad(dino_loss, s, t, c, **kw)
    torch.testing.assert_close(l1, l0, **TOL64)
    torch.testing.assert_close(g1, g0, **TOL64)


# ----------------------------------------------------------------------------- float64
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("v,g,b,k", [(2, 2, 3, 64), (4, 2, 5, 1000), (12, 2, 2, 300),
                                     (4, 2, 1, 1000), (3, 1, 4, 129), (5, 3, 2, 77)])
def test_float64_matches_ref(seed, backend, path, v, g, b, k):
    backend(path)
    s, t, c = make(v, g, b, k)
    assert_matches_ref(s, t, c, n_global=g)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
@pytest.mark.parametrize("student_temp", [0.1, 0.2])
def test_temperature_sweep(seed, backend, path, teacher_temp, student_temp):
    backend(path)
    s, t, c = make(4, 2, 3, 257, s_scale=5.0, t_scale=3.0)  # large logits: sharp softmaxes
    assert_matches_ref(s, t, c, student_temp=student_temp, teacher_temp=teacher_temp)


@pytest.mark.parametrize("path", PATHS)
def test_center_as_row_and_noncontiguous_inputs(seed, backend, path):
    backend(path)
    v, g, b, k = 4, 2, 3, 101
    base = torch.randn(v * b, k + 7, dtype=torch.float64)
    s = base[:, 3:k + 3].requires_grad_()  # row stride != K
    t = torch.randn(k, g * b, dtype=torch.float64).t()  # column stride != 1
    c = torch.randn(1, k, dtype=torch.float64)
    assert_matches_ref(s, t, c)


@pytest.mark.parametrize("stats_bk,bk,iters", [(128, 128, 2), (64, 256, 1), (1024, 512, 3)])
def test_triton_tile_merges_and_side_outputs(seed, stats_bk, bk, iters):
    """Small tiles force many ragged column tiles, so every row statistic is merged from
    partials; iters > 1 runs several batch sub-blocks per program (B=5 with sub-blocks of 4:
    the last is partly, or at iters=3 wholly, past B)."""
    v, g, b, k = 4, 2, 5, 1000
    s, t, c = make(v, g, b, k, t_scale=4.0)
    loss, ent, colsum, saved = dl.dino_loss_fwd_triton(
        s.detach(), t, c, 0.1, 0.04, g, stats_block_k=stats_bk, block_k=bk, iters=iters)
    ds = dl.dino_loss_bwd_triton(saved, torch.tensor(-3.0, dtype=torch.float64))
    l0, g0 = loss_and_grad(dino_loss_ref, s, t, c, upstream=-3.0)
    torch.testing.assert_close(loss, l0, **TOL64)
    torch.testing.assert_close(ds, g0, **TOL64)
    torch.testing.assert_close(ent, direct_entropy(t, c, 0.04), **TOL64)
    torch.testing.assert_close(colsum, t.sum(0), **TOL64)


@pytest.mark.parametrize("path", PATHS)
def test_tensor_temperatures(seed, backend, path):
    """Temperatures as 1-element tensors (a schedule's entry) give the float results; one on
    another device is refused by name."""
    backend(path)
    s, t, c = make(4, 2, 3, 300, t_scale=3.0)
    l0, g0 = loss_and_grad(dino_loss_ref, s, t, c, student_temp=0.12, teacher_temp=0.05)
    l1, g1 = loss_and_grad(dino_loss, s, t, c, student_temp=torch.tensor([0.12]),
                           teacher_temp=torch.tensor(0.05, dtype=torch.float64))
    torch.testing.assert_close(l1, l0, **TOL64)
    torch.testing.assert_close(g1, g0, **TOL64)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(s, t, c, teacher_temp=torch.tensor(0.05, device="meta"))
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss(s, t, c, student_temp=torch.tensor([0.1, 0.2]))


def test_triton_launches_run_under_the_device_guard(seed, monkeypatch):
    """Every kernel launch (forward and backward) happens inside device_guard(tensor)."""
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    inside, launched = [], []

    class Guard:
        def __init__(self, t):
            self.t = t

        def __enter__(self):
            inside.append(self.t.device)

        def __exit__(self, *exc):
            inside.pop()

    class Spy:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert inside, f"{self.name} launched outside device_guard"
                launched.append(self.name)
                return self.fn[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(dl, "device_guard", Guard)
    kernels = [n for n in vars(dl) if n.startswith("_dino_") and n.endswith("_kernel")]
    for name in kernels:
        monkeypatch.setattr(dl, name, Spy(getattr(dl, name), name))
    s, t, c = make(4, 2, 3, 50)
    loss_and_grad(dino_loss, s, t, c)
    assert sorted(set(launched)) == sorted(kernels)


def test_triton_path_reads_nothing_on_the_host(seed, monkeypatch):
    """Forward and backward of the GPU path call no .item() / float() / bool() on a tensor
    (on CUDA each is a device sync): temperatures and the upstream gradient stay device
    memory. Device tensors are simulated by patching the readers to fail."""
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    s, t, c = make(4, 2, 3, 50)
    tau_t = torch.tensor(0.05, dtype=torch.float64)
    want = loss_and_grad(dino_loss_ref, s, t, c, upstream=65536.0, teacher_temp=0.05)
    calls = []

    def refuse(name):
        def reader(self, *a, **kw):
            calls.append(name)
            raise AssertionError(f"Tensor.{name} called inside dino_loss")
        return reader

    monkeypatch.setattr(dl, "_temperature", lambda name, value, like: value)  # as on CUDA
    # the op body reads (checks) only CPU tensors; a device tensor passes through unread
    monkeypatch.setattr(dl, "join_temperature",
                        lambda tensor, value, *a: value if tensor is None else tensor)
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    got = loss_and_grad(dino_loss, s, t, c, upstream=65536.0, teacher_temp=tau_t)
    monkeypatch.undo()
    assert not calls
    torch.testing.assert_close(got[0], want[0], **TOL64)
    torch.testing.assert_close(got[1], want[1], **TOL64)


def test_torch_ragged_blocks(seed):
    """Batch blocks and teacher row blocks that do not divide B and G*B."""
    v, g, b, k = 5, 2, 7, 200
    s, t, c = make(v, g, b, k)
    loss, ent, colsum, ds = dl.dino_loss_fwd_torch(s.detach(), t, c, 0.1, 0.04, g, True,
                                                   block_b=3, teacher_rows=4)
    l0, g0 = loss_and_grad(dino_loss_ref, s, t, c, upstream=1.0)
    torch.testing.assert_close(loss, l0, **TOL64)
    torch.testing.assert_close(ds, g0, **TOL64)
    torch.testing.assert_close(ent, direct_entropy(t, c, 0.04), **TOL64)
    torch.testing.assert_close(colsum, t.sum(0), **TOL64)


def test_torch_softmax_copy_fallback(seed, monkeypatch):
    """The portable path soft-maxes in place when aten allows it; the copying fallback
    (for a torch that would not) gives the same result."""
    assert dl._softmax_inplace_ok("cpu")
    monkeypatch.setattr(dl, "_softmax_inplace_ok", lambda device_type: False)
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    s, t, c = make(4, 2, 3, 300, t_scale=3.0)
    assert_matches_ref(s, t, c)


@pytest.mark.parametrize("path", PATHS)
def test_finite_differences(seed, backend, path):
    backend(path)
    s, t, c = make(3, 2, 2, 9)
    _, grad = loss_and_grad(dino_loss, s, t, c, upstream=1.0)
    eps = 1e-6
    for idx in [(0, 0), (2, 4), (5, 8)]:  # a global view of each teacher, and a local view
        sp, sm = s.detach().clone(), s.detach().clone()
        sp[idx] += eps
        sm[idx] -= eps
        fd = (dino_loss(sp, t, c) - dino_loss(sm, t, c)) / (2 * eps)
        assert abs(fd.item() - grad[idx].item()) < 1e-7 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize("path", PATHS)
def test_plain_backward_and_teacher_gets_no_grad(seed, backend, path):
    """loss.backward() fills .grad of the student only. A second backward through the same
    graph gives the same gradient again: Triton recomputes dS; the portable path scaled its
    saved dS in place on the first backward (CPU) and scales it by the ratio of the upstream
    gradients into a fresh tensor on the next (`_custom_op.scaled_grad_buffer`)."""
    backend(path)
    s, t, c = make(4, 2, 3, 50)
    t.requires_grad_()
    c.requires_grad_()
    ref = torch.autograd.grad(dino_loss_ref(s, t.detach(), c.detach()), s)[0]
    loss = dino_loss(s, t, c)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, ref, **TOL64)
    assert t.grad is None and c.grad is None
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * ref, **TOL64)


@pytest.mark.parametrize("path", PATHS)
def test_no_grad_forward(seed, backend, path):
    backend(path)
    s, t, c = make(4, 2, 3, 50)
    with torch.no_grad():
        loss = dino_loss(s, t, c)
        ref = dino_loss_ref(s, t, c)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, **TOL64)


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(seed, backend, path, dtype):
    """Our result on rounded inputs vs float64 on the same inputs: <= 2x torch's own error
    in that dtype + atol, at tau_t = 0.04. The center is fp32 (allowed with lowp logits),
    holding lowp-representable values so that all three see the same inputs."""
    backend(path)
    s, t, c = make(4, 2, 3, 1000, dtype=dtype, s_scale=1.0, t_scale=1.0)
    c32 = c.float()
    s64 = s.detach().double().requires_grad_()
    l64, g64 = loss_and_grad(dino_loss_ref, s64, t.double(), c.double())
    l_lp, g_lp = loss_and_grad(dino_loss_ref, s, t, c)
    l_ours, g_ours = loss_and_grad(dino_loss, s, t, c32)
    assert g_ours.dtype == dtype and l_ours.dtype == torch.float32
    assert_lowp_close("loss", l_ours, l64, l_lp, dtype)
    assert_lowp_close("grad", g_ours, g64, g_lp, dtype)


# ----------------------------------------------------------------------------- stats, center
def direct_entropy(t, c, tau):
    p = F.softmax((t.double() - c.double().reshape(1, -1)) / tau, -1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean()


@pytest.mark.parametrize("path", ["torch", "triton", "ref"])
def test_center_ema_and_collapse_stats(seed, backend, path):
    backend(path)
    v, g, b, k, m = 4, 2, 3, 300, 0.9
    crit = DINOLoss(k, center_momentum=m).double()
    c0 = torch.randn(1, k, dtype=torch.float64)
    crit.center.copy_(c0)
    for _step in range(2):
        s, t, _ = make(v, g, b, k, t_scale=2.0)
        old = crit.center.clone()
        loss = crit(s, t, teacher_temp=0.05)
        torch.testing.assert_close(loss, dino_loss_ref(s, t, old, teacher_temp=0.05), **TOL64)
        # the official update: c <- m c + (1 - m) * sum(t) / (len(t) * world)
        want = old * m + (1 - m) * (t.sum(0, keepdim=True) / len(t))
        torch.testing.assert_close(crit.center, want, **TOL64)
        ent = direct_entropy(t, old, 0.05)
        stats = crit.last_stats
        torch.testing.assert_close(stats["teacher_entropy"], ent, **TOL64)
        # KL = mean over pairs of CE - H(teacher view of the pair)
        ce = loss.detach()
        torch.testing.assert_close(stats["kl"], ce - ent, **TOL64)
        assert stats["kl"].item() >= -1e-9
        loss.backward()
    assert crit.center.shape == (1, k)


@pytest.mark.parametrize("path", PATHS)
def test_dinoloss_fp32_center_with_bf16_logits(seed, backend, path):
    """DINOLoss keeps an fp32 center; AMP logits are bf16."""
    backend(path)
    k = 200
    crit = DINOLoss(k)
    s, t, _ = make(4, 2, 3, k, dtype=torch.bfloat16)
    loss = crit(s, t)
    loss.backward()
    assert crit.center.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    want = 0.1 * t.float().sum(0, keepdim=True) / len(t)
    torch.testing.assert_close(crit.center, want, rtol=1e-5, atol=1e-6)
    assert math.isfinite(crit.last_stats["teacher_entropy"].item())


def test_teacher_temp_schedule():
    sched = teacher_temp_schedule(10, 4, 0.04, 0.07)
    assert sched.dtype == torch.float64 and len(sched) == 10
    torch.testing.assert_close(sched[:4], torch.linspace(0.04, 0.07, 4, dtype=torch.float64))
    assert (sched[4:] == 0.07).all()
    assert len(teacher_temp_schedule(3, 5)) == 3


# ----------------------------------------------------------------------------- validation
def _bad_cases():
    s, t, c = (torch.randn(8, 16), torch.randn(4, 16), torch.zeros(16))  # B=2, V=4
    yield "student_out", dict(student_out=torch.randn(7, 16))  # not a multiple of B
    yield "teacher_out", dict(teacher_out=torch.randn(5, 16))  # not n_global * B
    yield "teacher_out", dict(teacher_out=torch.randn(4, 15))  # mismatched K
    yield "teacher_out", dict(teacher_out=torch.randn(0, 16))
    yield "n_global", dict(teacher_out=torch.randn(10, 16), n_global=5)  # B=2: V=4 < 5
    yield "n_global", dict(n_global=0)
    yield "student_out", dict(student_out=torch.randn(2, 16), teacher_out=torch.randn(2, 16),
                              n_global=1)  # V=1: no pair
    yield "student_out", dict(student_out=torch.randn(8, 2, 8))
    yield "student_temp", dict(student_temp=0.0)
    yield "teacher_temp", dict(teacher_temp=-0.04)
    yield "center", dict(center=torch.zeros(2, 16))
    yield "center", dict(center=torch.zeros(17))
    yield "center", dict(center=torch.zeros(1, 1, 16))
    yield "teacher_out", dict(teacher_out=t.double())
    yield "center", dict(center=c.half())
    yield "center", dict(student_out=s.double(), teacher_out=t.double())  # fp32 center, fp64
    yield "center", dict(center=c.to("meta"))  # another device
    yield "student_out", dict(student_out=s.long())


@pytest.mark.parametrize("path", ["torch", "triton", "ref"])
@pytest.mark.parametrize("arg,override", list(_bad_cases()))
def test_validation(backend, path, arg, override):
    backend(path)
    kw = dict(student_out=torch.randn(8, 16), teacher_out=torch.randn(4, 16),
              center=torch.zeros(16), student_temp=0.1, teacher_temp=0.04, n_global=2)
    kw.update(override)
    with pytest.raises(ValueError, match=arg):
        dino_loss(**kw)


def test_validation_accepts_fp32_center_with_lowp_logits():
    s, t = torch.randn(8, 16, dtype=torch.float16), torch.randn(4, 16, dtype=torch.float16)
    assert torch.isfinite(dino_loss(s, t, torch.zeros(1, 16)))
