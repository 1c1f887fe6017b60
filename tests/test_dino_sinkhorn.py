"""DINO's --centering sinkhorn (DINOv2's teacher) and DINO's forward under torch.compile.

Oracles: SwAV's `sinkhorn_knopp_ref` (the paper's algorithm, float64, one process) for the
teacher probabilities, and the official pair loop for the cross-entropy. Sinkhorn is a
global-batch operation, so 2 gloo ranks must reproduce one process on the concatenated batch.
The compiled forward is one graph (fullgraph=True) that does not recompile as the step, the
teacher temperature and the momentum advance.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from selfsup.kernels import dino_loss
from selfsup.kernels.swav import sinkhorn_knopp, sinkhorn_knopp_ref
from selfsup.kernels.testing import TOL64
from selfsup.ssl.dino import sinkhorn_center

UPSTREAM = 1.7


def build_dino(*extra, arch="resnet_tiny", img=32, total=10):
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class

    argv = ["--method", "dino", "--data", "fashion-mnist-sample", "--device", "cpu", "--arch",
            arch, "--img-size", str(img), "--batch-size", "4", *extra]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class("dino").preset)
    cfg.extra.update(steps_per_epoch=2, schedule_steps=total, world_size=1)
    return method_class("dino")(cfg)


def teacher_logits(n, k, scale, dtype=torch.float64, generator=None):
    """Logits like a DINO head's (cosines times a weight norm) with some prototypes far
    from every sample: a few columns pushed down, where exp(t / eps) underflows."""
    t = torch.randn(n, k, dtype=torch.float64, generator=generator) * scale
    t[:, : max(1, k // 5)] -= 3 * scale
    return t.to(dtype)


def sinkhorn_loss_ref(s, t, student_temp, teacher_temp, n_iters=3, n_global=2):
    """The pair loop against DINOv2's Sinkhorn teacher over the global crops together."""
    b = t.shape[0] // n_global
    p = sinkhorn_knopp_ref(t, teacher_temp, n_iters).chunk(n_global)
    views = (s.double() / student_temp).chunk(s.shape[0] // b)
    total, pairs = 0.0, 0
    for i, pt in enumerate(p):
        for v, sv in enumerate(views):
            if v != i:
                total = total + (-pt * F.log_softmax(sv, -1)).sum(-1).mean()
                pairs += 1
    return total / pairs


# ----------------------------------------------------------------------------- the center
@pytest.mark.parametrize("n,k", [(7, 13), (16, 300), (1, 5)])
@pytest.mark.parametrize("n_iters", [1, 3, 5])
@pytest.mark.parametrize("tau", [0.04, 0.07])
def test_sinkhorn_center_gives_the_sinkhorn_knopp_codes(seed, n, k, n_iters, tau):
    t = teacher_logits(n, k, 0.5)
    c = sinkhorn_center(t, tau, n_iters)
    assert c.shape == (1, k) and c.dtype == torch.float64
    got = torch.softmax((t - c) / tau, -1)
    want = sinkhorn_knopp_ref(t, tau, n_iters)
    torch.testing.assert_close(got, want, **TOL64)
    torch.testing.assert_close(got, sinkhorn_knopp(t, tau, n_iters), **TOL64)
    # a 0-d tensor temperature (the schedule's) gives the same center
    torch.testing.assert_close(sinkhorn_center(t, torch.tensor(tau, dtype=torch.float64),
                                               n_iters), c, **TOL64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_center_is_exact_in_fp32_where_exp_overflows(seed, dtype):
    # logits / eps spans ~+-400 nats: exp() over- and underflows fp32, the log domain does not
    t = teacher_logits(24, 257, 4.0, dtype=dtype)
    c = sinkhorn_center(t, 0.04, 3)
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
    got = torch.softmax((t.double() - c.double()) / 0.04, -1)
    want = sinkhorn_knopp_ref(t.double(), 0.04, 3)
    assert torch.isfinite(want).all()  # float64 holds exp(400)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_sinkhorn_center_of_no_rows_is_finite():
    # no masked patch in the batch (DINOv2 masks half the images): the loss over 0 rows is 0
    c = sinkhorn_center(torch.randn(0, 6), 0.04)
    assert c.shape == (1, 6) and torch.equal(c, torch.zeros(1, 6))


def test_sinkhorn_center_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_center(torch.randn(3), 0.04)
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_center(torch.randn(4, 0), 0.04)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_center(torch.randn(3, 4), 0.04, 0)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_center(torch.randn(3, 4), 0.0)


# ----------------------------------------------------------------------------- the method
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("tau", [0.04, 0.065])
def test_sinkhorn_distill_loss_matches_the_pair_loop(seed, backend, path, tau):
    backend(path)
    dino = build_dino("--centering", "sinkhorn", "--out-dim", "37").double()
    assert dino.centering == "sinkhorn"
    b, v, k = 3, 4, 37  # 2 global + 2 local views
    s = torch.randn(v * b, k, dtype=torch.float64, requires_grad=True)
    t = teacher_logits(2 * b, k, 0.6)
    center_before = dino.criterion.center.clone()
    loss, stats = dino.distill_loss(s, t, torch.tensor(tau, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss * UPSTREAM, s)
    s_ref = s.detach().clone().requires_grad_()
    want = sinkhorn_loss_ref(s_ref, t, 0.1, tau)
    (grad_ref,) = torch.autograd.grad(want * UPSTREAM, s_ref)
    torch.testing.assert_close(loss, want, **TOL64)
    torch.testing.assert_close(grad, grad_ref, **TOL64)
    p = sinkhorn_knopp_ref(t, tau, 3)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    torch.testing.assert_close(stats["teacher_entropy"], entropy, **TOL64)
    torch.testing.assert_close(stats["kl"], want.detach() - entropy, **TOL64)
    assert torch.equal(dino.criterion.center, center_before)  # no EMA center in this mode


def test_centering_switch_changes_the_teacher(seed):
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)]
    center = build_dino("--out-dim", "64", "--n-local", "1")
    sink = build_dino("--out-dim", "64", "--n-local", "1", "--centering", "sinkhorn")
    sink.load_state_dict(center.state_dict())
    assert center.centering == "center"  # DINO's preset: today's DINO
    a, b = center(views), sink(views)
    assert torch.isfinite(b["loss"]) and not torch.allclose(a["loss"], b["loss"])
    # the EMA center moved in center mode only
    assert center.criterion.center.abs().sum() > 0 and sink.criterion.center.abs().sum() == 0


def test_unknown_centering_is_a_value_error():
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class
    from selfsup.ssl.dino import DINO

    argv = ["--method", "dino", "--data", "fashion-mnist-sample", "--arch", "resnet_tiny",
            "--img-size", "32", "--out-dim", "16"]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class("dino").preset)
    cfg.extra.update(steps_per_epoch=2, schedule_steps=10, world_size=1)
    cfg.centering = "nope"  # a config.json edited by hand; the CLI's choices refuse it
    with pytest.raises(ValueError, match="--centering"):
        DINO(cfg)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--centering", "nope"])
    cfg.centering, cfg.koleo_weight = "center", 0.1  # dinov2's regulariser is not dino's
    with pytest.raises(ValueError, match="--koleo-weight .*dinov2"):
        DINO(cfg)


# ----------------------------------------------------------------------------- 2 ranks
WORLD, B, V, K, TAU_S, TAU_T = 2, 6, 3, 29, 0.1, 0.05  # global batch B, 2 global + 1 local


def global_batch():
    g = torch.Generator().manual_seed(27)
    s = torch.randn(V * B, K, dtype=torch.float64, generator=g)
    return s, teacher_logits(2 * B, K, 0.7, generator=g)


def rows_of(x, n_views, rank):
    """This rank's rows of a view-major (n_views * B, K) tensor: B / WORLD per view."""
    n = B // WORLD
    return torch.cat([x[j * B + rank * n: j * B + (rank + 1) * n] for j in range(n_views)])


def loss_and_grad(s, t):
    s = s.clone().requires_grad_()
    c = sinkhorn_center(t, TAU_T, 3)
    loss = dino_loss(s, t, c, student_temp=TAU_S, teacher_temp=TAU_T)
    (g,) = torch.autograd.grad(loss * UPSTREAM, s)
    return loss.detach(), g, c


def _rank_main(rank, path, init_file, out_dir):
    os.environ["SELFSUP_KERNELS"] = path
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=WORLD)
    try:
        s, t = global_batch()
        out = loss_and_grad(rows_of(s, V, rank), rows_of(t, 2, rank))
        # a rank without rows (no masked patch) joins the sums: rank 0 holds them all
        lonely = sinkhorn_center(t if rank == 0 else t[:0], TAU_T, 3)
        torch.save((*out, lonely), Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(path, tmp_path, monkeypatch):
    if path == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton path needs the interpreter on CPU")
    mp.spawn(_rank_main, args=(path, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    s, t = global_batch()
    loss, grad, center = loss_and_grad(s, t)
    torch.testing.assert_close(loss, sinkhorn_loss_ref(s, t, TAU_S, TAU_T), **TOL64)
    # each rank's teacher = the global Sinkhorn codes of its rows: the same center everywhere
    for r, (_, _, c, lonely) in enumerate(ranks):
        torch.testing.assert_close(c, center, **TOL64, msg=f"rank {r}")
        torch.testing.assert_close(lonely, center, **TOL64, msg=f"rank {r}, rows on rank 0")
    # a rank's loss is the mean over its rows: the rank mean is the global loss, and its
    # gradient WORLD x the global one (DDP's averaging gives the global gradient)
    torch.testing.assert_close(sum(r[0] for r in ranks) / WORLD, loss, **TOL64)
    for r, (_, g, _, _) in enumerate(ranks):
        torch.testing.assert_close(g, WORLD * rows_of(grad, V, r), **TOL64)


# ----------------------------------------------------------------------------- compile
def _loss_and_grads(fn, method, views):
    out = fn(views)
    params = [p for p in method.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"] * UPSTREAM, params)
    return out, [out["loss"].detach(), *grads]


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_compiled_dino_forward_matches_eager_without_recompiling(seed, backend, monkeypatch,
                                                                 centering):
    # the whole forward (ViT student and teacher, heads, schedule lookup, centering, fused
    # loss, center update) in one graph, over steps whose temperature and momentum differ
    backend("torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")
    torch._dynamo.reset()
    dino = build_dino("--out-dim", "40", "--n-local", "1", "--centering", centering,
                      "--drop-path", "0", "--warmup-teacher-temp-epochs", "2",
                      arch="vit_tiny", img=16).double()
    twin = copy.deepcopy(dino)
    counter = CompileCounterWithBackend("aot_eager")
    cfwd = torch.compile(twin.forward, backend=counter, fullgraph=True)
    temps = []
    for step in range(2):
        views = [torch.randn(2, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
        views.append(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        want_out, want = _loss_and_grads(dino, dino, views)
        got_out, got = _loss_and_grads(cfwd, twin, views)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL64)
        for key in ("teacher_temp", "momentum", "teacher_entropy", "kl"):
            torch.testing.assert_close(got_out[key], want_out[key], **TOL64, msg=key)
        torch.testing.assert_close(twin.criterion.center, dino.criterion.center, **TOL64)
        temps.append(float(got_out["teacher_temp"]))
        for m in (dino, twin):
            m.on_step_end(step, 10)
    assert temps[0] != temps[1]  # the warm-up moved: read from the step buffer, not baked in
    assert counter.frame_count == 1  # one graph, no recompile at the second step
    torch._dynamo.reset()
