"""The fused ops as torch custom ops (issue 23.1): opcheck, and torch.compile(fullgraph=True)
against eager, of each op and of methods' losses.

Both paths run: "torch" (the portable body) and "triton" (the kernels, through the CPU
interpreter here). Compiled runs use the "aot_eager" backend: Dynamo + AOTAutograd are what
graph breaks, fake implementations and the registered autograd depend on, while Inductor's C++
compile costs tens of seconds per graph on this 2-core machine; `test_inductor_*` compile one
graph per op family with Inductor. Every comparison covers the loss and every input gradient,
with an upstream gradient of 1.7, in float32 and float64, at odd shapes.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from selfsup.kernels import (
    DINOLoss,
    dino_loss,
    dino_loss_ref,
    info_nce_batch,
    info_nce_queue,
    info_nce_queue_ref,
    nt_xent,
)
from selfsup.kernels import _info_nce_torch as inf_torch
from selfsup.kernels import info_nce as inf
from selfsup.kernels._custom_op import scale_grad
from selfsup.kernels.testing import TOL64, UPSTREAM, assert_all_close, loss_and_grads

PATHS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float64]
# the module, not the function `selfsup.kernels.dino_loss` that shadows it as an attribute
dl = importlib.import_module("selfsup.kernels.dino_loss")


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test compiles from scratch (SELFSUP_KERNELS is read at trace time), with small
    portable chunks so its chunk loops run more than once."""
    torch._dynamo.reset()
    monkeypatch.setattr(inf_torch, "CHUNK_ELEMS", 60)
    yield
    torch._dynamo.reset()


def _info_nce_inputs(kind, dtype, n=5, c=19, m=23):
    """Odd shapes; the queue is unit-norm like MoCo's; the batch keys outnumber the rows."""
    q, k = torch.randn(n, c, dtype=dtype), torch.randn(n, c, dtype=dtype)
    if kind == "queue":
        return (q, k, F.normalize(torch.randn(m, c, dtype=dtype), dim=1)), (True, True, False)
    if kind == "batch":
        return (q, torch.randn(m, c, dtype=dtype)), (True, True)
    return (q, k), (True, True)


INFO_NCE = {"queue": (info_nce_queue, {}), "batch": (info_nce_batch, {"positive_offset": 7}),
            "nt_xent": (nt_xent, {})}


@pytest.fixture
def no_compile_caches():
    """Inductor and AOTAutograd caches off: their keys hash the forward graph, which names an
    op but not its registered backward, so a cache written before an op's backward changed
    would replay the old backward (seen: a renamed backward op)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # the configs' own patch(): monkeypatch's undo deletes a config entry it did not find in
    # the module's __dict__
    with (inductor_config.patch(fx_graph_cache=False),
          functorch_config.patch(enable_autograd_cache=False)):
        yield


def _compiled(fn, **kw):
    """torch.compile(fn, fullgraph=True) counting the graphs it makes."""
    counter = CompileCounterWithBackend(kw.pop("backend", "aot_eager"))
    return torch.compile(fn, backend=counter, fullgraph=True, **kw), counter


# ----------------------------------------------------------------------------- opcheck
def _op_args(kind, path, dtype, t_tensor):
    (q, k, *rest), _ = _info_nce_inputs(kind, dtype)
    q, k = q.requires_grad_(), k.requires_grad_()
    t = (torch.tensor(0.2, dtype=dtype), 0.0) if t_tensor else (None, 0.2)
    if kind == "queue":
        return (q, rest[0], k, *t, "queue", 0, path, True, False)
    if kind == "batch":  # k is the (M, C) key matrix here
        return (q, k, None, *t, "batch", 7, path, True, True)
    z = torch.cat([q, k]).detach().requires_grad_()
    return (z, z, None, *t, "nt_xent", len(q), path, True, True)


@pytest.mark.parametrize("t_tensor", [False, True], ids=["t-float", "t-tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", list(INFO_NCE))
def test_opcheck_info_nce(seed, kind, path, dtype, t_tensor):
    # schema, fake tensors (static and dynamic shapes), autograd registration, AOT dispatch
    args = _op_args(kind, path, dtype, t_tensor)
    torch.library.opcheck(inf._info_nce_fwd_op, args)
    if path == "triton" and kind != "queue":  # the backward's key-gradient sweep
        lse2 = inf._info_nce_fwd_op(*args)[3].detach()
        q, keys = args[0].detach(), args[1].detach()
        torch.library.opcheck(inf._info_nce_dk_op, (q, keys, lse2, *args[3:5],
                                                    kind == "nt_xent", 3, len(keys)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_opcheck_dino(seed, path, dtype):
    s, t = torch.randn(4 * 3, 37, dtype=dtype).requires_grad_(), torch.randn(2 * 3, 37, dtype=dtype)
    c = torch.randn(37, dtype=dtype) * 0.3
    for ts in ((None, 0.1), (torch.tensor(0.1, dtype=dtype), 0.0)):
        args = (s, t, c, *ts, None, 0.04, 2, path, True)
        torch.library.opcheck(dl._dino_fwd_op, args)
    out = dl._dino_fwd_op(*args)
    g = torch.tensor(UPSTREAM, dtype=out[0].dtype)
    if path == "triton":
        saved = (x.detach() for x in out[3:8])
        torch.library.opcheck(dl._dino_bwd_op, (s.detach(), t, *saved, g))
    else:
        torch.library.opcheck(scale_grad, (out[8].detach(), g, dtype))
        torch.library.opcheck(scale_grad, (out[8].detach(), g, torch.float16))


def test_ops_are_registered_in_the_selfsup_namespace():
    for name in ("info_nce_fwd", "info_nce_dk", "dino_loss_fwd", "dino_loss_bwd",
                 "scale_grad"):
        assert hasattr(torch.ops.selfsup, name), name


# ----------------------------------------------------------------------------- compiled ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", list(INFO_NCE))
def test_compiled_info_nce_matches_eager(seed, backend, kind, path, dtype):
    backend(path)
    fn, kw = INFO_NCE[kind]
    args, requires = _info_nce_inputs(kind, dtype)
    cfn, counter = _compiled(fn)
    for temperature in (0.04, torch.tensor(0.3, dtype=dtype)):
        eager = loss_and_grads(fn, args, requires, temperature, **kw)
        got = loss_and_grads(cfn, args, requires, temperature, **kw)
        assert_all_close(got, eager, dtype)
    assert counter.frame_count >= 1 and counter.op_count >= 1


@pytest.mark.parametrize("path", PATHS)
def test_compiled_info_nce_dynamic_shapes(seed, backend, path):
    # one graph for two batch sizes and queue lengths: the fake impls use symbolic sizes
    backend(path)
    # (frame_count may be 2 after the first call: Dynamo restarts once to specialize the
    # float temperature; what matters is that the second shape compiles nothing new)
    cfn, counter = _compiled(info_nce_queue, dynamic=True)
    frames = []
    for n, m in ((5, 23), (7, 31)):
        args, requires = _info_nce_inputs("queue", torch.float64, n=n, m=m)
        got = loss_and_grads(cfn, args, requires, 0.2)
        assert_all_close(got, loss_and_grads(info_nce_queue_ref, args, requires, 0.2),
                         torch.float64)
        frames.append(counter.frame_count)
    cfn, counter = _compiled(nt_xent, dynamic=True)
    for n in (5, 6):
        args, requires = _info_nce_inputs("nt_xent", torch.float64, n=n)
        got = loss_and_grads(cfn, args, requires, 0.1)
        assert_all_close(got, loss_and_grads(nt_xent, args, requires, 0.1), torch.float64)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0] and frames[2] >= 1 and frames[3] == frames[2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_compiled_dino_matches_eager(seed, backend, path, dtype):
    backend(path)
    s = torch.randn(5 * 3, 37, dtype=dtype) * 2
    t, c = torch.randn(2 * 3, 37, dtype=dtype), torch.randn(37, dtype=dtype) * 0.3
    cfn, counter = _compiled(dino_loss, dynamic=True)
    for tt in (0.04, torch.tensor(0.07, dtype=dtype)):
        kw = dict(teacher_temp=tt, student_temp=0.1)
        eager = loss_and_grads(dino_loss, (s, t, c), (True, False, False), **kw)
        got = loss_and_grads(cfn, (s, t, c), (True, False, False), **kw)
        assert_all_close(got, eager, dtype)
    if dtype == torch.float64:
        ref = loss_and_grads(dino_loss_ref, (s, t, c), (True, False, False), teacher_temp=0.04)
        assert_all_close(loss_and_grads(cfn, (s, t, c), (True, False, False),
                                        teacher_temp=0.04), ref, dtype)
    # a schedule's next value as a tensor reuses the graph (a float would recompile)
    frames = counter.frame_count
    kw = dict(teacher_temp=torch.tensor(0.05, dtype=dtype))
    assert_all_close(loss_and_grads(cfn, (s, t, c), (True, False, False), **kw),
                     loss_and_grads(dino_loss, (s, t, c), (True, False, False), **kw), dtype)
    assert frames >= 1 and counter.frame_count == frames


@pytest.mark.parametrize("path", PATHS)
def test_compiled_dino_module_updates_its_center_like_eager(seed, backend, path):
    backend(path)
    eager, compiled = DINOLoss(37).double(), DINOLoss(37).double()
    cmod, _ = _compiled(compiled)
    for _ in range(2):  # the second call sees the first one's center update
        s = torch.randn(4 * 3, 37, dtype=torch.float64)
        t = torch.randn(2 * 3, 37, dtype=torch.float64)
        want = loss_and_grads(eager, (s, t), (True, False))
        got = loss_and_grads(cmod, (s, t), (True, False))
        assert_all_close(got, want, torch.float64)
        torch.testing.assert_close(compiled.center, eager.center, **TOL64)
        torch.testing.assert_close(compiled.last_stats["kl"], eager.last_stats["kl"], **TOL64)


def test_compiled_triton_path_still_launches_through_the_recorder(backend):
    # the op bodies call the module's launchers, which the launch recorder patches
    from launch_recorder import LaunchRecorder

    backend("triton")
    args, requires = _info_nce_inputs("batch", torch.float32)
    cfn, _ = _compiled(info_nce_batch)
    with LaunchRecorder() as rec:
        loss_and_grads(cfn, args, requires, 0.2)
    kernels = {x.kernel.rsplit(".", 1)[-1] for x in rec.launches}
    assert {"_info_nce_fwd_kernel", "_info_nce_merge_kernel", "_info_nce_dk_kernel"} <= kernels
    backend("torch")
    torch._dynamo.reset()
    with LaunchRecorder() as rec:
        loss_and_grads(_compiled(info_nce_batch)[0], args, requires, 0.2)
    assert not rec.launches


def test_assert_all_close_refuses_a_changed_dtype_count_or_value():
    one = [torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    assert_all_close([t.clone() for t in one], one, torch.float64)
    with pytest.raises(AssertionError):  # a gradient stored in another dtype
        assert_all_close([one[0], one[1].float()], one, torch.float64)
    with pytest.raises(AssertionError):  # an output missing
        assert_all_close(one[:1], one, torch.float64)
    with pytest.raises(AssertionError, match="output 1"):
        assert_all_close([one[0], one[1] + 1e-6], one, torch.float64)


def test_validation_errors_are_still_value_errors_when_compiled(backend):
    backend("torch")
    q, k = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="k must have N=4 rows"):
        torch.compile(info_nce_queue, backend="aot_eager")(q, k, torch.randn(5, 8), 0.2)
    # a CPU tensor temperature is read by the op's body, not while tracing: still ValueError
    for fullgraph in (False, True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            torch.compile(nt_xent, backend="aot_eager", fullgraph=fullgraph)(
                q, q, torch.tensor(-1.0))
    s, t = torch.randn(3 * 2, 8), torch.randn(2 * 2, 8)
    with pytest.raises(ValueError, match="teacher_temp must be a finite number > 0"):
        torch.compile(dino_loss, backend="aot_eager", fullgraph=True)(
            s, t, torch.zeros(8), teacher_temp=torch.tensor(0.0))


@pytest.mark.parametrize("fn,kind", [(info_nce_queue, "queue"), (nt_xent, "nt_xent")])
def test_inductor_info_nce_matches_eager(seed, backend, no_compile_caches, fn, kind):
    backend("torch")
    args, requires = _info_nce_inputs(kind, torch.float32)
    cfn, counter = _compiled(fn, backend="inductor")
    got = loss_and_grads(cfn, args, requires, 0.1)
    assert_all_close(got, loss_and_grads(fn, args, requires, 0.1), torch.float32)
    assert counter.frame_count == 1


def test_inductor_dino_matches_eager(seed, backend, no_compile_caches):
    backend("torch")
    s, t, c = torch.randn(4 * 3, 37), torch.randn(2 * 3, 37), torch.randn(37) * 0.3
    cfn, counter = _compiled(dino_loss, backend="inductor")
    got = loss_and_grads(cfn, (s, t, c), (True, False, False))
    assert_all_close(got, loss_and_grads(dino_loss, (s, t, c), (True, False, False)),
                     torch.float32)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- method losses
def _method(name, extra):
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class

    argv = ["--method", name, "--data", "fashion-mnist-sample", "--device", "cpu", "--arch",
            "resnet_tiny", "--img-size", "32", "--batch-size", "4", *extra]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(name).preset)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=10, world_size=1)
    return method_class(name)(cfg).double()


def _method_loss_and_grads(fn, params, *inputs):
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss * UPSTREAM, params)
    return [loss.detach(), *grads]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,extra", [("mocov2", ["--queue-size", "37"]), ("simclr", []),
                                        ("mocov3", [])])
def test_compiled_method_forward_matches_eager(seed, backend, path, name, extra):
    # the whole method forward (backbone, heads, key encoder, fused loss) in one graph
    backend(path)
    method = _method(name, extra)
    twin = copy.deepcopy(method)
    views = [torch.randn(6, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    cfwd, counter = _compiled(twin.forward)
    params = [p for p in method.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    want = _method_loss_and_grads(lambda v: method(v)["loss"], params, views)
    got = _method_loss_and_grads(lambda v: cfwd(v)["loss"], twin_params, views)
    assert_all_close(got, want, torch.float64)
    assert counter.frame_count == 1


@pytest.mark.parametrize("path", PATHS)
def test_compiled_dino_method_loss_matches_eager(seed, backend, path):
    # DINO's student and teacher heads and its loss module (center update included), with the
    # teacher temperature as a tensor, as a schedule would give it
    from selfsup.ssl.dino import multicrop_forward

    backend(path)
    method = _method("dino", ["--out-dim", "50", "--n-local", "1"])
    twin = copy.deepcopy(method)

    def loss_fn(m):
        def f(views, tau):
            s = multicrop_forward(m.backbone, m.head, views)
            with torch.no_grad():
                t = m.t_head(m.t_backbone(torch.cat(views[:2])))
            return m.criterion(s, t, teacher_temp=tau)
        return f

    views = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    views.append(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    tau = torch.tensor(0.05, dtype=torch.float64)
    cf, counter = _compiled(loss_fn(twin))
    params = [p for p in method.parameters() if p.requires_grad]
    want = _method_loss_and_grads(loss_fn(method), params, views, tau)
    got = _method_loss_and_grads(cf, [p for p in twin.parameters() if p.requires_grad], views,
                                 tau)
    assert_all_close(got, want, torch.float64)
    torch.testing.assert_close(twin.criterion.center, method.criterion.center, **TOL64)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("path", PATHS)
def test_compiled_under_bf16_autocast_matches_eager(seed, backend, path):
    # a bf16 training step: autocast around the op, fp32 leaves, GradScaler's 65536 upstream
    backend(path)
    w = torch.randn(19, 19)

    def moco(q, k, queue):
        q, k = q @ w, k @ w  # bf16 under autocast, as a head's output
        return info_nce_queue(q, k, queue.to(torch.bfloat16), 0.2)

    def dino(s, t, c):
        return dino_loss(s @ w, (t @ w).detach(), c, teacher_temp=0.04)

    (q, k, queue), _ = _info_nce_inputs("queue", torch.float32)
    s, t, c = torch.randn(4 * 3, 19), torch.randn(2 * 3, 19), torch.zeros(19)
    for fn, args in ((moco, (q, k, queue)), (dino, (s, t, c))):
        requires = (True, True, False)[:len(args)] if fn is moco else (True, False, False)
        cfn, _ = _compiled(fn)
        out = []
        for f in (fn, cfn):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                leaves = [a.detach().clone().requires_grad_(r)
                          for a, r in zip(args, requires, strict=True)]
                loss = f(*leaves)
            grads = torch.autograd.grad(loss * 65536.0, [x for x in leaves if x.requires_grad])
            out.append([loss.detach(), *grads])
        assert out[0][0].dtype == torch.float32  # the loss in the accumulation dtype
        for a, b in zip(out[1], out[0], strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("path", PATHS)
def test_compiled_mae_method_forward_matches_eager(seed, backend, monkeypatch, path):
    # masking (gather), the decoder's scatter and the masked patch loss in one ViT graph
    backend(path)
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class

    argv = ["--method", "mae", "--data", "fashion-mnist-sample", "--device", "cpu", "--arch",
            "vit_tiny", "--img-size", "64", "--batch-size", "4"]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class("mae").preset)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=10, world_size=1)
    method = method_class("mae")(cfg).double()
    twin = copy.deepcopy(method)
    views = [torch.randn(3, 3, 64, 64, dtype=torch.float64)]
    cfwd, counter = _compiled(twin.forward)
    rng = torch.get_rng_state()  # the same random masks in both runs
    want = _method_loss_and_grads(lambda v: method(v)["loss"],
                                  [p for p in method.parameters() if p.requires_grad], views)
    torch.set_rng_state(rng)
    got = _method_loss_and_grads(lambda v: cfwd(v)["loss"],
                                 [p for p in twin.parameters() if p.requires_grad], views)
    assert_all_close(got, want, torch.float64)
    assert counter.frame_count >= 1


# ----------------------------------------------------------------------------- MAE ops
def _mae_inputs(dtype, b=3, length=10, d=13):
    import selfsup.kernels.mae as mae

    ids_keep, ids_restore, mask = mae.random_masking(b, length, 0.6)
    x = torch.randn(b, length, d, dtype=dtype)
    x_dl = torch.randn(b, d, length, dtype=dtype).transpose(1, 2)  # PatchEmbed's layout
    pos = torch.randn(1, length, d, dtype=dtype)
    x_vis = torch.randn(b, 1 + ids_keep.shape[1], d, dtype=dtype)
    tok, pos1 = torch.randn(1, 1, d, dtype=dtype), torch.randn(1, 1 + length, d, dtype=dtype)
    imgs = torch.randn(b, 3, 8, 20, dtype=dtype)  # 2 x 5 patches of 4 x 4
    pred = torch.randn(b, length, 4 * 4 * 3, dtype=dtype)
    return dict(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask, x=x, x_dl=x_dl,
                pos=pos, x_vis=x_vis, tok=tok, pos1=pos1, imgs=imgs, pred=pred)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_opcheck_mae(seed, path, dtype):
    mae_ops = importlib.import_module("selfsup.kernels.mae._ops")
    t = _mae_inputs(dtype)
    grad = {k: v.requires_grad_() for k, v in t.items() if v.is_floating_point()}
    for x in (grad["x"], grad["x_dl"]):
        for det in (False, True):
            torch.library.opcheck(mae_ops._gather_fwd_op, (x, t["ids_keep"], grad["pos"],
                                                           det, path))
    torch.library.opcheck(mae_ops._gather_fwd_op, (grad["x"], t["ids_keep"], None, False, path))
    for det in (False, True):
        torch.library.opcheck(mae_ops._scatter_fwd_op, (grad["x_vis"], t["ids_restore"],
                                                        grad["tok"], grad["pos1"], 1, det, path))
    for norm_pix in (False, True):
        torch.library.opcheck(mae_ops._loss_fwd_op, (grad["pred"], t["imgs"], t["mask"], 4,
                                                     norm_pix, True, path))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_compiled_mae_ops_match_eager(seed, backend, path, dtype):
    import selfsup.kernels.mae as mae

    backend(path)
    t = _mae_inputs(dtype)
    cases = [
        (lambda x, pos: mae.gather_tokens(x, t["ids_keep"], pos), (t["x"], t["pos"])),
        (lambda x, pos: mae.gather_tokens(x, t["ids_keep"], pos), (t["x_dl"], t["pos"])),
        (lambda xv, tok, pos: mae.scatter_tokens(xv, t["ids_restore"], tok, pos),
         (t["x_vis"], t["tok"], t["pos1"])),
        (lambda pred: mae.masked_patch_loss(pred, t["imgs"], t["mask"], 4), (t["pred"],)),
    ]
    for fn, args in cases:
        def summed(*a, fn=fn):  # a scalar with a non-uniform upstream for the token ops
            out = fn(*a)
            return out if out.dim() == 0 else (out * torch.linspace(-1, 2, out.shape[-1],
                                                                    dtype=out.dtype)).sum()
        cfn, counter = _compiled(summed, dynamic=True)
        requires = [True] * len(args)
        assert_all_close(loss_and_grads(cfn, args, requires),
                         loss_and_grads(summed, args, requires), dtype)
        assert counter.frame_count >= 1


def test_mae_bad_ids_still_raise_value_error_when_compiled(backend):
    import selfsup.kernels.mae as mae

    backend("torch")
    x, ids = torch.randn(2, 6, 4), torch.tensor([[0, 6], [1, 2]])
    with pytest.raises(ValueError, match=r"ids_keep values must lie in \[0, 6\)"):
        torch.compile(mae.gather_tokens, backend="aot_eager", fullgraph=True)(x, ids)
