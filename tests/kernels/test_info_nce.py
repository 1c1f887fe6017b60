"""InfoNCE family: the Triton and portable paths against the papers' references.

Every comparison is float64 (both paths compute in fp64 there, so TOL64 is tight), covers the
loss and every input gradient, and uses an upstream gradient of 1.7. Triton runs through the
interpreter on CPU, so its shapes stay small but odd.
"""

import pytest
import torch
import torch.nn.functional as F

from selfsup.kernels import MoCoQueue, info_nce_batch, info_nce_queue, nt_xent
from selfsup.kernels import _info_nce_torch as inf_torch
from selfsup.kernels import info_nce as inf
from selfsup.kernels.info_nce import info_nce_batch_ref, info_nce_queue_ref, nt_xent_ref
from selfsup.kernels.testing import TOL64, assert_lowp_close

BACKENDS = ["torch", "triton"]
UPSTREAM = 1.7
F64 = torch.float64
# kind: (fused, reference, names of the tensor arguments)
OPS = {
    "queue": (info_nce_queue, info_nce_queue_ref, ("q", "k", "queue")),
    "batch": (info_nce_batch, info_nce_batch_ref, ("q", "k")),
    "nt_xent": (nt_xent, nt_xent_ref, ("z1", "z2")),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Many chunks at test sizes, so the portable path's online rescaling and row chunking
    (and their ragged last chunks) are exercised, not just one full-width step."""
    monkeypatch.setattr(inf_torch, "CHUNK_ELEMS", 500)


def make(kind, n, c, m=None, *, dtype=F64, scale=1.0):
    """Fresh inputs; m is K (queue) or M (batch). The queue is unit-norm, as MoCo keeps it."""
    if kind == "queue":
        return [scale * torch.randn(n, c, dtype=dtype), scale * torch.randn(n, c, dtype=dtype),
                F.normalize(torch.randn(m, c, dtype=dtype), dim=1)]
    if kind == "batch":
        return [scale * torch.randn(n, c, dtype=dtype), scale * torch.randn(m, c, dtype=dtype)]
    return [scale * torch.randn(n, c, dtype=dtype), scale * torch.randn(n, c, dtype=dtype)]


def loss_and_grads(fn, args, requires, temperature, **kw):
    leaves = [a.detach().clone().requires_grad_(r) for a, r in zip(args, requires, strict=True)]
    loss = fn(*leaves, temperature, **kw)
    wrt = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, wrt, grad_outputs=torch.full_like(loss, UPSTREAM))
    return [loss.detach(), *grads]


def assert_matches_ref(kind, backend, monkeypatch, args, temperature, requires=None, **kw):
    """Our loss and gradients == the reference's, in float64, for each given grad subset."""
    fused, ref, names = OPS[kind]
    requires = requires or [name != "queue" for name in names]
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    ours = loss_and_grads(fused, args, requires, temperature, **kw)
    want = loss_and_grads(ref, args, requires, temperature, **kw)
    labels = ["loss", *[f"d{n}" for n, r in zip(names, requires, strict=True) if r]]
    for label, a, b in zip(labels, ours, want, strict=True):
        assert a.dtype == b.dtype == F64
        torch.testing.assert_close(a, b, **TOL64, msg=lambda m, lb=label: f"{kind} {lb}: {m}")


# ----------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_odd_shape(seed, monkeypatch, backend, normalize):
    args = make("queue", 37, 100, 1000)
    assert_matches_ref("queue", backend, monkeypatch, args, 0.07, normalize=normalize)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_odd_shape_with_offset(seed, monkeypatch, backend, normalize):
    args = make("batch", 37, 100, 131)  # M > N, label of row i is i + 50
    assert_matches_ref("batch", backend, monkeypatch, args, 0.2, positive_offset=50,
                       normalize=normalize)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_odd_shape(seed, monkeypatch, backend, normalize):
    args = make("nt_xent", 37, 100)
    assert_matches_ref("nt_xent", backend, monkeypatch, args, 0.1, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_single_row(seed, monkeypatch, backend, kind):
    kw = {"positive_offset": 2} if kind == "batch" else {}
    args = make(kind, 1, 17, 3 if kind == "batch" else 70)
    assert_matches_ref(kind, backend, monkeypatch, args, 0.07, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_non_contiguous_inputs(seed, monkeypatch, backend, kind):
    """Column-strided views, a transposed view and a row-strided view of the queue."""
    base = make(kind, 23, 2 * 40, 2 * 90 if kind == "queue" else 31)
    args = [base[0][:, ::2], base[1].T.contiguous().T[:, 1::2]]  # stride (1, N) then sliced
    if kind == "queue":
        args.append(base[2][::2, :40])
    if kind == "batch":
        args[1] = base[1][:, ::2]
    assert not any(a.is_contiguous() for a in args)
    kw = {"positive_offset": 5} if kind == "batch" else {}
    assert_matches_ref(kind, backend, monkeypatch, args, 0.2, **kw)


@pytest.mark.parametrize("temperature", [0.04, 0.07, 0.2, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_temperature_sweep(seed, monkeypatch, backend, kind, temperature):
    kw = {"positive_offset": 4} if kind == "batch" else {}
    args = make(kind, 9, 24, 130 if kind == "queue" else 19)
    assert_matches_ref(kind, backend, monkeypatch, args, temperature, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_large_norm_unnormalized(seed, monkeypatch, backend, kind):
    """|q||k| / T in the thousands: only a stable (max-subtracted) sweep survives this."""
    kw = {"positive_offset": 3} if kind == "batch" else {}
    args = make(kind, 11, 20, 75 if kind == "queue" else 14, scale=30.0)
    if kind == "queue":
        args[2] = args[2] * 30.0
    assert_matches_ref(kind, backend, monkeypatch, args, 0.07, normalize=False, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_subsets(seed, monkeypatch, backend):
    """MoCo's keys carry no grad; in-batch with only keys needing grad; nt_xent one view."""
    args = make("queue", 13, 20, 150)
    assert_matches_ref("queue", backend, monkeypatch, args, 0.2, requires=[True, False, False])
    args = make("batch", 13, 20, 21)
    for req in ([True, False], [False, True]):
        assert_matches_ref("batch", backend, monkeypatch, args, 0.2, requires=req,
                           positive_offset=8)
    args = make("nt_xent", 13, 20)
    assert_matches_ref("nt_xent", backend, monkeypatch, args, 0.2, requires=[False, True])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_no_grad_forward(seed, monkeypatch, backend, kind):
    fused, ref, _ = OPS[kind]
    kw = {"positive_offset": 1} if kind == "batch" else {}
    args = make(kind, 10, 18, 100 if kind == "queue" else 12)
    args[0].requires_grad_(True)
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    with torch.no_grad():
        loss = fused(*args, 0.1, **kw)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref(*args, 0.1, **kw).detach(), **TOL64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_low_precision(seed, monkeypatch, backend, kind, dtype):
    """Ours on rounded inputs vs float64 on the same inputs: within 2x torch's own error."""
    fused, ref, names = OPS[kind]
    kw = {"positive_offset": 6} if kind == "batch" else {}
    args = [a.to(dtype) for a in make(kind, 19, 48, 200 if kind == "queue" else 29,
                                      dtype=torch.float32)]
    requires = [n != "queue" for n in names]
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    ours = loss_and_grads(fused, args, requires, 0.07, **kw)
    exact = loss_and_grads(ref, [a.double() for a in args], requires, 0.07, **kw)
    theirs = loss_and_grads(ref, args, requires, 0.07, **kw)
    assert ours[0].dtype == torch.float32 and all(g.dtype == dtype for g in ours[1:])
    labels = ["loss", *[n for n, r in zip(names, requires, strict=True) if r]]
    for label, a, b, c in zip(labels, ours, exact, theirs, strict=True):
        assert_lowp_close(f"{kind} {label}", a, b, c, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_are_promoted(seed, monkeypatch, backend):
    """Autocast hands bf16 queries to an fp32 queue: computed as fp32, grads per input."""
    q, k, queue = make("queue", 8, 32, 90, dtype=torch.float32)
    q16 = q.to(torch.bfloat16).requires_grad_(True)
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    loss = info_nce_queue(q16, k, queue, 0.2)
    loss.backward()
    assert loss.dtype == torch.float32 and q16.grad.dtype == torch.bfloat16
    want = info_nce_queue_ref(q16.detach().float(), k, queue, 0.2)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_recast_the_sweeps(seed, monkeypatch, backend):
    """Under CPU autocast the fp32 inputs are still computed in fp32 (the GEMMs inside the
    Function would otherwise run in bf16, or fail on their fp32 out= buffers)."""
    z1, z2 = make("nt_xent", 12, 32, dtype=torch.float32)
    z1.requires_grad_(True)
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1, z2, 0.1)
    (g,) = torch.autograd.grad(loss, [z1])
    want = nt_xent_ref(z1.double(), z2.double(), 0.1)
    (g_want,) = torch.autograd.grad(want, [z1])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPS))
def test_gradcheck_tiny(seed, monkeypatch, backend, kind):
    fused, _, names = OPS[kind]
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    kw = {"positive_offset": 1} if kind == "batch" else {}
    args = make(kind, 3, 5, 4 if kind == "queue" else 5)
    leaves = [a.requires_grad_(n != "queue") for a, n in zip(args, names, strict=True)]
    assert torch.autograd.gradcheck(lambda *x: fused(*x, 0.3, **kw), leaves)
    kw["normalize"] = False
    assert torch.autograd.gradcheck(lambda *x: fused(*x, 0.5, **kw), leaves)


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_runs_the_chosen_path(monkeypatch):
    """Under the interpreter the default is Triton; "torch" never launches a kernel."""
    calls = []
    real = inf.info_nce_fwd
    monkeypatch.setattr(inf, "info_nce_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, queue = make("queue", 4, 16, 20)
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    info_nce_queue(q, k, queue, 0.2)
    assert calls == [1]
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    info_nce_queue(q, k, queue, 0.2)
    nt_xent(q, k, 0.2)
    assert calls == [1]


@pytest.mark.parametrize("threads", [1, 2])
def test_portable_queue_memory_is_a_tenth_of_naive(monkeypatch, threads):
    """The issue's bar at N=256, C=128, K=65536: peak extra memory <= naive / 10 (and
    ROOFLINE's <= 10 MB at 1 thread; more threads use 4x larger chunks)."""
    monkeypatch.setattr(inf_torch, "CHUNK_ELEMS", 1 << 20)  # the production chunking
    q, k, queue = make("queue", 256, 128, 65536, dtype=torch.float32)
    q.requires_grad_(True)

    def peak(backend):
        monkeypatch.setenv("SELFSUP_KERNELS", backend)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            info_nce_queue(q, k, queue, 0.07).backward()
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=lambda e: e.start_ns())
        cur = top = 0
        for e in events:
            cur += e.nbytes()
            top = max(top, cur)
        return top

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        naive, ours = peak("ref"), peak("torch")
    finally:
        torch.set_num_threads(old)
    assert naive > 64 * 2**20  # the N x (1+K) logits and their grads exist there
    assert ours <= naive / 10, (ours / 2**20, naive / 2**20)
    if threads == 1:
        assert ours <= 10 * 2**20, ours / 2**20


# ----------------------------------------------------------------------------- validation
def _q(n=4, c=8, **kw):
    return torch.randn(n, c, **kw)


BAD_CALLS = [
    ("q", lambda: info_nce_queue(_q()[0], _q(), _q(10), 0.1)),  # rank
    ("q", lambda: info_nce_queue(_q().long(), _q(), _q(10), 0.1)),  # dtype
    ("q", lambda: info_nce_queue(_q(0), _q(0), _q(10), 0.1)),  # N >= 1
    ("k", lambda: info_nce_queue(_q(), _q(c=9), _q(10), 0.1)),  # C
    ("k", lambda: info_nce_queue(_q(), _q(5), _q(10), 0.1)),  # N rows
    ("queue", lambda: info_nce_queue(_q(), _q(), _q(10, 7), 0.1)),
    ("queue", lambda: info_nce_queue(_q(), _q(), _q(0), 0.1)),  # K >= 1
    ("queue", lambda: info_nce_queue(_q(), _q(), _q(10).int(), 0.1)),
    ("temperature", lambda: info_nce_queue(_q(), _q(), _q(10), 0.0)),
    ("temperature", lambda: info_nce_queue(_q(), _q(), _q(10), -0.2)),
    ("temperature", lambda: info_nce_queue(_q(), _q(), _q(10), float("inf"))),
    ("temperature", lambda: info_nce_queue(_q(), _q(), _q(10), "warm")),
    ("one device", lambda: info_nce_queue(_q(), _q(), _q(10, device="meta"), 0.1)),
    ("k", lambda: info_nce_batch(_q(), _q(6, 9), 0.1)),
    ("q", lambda: info_nce_batch(_q(4, 8)[None], _q(6), 0.1)),
    ("positive_offset", lambda: info_nce_batch(_q(4), _q(6), 0.1, positive_offset=3)),
    ("positive_offset", lambda: info_nce_batch(_q(4), _q(3), 0.1)),  # M < N
    ("positive_offset", lambda: info_nce_batch(_q(4), _q(6), 0.1, positive_offset=-1)),
    ("positive_offset", lambda: info_nce_batch(_q(4), _q(6), 0.1, positive_offset=1.0)),
    ("temperature", lambda: info_nce_batch(_q(), _q(), torch.tensor([0.1, 0.2]))),
    ("one device", lambda: info_nce_batch(_q(), _q(device="meta"), 0.1)),
    ("z2", lambda: nt_xent(_q(4), _q(5), 0.1)),
    ("z2", lambda: nt_xent(_q(4), _q(4, 9), 0.1)),
    ("z1", lambda: nt_xent(_q(4).reshape(2, 2, 8), _q(4), 0.1)),
    ("z1", lambda: nt_xent(_q(0), _q(0), 0.1)),
    ("temperature", lambda: nt_xent(_q(), _q(), 0)),
]


@pytest.mark.parametrize("backend", ["ref", "torch", "triton"])
@pytest.mark.parametrize("argname,call", BAD_CALLS, ids=[f"{a}-{i}" for i, (a, _) in
                                                         enumerate(BAD_CALLS)])
def test_validation_names_the_argument(monkeypatch, backend, argname, call):
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    with pytest.raises(ValueError, match=argname):
        call()


# ----------------------------------------------------------------------------- MoCoQueue
def ring_model(queue, ptr, batches):
    """Enqueue row by row: slot (ptr + t) % size gets the t-th key."""
    queue = queue.clone()
    for b in batches:
        for row in b:
            queue[ptr] = row
            ptr = (ptr + 1) % len(queue)
    return queue, ptr


@pytest.mark.parametrize("batch_sizes", [[3, 3, 3, 3], [4, 7, 1, 9], [23], [10, 10], [6, 0, 25]])
def test_queue_wraps_like_row_by_row(seed, batch_sizes):
    buf = MoCoQueue(5, 10)
    assert buf.queue.shape == (10, 5) and int(buf.ptr) == 0
    torch.testing.assert_close(buf.queue.norm(dim=1), torch.ones(10))
    batches = [torch.randn(b, 5) for b in batch_sizes]
    want, want_ptr = ring_model(buf.queue, 0, batches)
    for b in batches:
        buf.enqueue(b)
    assert torch.equal(buf.queue, want) and int(buf.ptr) == want_ptr


def test_queue_state_dict_round_trip(seed):
    a, b = MoCoQueue(6, 8), MoCoQueue(6, 8)
    a.enqueue(torch.randn(5, 6))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.queue, b.queue) and int(b.ptr) == 5
    assert set(a.state_dict()) == {"queue", "ptr"}
    keys = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    a.enqueue(keys)
    b.enqueue(keys)
    assert torch.equal(a.queue, b.queue) and int(a.ptr) == int(b.ptr) == 4
    assert a.queue.dtype == torch.float32 and not a.queue.requires_grad
    with pytest.raises(RuntimeError):
        MoCoQueue(6, 9).load_state_dict(a.state_dict())  # size mismatch


def test_queue_validates_inputs():
    buf = MoCoQueue(4, 6)
    with pytest.raises(ValueError, match="keys"):
        buf.enqueue(torch.randn(3, 5))
    with pytest.raises(ValueError, match="keys"):
        buf.enqueue(torch.randn(4))
    with pytest.raises(ValueError, match="keys"):
        buf.enqueue(torch.ones(2, 4, dtype=torch.long))
    for dim, size, name in [(0, 4, "dim"), (4, 0, "size"), (4.0, 4, "dim")]:
        with pytest.raises(ValueError, match=name):
            MoCoQueue(dim, size)
