"""InfoNCE on a GPU without a GPU: dispatch, device guards, what the launchers pick, host syncs.

What a CUDA run does differently from the CPU interpreter is checked here by construction:
the backend choice for inputs the kernels cannot take, that every launch sits inside the
tensors' device guard, that the launchers pick exactly the registered configurations (native
half operands, the precision named per config), and that neither a tensor temperature nor the
MoCo queue is ever read on the host.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from selfsup.kernels import MoCoQueue, _utils, info_nce_batch, info_nce_queue, nt_xent
from selfsup.kernels import info_nce as inf
from selfsup.kernels._info_nce_torch import queue_sweep_torch, rows_sweep_torch
from selfsup.kernels._registry import REGISTRY
from selfsup.kernels._utils import check_temperature
from selfsup.kernels.info_nce import info_nce_queue_ref, nt_xent_ref
from selfsup.kernels.testing import TOL64

F64 = torch.float64
KERNELS = ("_info_nce_fwd_kernel", "_info_nce_merge_kernel", "_info_nce_dk_kernel")


class FakeCuda(torch.Tensor):
    """A meta tensor that says it lives on cuda:0: enough for the dispatch decision."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def fake_cuda(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta").as_subclass(FakeCuda)


# ----------------------------------------------------------------------------- dispatch
def test_forced_triton_with_too_wide_rows_raises_naming_why(monkeypatch):
    q, k = torch.randn(4, 513), torch.randn(4, 513)
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    for call in (lambda: info_nce_queue(q, k, torch.randn(9, 513), 0.2),
                 lambda: info_nce_batch(q, k, 0.2), lambda: nt_xent(q, k, 0.2)):
        with pytest.raises(RuntimeError, match=r"SELFSUP_KERNELS=triton.*C=513.*512"):
            call()


def test_too_wide_rows_take_the_portable_path_by_default(seed, monkeypatch):
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    launched = []
    monkeypatch.setattr(inf, "info_nce_fwd", lambda *a, **k: launched.append(1))
    q, k = torch.randn(3, 600, dtype=F64), torch.randn(3, 600, dtype=F64)
    torch.testing.assert_close(nt_xent(q, k, 0.1), nt_xent_ref(q, k, 0.1), **TOL64)
    assert not launched
    assert inf._backend(torch.randn(3, 512)) == "triton"  # the interpreter takes C = 512


def test_fp64_cuda_goes_portable_and_forced_triton_names_it(monkeypatch):
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # a GPU run, not interpreted
    q = fake_cuda(4, 32, dtype=F64)
    assert q.device.type == "cuda"
    assert inf._backend(q, fake_cuda(4, 32, dtype=F64)) == "torch"
    assert inf._backend(fake_cuda(4, 32), fake_cuda(4, 32)) == "triton"
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="float64"):
        inf._backend(q, q)
    with pytest.raises(RuntimeError, match="C=1024"):
        inf._backend(fake_cuda(4, 1024), fake_cuda(4, 1024))


def test_every_launch_runs_inside_the_device_guard(seed, monkeypatch):
    depth, seen = [0], []

    @contextlib.contextmanager
    def guard(t):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    class Checked:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            assert depth[0] > 0, f"{self.name} launched outside device_guard"
            seen.append(self.name)
            return self.fn[grid]

    monkeypatch.setattr(inf, "device_guard", guard)
    for name in KERNELS:
        monkeypatch.setattr(inf, name, Checked(name, getattr(inf, name)))
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    z1, z2 = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16, requires_grad=True)
    nt_xent(z1, z2, 0.1).backward()
    q, k = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16, requires_grad=True)
    info_nce_queue(q, k, F.normalize(torch.randn(40, 16), dim=1), 0.2).backward()
    assert set(seen) == set(KERNELS)


# ----------------------------------------------------------------------------- configs
def _dtype_of(cfg):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        cfg.types["dt"]]


@pytest.mark.parametrize("name", KERNELS)
def test_launchers_pick_exactly_the_registered_configs(monkeypatch, name):
    """For each registered config, the launcher's choice on a GPU (no interpreter) for its
    dtype, width and TF32 setting is that config: what is compiled and reported is what runs.
    Half configs use native operands ("ieee" names that nothing is rounded further)."""
    monkeypatch.setattr(inf, "interpreting", lambda: False)
    kernel = name.split("_")[3]
    for cfg in REGISTRY[f"selfsup.kernels.info_nce.{name}"].configs:
        dtype = _dtype_of(cfg)
        prec = cfg.constexprs.get("DOT_PREC")
        assert prec in (None, "ieee", "tf32", "tf32x3"), cfg.label
        if dtype != torch.float32:
            assert prec in (None, "ieee"), cfg.label
        monkeypatch.setattr(inf, "fp32_matmul_allows_tf32", lambda p=prec: p == "tf32")
        got = inf._kernel_params(kernel, cfg.constexprs["BLOCK_C"], dtype,
                                 cfg.constexprs.get("SELF_MASK", False))
        warps, stages = got.pop("num_warps"), got.pop("num_stages")
        assert (warps, stages) == (cfg.num_warps, cfg.num_stages), cfg.label
        assert {a: str(v) for a, v in got.items()} == {
            a: str(v) for a, v in cfg.constexprs.items() if a in got}, cfg.label


def test_bf16_operands_are_upcast_only_under_the_interpreter(monkeypatch):
    assert inf.INTERPRETER_CONSTEXPRS == {"UPCAST": False}
    assert inf._kernel_params("fwd", 128, torch.bfloat16)["UPCAST"]  # conftest interprets
    assert not inf._kernel_params("fwd", 128, torch.float16)["UPCAST"]  # fp16 runs natively
    assert not inf._kernel_params("dk", 128, torch.float32)["UPCAST"]
    monkeypatch.setattr(inf, "interpreting", lambda: False)
    assert not inf._kernel_params("fwd", 128, torch.bfloat16)["UPCAST"]


def test_key_gradient_splits_rows_and_is_deterministic(seed, monkeypatch):
    """The dk sweep runs over row splits (a 'GPU' of 16 programs per wave here) whose
    partials add up to the float64 reference, bit-identically per run."""
    sizes = []
    real = inf._info_nce_dk_kernel

    class Spy:
        def __getitem__(self, grid):
            sizes.append(grid)
            return real[grid]

    monkeypatch.setattr(inf, "_info_nce_dk_kernel", Spy())
    monkeypatch.setattr(inf, "_waves", lambda device: 16)
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    z1, z2 = torch.randn(50, 24, dtype=F64), torch.randn(50, 24, dtype=F64)

    def grads(fn):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        return torch.autograd.grad(fn(a, b, 0.1) * 1.7, [a, b])

    ours, again, want = grads(nt_xent), grads(nt_xent), grads(nt_xent_ref)
    assert sizes and sizes[0][1] > 1, sizes
    for a, b, c in zip(ours, again, want, strict=True):
        torch.testing.assert_close(a, c, **TOL64)
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["queue", "batch", "nt_xent"])
def test_tensor_temperature_matches_float(seed, monkeypatch, backend, kind):
    monkeypatch.setenv("SELFSUP_KERNELS", backend)
    q, k = torch.randn(9, 20, dtype=F64), torch.randn(9, 20, dtype=F64)
    queue = F.normalize(torch.randn(70, 20, dtype=F64), dim=1)
    fn = {"queue": lambda t, a, b: info_nce_queue(a, b, queue, t),
          "batch": lambda t, a, b: info_nce_batch(a, b, t),
          "nt_xent": lambda t, a, b: nt_xent(a, b, t)}[kind]

    def run(t):
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = fn(t, a, b)
        return [loss.detach(), *torch.autograd.grad(loss * 1.7, [a, b])]

    for x, y in zip(run(torch.tensor(0.07, dtype=F64)), run(0.07), strict=True):
        torch.testing.assert_close(x, y, **TOL64)


def test_tensor_temperature_is_never_read_on_the_host_inside_the_ops(seed, monkeypatch):
    """The launchers and the portable sweeps use a tensor T as a tensor (a GPU op would
    otherwise wait for the device every step); only CPU validation reads it, for free."""
    q, k = torch.randn(7, 16), torch.randn(7, 16)
    queue = F.normalize(torch.randn(50, 16), dim=1)
    t = torch.tensor(0.2)
    want = info_nce_queue_ref(q, k, queue, 0.2)

    def no_host_read(self, *a):
        raise AssertionError("a tensor was read on the host")

    for attr in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, attr, no_host_read)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    loss_rows, _, _ = queue_sweep_torch(qn, kn, queue, t, compute_dq=True)
    rows = inf.info_nce_fwd(qn, queue, kn, t, self_mask=False, extra_pos=True, pos_offset=0,
                            pos_mod=7, compute_dq=True)[0]
    _, _, dk = rows_sweep_torch(qn, kn, t, torch.arange(7), self_mask=False, compute_dq=False,
                                compute_dk=True)
    monkeypatch.undo()
    torch.testing.assert_close(loss_rows.mean(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.mean(), want, rtol=1e-5, atol=1e-6)
    assert dk.shape == (7, 16)


def test_check_temperature_tensors():
    # an accelerator tensor (meta stands in: reading it would raise) is returned unread
    out = check_temperature("temperature", torch.tensor(0.1, device="meta"), allow_tensor=True)
    assert out.device.type == "meta" and out.shape == ()
    assert check_temperature("temperature", torch.tensor([0.5]), allow_tensor=True).shape == ()
    assert check_temperature("temperature", torch.tensor(0.5)) == 0.5  # default: a float
    for bad, match in [(torch.tensor(-0.1), "> 0"), (torch.tensor(float("inf")), "> 0"),
                       (torch.tensor(1), "floating"), (torch.ones(2), "scalar")]:
        with pytest.raises(ValueError, match=f"temperature.*{match}"):
            check_temperature("temperature", bad, allow_tensor=True)
    with pytest.raises(ValueError, match="temperature must not require grad"):
        nt_xent(torch.randn(3, 8), torch.randn(3, 8), torch.tensor(0.1, requires_grad=True))


# ----------------------------------------------------------------------------- MoCoQueue
def test_enqueue_never_reads_the_pointer_on_the_host(seed, monkeypatch):
    buf = MoCoQueue(5, 10)
    batches = [torch.randn(b, 5) for b in (4, 7, 0, 23, 3)]
    want = buf.queue.clone()
    ptr = 0
    for b in batches:
        for row in b:
            want[ptr] = row
            ptr = (ptr + 1) % 10

    def no_host_read(self, *a):
        raise AssertionError("a tensor was read on the host")

    for attr in ("item", "__int__", "__index__", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, attr, no_host_read)
    for b in batches:
        buf.enqueue(b)
    monkeypatch.undo()
    assert torch.equal(buf.queue, want) and int(buf.ptr) == ptr


def test_queue_in_the_training_dtype_loads_any_checkpoint(seed):
    fp32, bf16 = MoCoQueue(8, 12), MoCoQueue(8, 12, dtype=torch.bfloat16)
    assert bf16.queue.dtype == torch.bfloat16 and "bfloat16" in repr(bf16)
    fp32.enqueue(torch.randn(5, 8))
    bf16.load_state_dict(fp32.state_dict())  # an fp32 checkpoint into a bf16 run
    assert bf16.queue.dtype == torch.bfloat16 and int(bf16.ptr) == 5
    assert torch.equal(bf16.queue, fp32.queue.to(torch.bfloat16))
    keys = torch.randn(9, 8)
    bf16.enqueue(keys)
    fp32.enqueue(keys)  # the pointer continues where the checkpoint left it
    assert int(bf16.ptr) == int(fp32.ptr) == 2
    assert torch.equal(bf16.queue, fp32.queue.to(torch.bfloat16))
    back = MoCoQueue(8, 12)
    back.load_state_dict(bf16.state_dict())  # and back
    assert back.queue.dtype == torch.float32 and torch.equal(back.queue, bf16.queue.float())
    with pytest.raises(ValueError, match="dtype"):
        MoCoQueue(8, 12, dtype=torch.int32)
