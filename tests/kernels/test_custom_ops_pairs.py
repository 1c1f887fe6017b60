"""Barlow Twins and VICReg as torch custom ops, and the plain-torch SwAV pieces, under
torch.compile(fullgraph=True) (issue 23.1): opcheck of `selfsup::barlow_twins_*` and
`selfsup::vicreg_*`, and compiled losses against eager, values and every input gradient at an
upstream gradient of 1.7, float32 and float64, on both routes of the portable path (N x N Gram:
2N <= D; direct D x CHUNK slabs: 2N > D). The Triton path is covered by opcheck (interpreter);
its compiled form is the CUDA one. Compiled runs use "aot_eager" (test_custom_ops.py says why)
and one Inductor graph for the pair family.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from selfsup.kernels import _gram_torch, barlow_twins_loss, vicreg_loss
from selfsup.kernels.swav import sinkhorn_knopp, sinkhorn_knopp_ref, swav_loss
from selfsup.kernels.testing import TOL64, UPSTREAM, assert_all_close, loss_and_grads

bt = importlib.import_module("selfsup.kernels.barlow_twins")
vr = importlib.import_module("selfsup.kernels.vicreg")

DTYPES = [torch.float32, torch.float64]
PAIRS = {"barlow": (barlow_twins_loss, dict(lambd=0.3)),
         "vicreg": (vicreg_loss, dict(sim=2.0, var=3.0, cov=4.0))}
SHAPES = [(9, 23), (13, 5)]  # Gram route (2N <= D), direct route (2N > D), odd sizes


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test compiles from scratch (SELFSUP_KERNELS is read at trace time), with small
    slabs so the direct route's chunk loop runs more than once."""
    torch._dynamo.reset()
    monkeypatch.setattr(_gram_torch, "CHUNK_ELEMS", 2 * 5)
    yield
    torch._dynamo.reset()


def _compiled(fn, **kw):
    counter = CompileCounterWithBackend(kw.pop("backend", "aot_eager"))
    return torch.compile(fn, backend=counter, fullgraph=True, **kw), counter


def _views(n, d, dtype):
    """Correlated, off-centre views (the standardisation and centring must matter)."""
    base = torch.randn(n, d, dtype=torch.float64) * 1.5 + 0.3
    z1 = base + torch.randn(n, d, dtype=torch.float64) * 0.4
    z2 = 0.6 * base + torch.randn(n, d, dtype=torch.float64) * 0.8 - 0.2
    return z1.to(dtype), z2.to(dtype)


# ----------------------------------------------------------------------------- opcheck
def _fwd_args(name, path, dtype, gathered):
    """Forward-op arguments. gathered: this process as rank 1 of 2, its rows the second half
    of g (the backward then takes rows 5..9 and scales by the world size; no collective runs
    without a process group)."""
    z1, z2 = _views(10 if gathered else 7, 13, dtype)
    g1, g2 = (z1, z2) if gathered else (None, None)
    l1 = (z1[5:] if gathered else z1).clone().requires_grad_()
    l2 = (z2[5:] if gathered else z2).clone().requires_grad_()
    rank, world = (1, 2) if gathered else (0, 1)
    if name == "barlow":
        return (l1, l2, g1, g2, 0.3, path, rank, world)
    return (l1, l2, g1, g2, 2.0, 3.0, 4.0, path, rank, world)


@pytest.mark.parametrize("gathered", [False, True], ids=["local", "gathered"])
@pytest.mark.parametrize("path,dtype", [("torch", torch.float32), ("torch", torch.float64),
                                        ("triton", torch.float32)])
@pytest.mark.parametrize("name", list(PAIRS))
def test_opcheck_pair_ops(seed, name, path, dtype, gathered):
    # schema, fake tensors (static and dynamic shapes), autograd registration, AOT dispatch
    # (the Triton body in fp32 only: the interpreter is slow, and the schema is the same)
    mod = bt if name == "barlow" else vr
    args = _fwd_args(name, path, dtype, gathered)
    torch.library.opcheck(mod._fwd_op, args)
    out = [t.detach() for t in mod._fwd_op(*args)]
    g1, g2 = (args[0], args[1]) if args[2] is None else (args[2], args[3])
    g1, g2 = g1.detach(), g2.detach()
    lo, n_local = args[-2] * len(args[0]), len(args[0])
    w = (args[4],) if name == "barlow" else args[5:7]
    torch.library.opcheck(mod._bwd_op, (g1, g2, *out[1:], *w, lo, n_local))


def test_pair_ops_are_registered_in_the_selfsup_namespace():
    for op in ("barlow_twins_fwd", "barlow_twins_bwd", "vicreg_fwd", "vicreg_bwd"):
        assert hasattr(torch.ops.selfsup, op), op


def test_gathered_op_gradient_is_world_times_the_rows_own(seed, backend, monkeypatch):
    # the routing the distributed path relies on, in one process: the op given g and (rank 1,
    # world 2) returns 2 x d L(g) / d g[rank 1's rows] once the backward's all_reduce adds
    # rank 0's column sums (patched in: what a SUM over the two ranks gives);
    # tests/test_distributed_losses.py runs the real two-rank collectives
    backend("torch")
    for name, mod in (("barlow", bt), ("vicreg", vr)):
        args = _fwd_args(name, "torch", torch.float64, gathered=True)
        fn, kw = PAIRS[name]
        out = [t.detach() for t in mod._fwd_op(*args)]
        w = (args[4],) if name == "barlow" else args[5:7]
        rank0 = mod._bwd_op(args[2], args[3], *out[1:], *w, 0, 5)[2]
        calls = []
        monkeypatch.setattr(mod, "all_reduce_sum",
                            lambda x, r=rank0, c=calls: c.append(1) or x + r)
        g1, g2 = args[2].clone().requires_grad_(), args[3].clone().requires_grad_()
        want = torch.autograd.grad(fn(g1, g2, **kw) * UPSTREAM, (g1, g2))
        loss = mod._fwd_op(*args)[0]
        got = torch.autograd.grad(loss * UPSTREAM, args[:2])
        assert calls == [1]  # one collective per backward, outside the ops
        torch.testing.assert_close(loss, fn(args[2], args[3], **kw), **TOL64)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, 2 * b[5:], **TOL64)
        monkeypatch.undo()


# ----------------------------------------------------------------------------- compiled losses
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("name", list(PAIRS))
def test_compiled_pair_loss_matches_eager(seed, backend, name, n, d, dtype):
    backend("torch")
    fn, kw = PAIRS[name]
    args = _views(n, d, dtype)
    cfn, counter = _compiled(fn)
    got = loss_and_grads(cfn, args, (True, True), **kw)
    assert_all_close(got, loss_and_grads(fn, args, (True, True), **kw), dtype)
    assert counter.frame_count == 1 and counter.op_count >= 1
    if dtype == torch.float64:  # and the paper's formula, through the compiled op
        ref = bt.barlow_twins_loss_ref if name == "barlow" else vr.vicreg_loss_ref
        assert_all_close(got, loss_and_grads(ref, args, (True, True), **kw), dtype)


def test_compiled_pair_losses_dynamic_shapes(seed, backend):
    # one graph for two batch sizes: the fake impls use symbolic sizes
    backend("torch")
    for name, (fn, kw) in PAIRS.items():
        cfn, counter = _compiled(fn, dynamic=True)
        frames = []
        for n in (9, 11):
            args = _views(n, 23, torch.float64)
            assert_all_close(loss_and_grads(cfn, args, (True, True), **kw),
                             loss_and_grads(fn, args, (True, True), **kw), torch.float64)
            frames.append(counter.frame_count)
        assert frames[0] >= 1 and frames[1] == frames[0], (name, frames)


def test_compiled_pair_losses_under_bf16_autocast(seed, backend):
    # a bf16 step: the projector's output in bf16, GradScaler's 65536 upstream; the op runs
    # its GEMMs in fp32 under the caller's autocast, as eager does
    backend("torch")
    w = torch.randn(23, 23) / 5
    views = _views(9, 23, torch.float32)
    for fn, kw in PAIRS.values():
        def step(a, b, fn=fn, kw=kw):
            return fn(a @ w, b @ w, **kw)

        out = []
        for f in (step, _compiled(step)[0]):
            leaves = [x.clone().requires_grad_() for x in views]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = f(*leaves)
            out.append([loss.detach(), *torch.autograd.grad(loss * 65536.0, leaves)])
        assert out[0][0].dtype == torch.float32
        for a, b in zip(out[1], out[0], strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_compiled_pair_bad_input_still_raises_value_error(backend):
    # (not fullgraph: a raise is where Dynamo stops tracing; the error is then eager's)
    backend("torch")
    z = torch.randn(8, 5)
    with pytest.raises(ValueError, match="barlow_twins_loss: z2 must have z1's shape"):
        torch.compile(barlow_twins_loss, backend="aot_eager")(z, z[:, :4])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="vicreg_loss: cov must be a finite number >= 0"):
            torch.compile(vicreg_loss, backend="aot_eager")(z, z, cov=bad)


def test_inductor_barlow_twins_matches_eager(seed, backend):
    # one Inductor graph: the backward's plain-torch BatchNorm part is what Inductor fuses
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    backend("torch")
    args = _views(9, 23, torch.float32)
    with (inductor_config.patch(fx_graph_cache=False),
          functorch_config.patch(enable_autograd_cache=False)):
        cfn, counter = _compiled(barlow_twins_loss, backend="inductor")
        got = loss_and_grads(cfn, args, (True, True), lambd=0.3)
    assert_all_close(got, loss_and_grads(barlow_twins_loss, args, (True, True), lambd=0.3),
                     torch.float32)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- SwAV
def _scores(b, k, dtype, d=8):
    z = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    return (z @ c.T).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_sinkhorn_matches_eager(seed, dtype):
    s = _scores(11, 29, dtype)
    cfn, counter = _compiled(sinkhorn_knopp)
    for eps, iters in ((0.05, 3), (0.04, 1)):
        got = cfn(s, eps, iters)
        assert_all_close([got], [sinkhorn_knopp(s, eps, iters)], dtype)
        if dtype == torch.float64:
            assert_all_close([got], [sinkhorn_knopp_ref(s, eps, iters)], dtype)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_swav_loss_matches_eager(seed, dtype):
    n_views, b, k = 4, 5, 29
    scores = _scores(n_views * b, k, dtype)
    codes = torch.stack([sinkhorn_knopp(scores[a * b:(a + 1) * b]) for a in range(2)])
    cfn, counter = _compiled(swav_loss)
    for t in (0.1, 0.04):
        got = loss_and_grads(cfn, (scores, codes), (True, False), n_views, t)
        assert_all_close(got, loss_and_grads(swav_loss, (scores, codes), (True, False),
                                             n_views, t), dtype)
    assert counter.frame_count >= 1


# ----------------------------------------------------------------------------- method losses
def _method(name, extra):
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class

    argv = ["--method", name, "--data", "fashion-mnist-sample", "--device", "cpu", "--arch",
            "resnet_tiny", "--img-size", "32", "--batch-size", "4", "--proj-hidden", "32",
            "--proj-dim", "24", *extra]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(name).preset)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=10, world_size=1)
    return method_class(name)(cfg).double()


@pytest.mark.parametrize("name,extra", [
    pytest.param("barlowtwins", [], marks=pytest.mark.slow),  # its op: the tests above
    ("swav", ["--out-dim", "30", "--n-local", "1", "--queue-size", "0"])])
def test_compiled_method_forward_matches_eager(seed, backend, name, extra):
    # the whole forward (backbone, projector, loss; SwAV's Sinkhorn codes) in one graph;
    # ~20 s per method on this CPU, so Barlow Twins' runs with -m slow and VICReg's (the same
    # method with the other op) not at all
    backend("torch")
    method = _method(name, extra).train()
    twin = copy.deepcopy(method)
    views = [torch.randn(6, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    if name == "swav":
        views.append(torch.randn(6, 3, 16, 16, dtype=torch.float64))
    cfwd, counter = _compiled(twin.forward)
    params = [p for p in method.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    loss = method(views)["loss"]
    want = [loss.detach(), *torch.autograd.grad(loss * UPSTREAM, params)]
    loss = cfwd(views)["loss"]
    got = [loss.detach(), *torch.autograd.grad(loss * UPSTREAM, twin_params)]
    assert_all_close(got, want, torch.float64)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- two ranks
def _compiled_rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=2)
    try:
        torch.manual_seed(0)  # one global batch on both ranks; each takes its half
        z1, z2 = _views(12, 30, torch.float64)
        rows = slice(6 * rank, 6 * (rank + 1))
        out = {}
        for name, (fn, kw) in PAIRS.items():
            cfn, counter = _compiled(fn)
            res = [loss_and_grads(f, (z1[rows], z2[rows]), (True, True), **kw)
                   for f in (fn, cfn)]
            out[name] = (res, counter.frame_count)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_compiled_pair_losses_on_two_ranks_match_eager(tmp_path, monkeypatch):
    # the all-gather (traced by Dynamo) and the backward's functional all-reduce (traced by
    # AOTAutograd) inside one fullgraph compile on 2 gloo ranks; eager's two-rank results
    # equal one process on the whole batch (tests/test_distributed_losses.py)
    import torch.multiprocessing as mp

    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    mp.spawn(_compiled_rank_main, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, ((eager, compiled), frames) in out.items():
            assert frames == 1, (rank, name)
            assert_all_close(compiled, eager, torch.float64)
