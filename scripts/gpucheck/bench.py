"""Section "bench": every op at the production shapes of ROOFLINE.md, timed three ways.

Paths: "triton" (the fused kernels, forced), "torch" (the portable chunked path, forced) and
"naive" (the *_ref, the papers' pseudocode). Passes: "fwd" is the loss alone under no_grad
(evaluation), "fwd+bwd" the forward with gradients on plus autograd.grad of every input
that training differentiates. Per timing: median µs, effective GB/s (the floor's minimum
bytes / time), % of the ROOFLINE floor (floor / time), and the peak memory the call adds.
floor = max(bytes / copy bandwidth, FLOPs / matmul peak), both measured by the first case
(nominal H100 figures where nothing was measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import selfsup.kernels as K

from .common import Case, Context, kernels_backend, peak_extra_mb, sync, time_us

PATHS = ("triton", "torch", "naive")
PASSES = ("fwd", "fwd+bwd")
SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class Setup:
    """One op call: ours(*args) / ref(*args), the inputs training differentiates, floors."""

    ours: object
    ref: object
    args: list
    kwargs: dict
    wrt: list[int]
    floor: dict  # pass -> (bytes, flops)
    upstream: torch.Tensor | None = None  # tensor outputs; scalars get 1.0


def _queue(n, c, k, dtype, d, t=0.2):
    q, key = torch.randn(n, c, device=d, dtype=dtype), torch.randn(n, c, device=d, dtype=dtype)
    queue = F.normalize(torch.randn(k, c, device=d), dim=1).to(dtype)
    s = SIZE[dtype]  # MoCo: gradients reach q only (keys: momentum encoder; queue: none)
    return Setup(K.info_nce_queue, K.info_nce_queue_ref, [q, key, queue, t], {}, [0],
                 {"fwd": (k * c * s + 2 * n * c * s, 2 * n * c * k),
                  "fwd+bwd": (k * c * s + 3 * n * c * s, 4 * n * c * k)})


def _mocov3(n, m, c, dtype, d, t=0.2):
    """Both directions, ctr(q1, k2) + ctr(q2, k1), keys gathered (m rows) and without grad."""
    q1, q2 = (torch.randn(n, c, device=d, dtype=dtype) for _ in range(2))
    k1, k2 = (torch.randn(m, c, device=d, dtype=dtype) for _ in range(2))

    def sym(fn):
        return lambda a, b, ka, kb: (fn(a, kb, t, positive_offset=n)
                                     + fn(b, ka, t, positive_offset=n))

    s = SIZE[dtype]
    return Setup(sym(K.info_nce_batch), sym(K.info_nce_batch_ref), [q1, q2, k1, k2], {}, [0, 1],
                 {"fwd": (2 * (n + m) * c * s, 2 * 2 * n * m * c),
                  "fwd+bwd": (2 * (2 * n + m) * c * s, 2 * 4 * n * m * c)})


def _nt_xent(n, c, dtype, d, t=0.1):
    z1, z2 = (torch.randn(n, c, device=d, dtype=dtype) for _ in range(2))
    r, s = 2 * n, SIZE[dtype]
    return Setup(K.nt_xent, K.nt_xent_ref, [z1, z2, t], {}, [0, 1],
                 {"fwd": (r * c * s, 2 * r * r * c), "fwd+bwd": (2 * r * c * s, 8 * r * r * c)})


def _dino(b, v, g, k, dtype, d):
    st = torch.randn(v * b, k, device=d, dtype=dtype)
    te = torch.randn(g * b, k, device=d, dtype=dtype)
    center = 0.3 * torch.randn(1, k, device=d)  # fp32 buffer, as DINOLoss keeps it
    s = SIZE[dtype]
    read = (g + v) * b * k * s + 4 * k
    return Setup(K.dino_loss, K.dino_loss_ref, [st, te, center],
                 {"student_temp": 0.1, "teacher_temp": 0.04, "n_global": g}, [0],
                 {"fwd": (read, 0), "fwd+bwd": (read + v * b * k * s, 0)})


def _gather(b, length, dim, dtype, d, ratio=0.75):
    ids_keep, _, _ = K.random_masking(b, length, ratio, device=d)
    lk, s = ids_keep.shape[1], SIZE[dtype]
    x = torch.randn(b, length, dim, device=d, dtype=dtype)
    pos = torch.randn(1, length, dim, device=d, dtype=dtype)
    fwd = 2 * b * lk * dim * s + length * dim * s + 8 * b * lk
    bwd = b * lk * dim * s + b * length * dim * s + length * dim * s + 8 * b * lk
    return Setup(K.gather_tokens, K.gather_tokens_ref, [x, ids_keep, pos], {}, [0, 2],
                 {"fwd": (fwd, 0), "fwd+bwd": (fwd + bwd, 0)},
                 upstream=torch.randn(b, lk, dim, device=d, dtype=dtype))


def _scatter(b, length, dim, dtype, d, ratio=0.75):
    ids_keep, ids_restore, _ = K.random_masking(b, length, ratio, device=d)
    lk, s = ids_keep.shape[1], SIZE[dtype]
    xv = torch.randn(b, 1 + lk, dim, device=d, dtype=dtype)
    tok = torch.randn(1, 1, dim, device=d, dtype=dtype)
    pos = torch.randn(1, 1 + length, dim, device=d, dtype=dtype)
    small = (1 + length) * dim * s + dim * s + 8 * b * length
    fwd = b * (1 + lk) * dim * s + b * (1 + length) * dim * s + small
    return Setup(K.scatter_tokens, K.scatter_tokens_ref, [xv, ids_restore, tok, pos],
                 {"n_prefix": 1}, [0, 2, 3], {"fwd": (fwd, 0), "fwd+bwd": (2 * fwd, 0)},
                 upstream=torch.randn(b, 1 + length, dim, device=d, dtype=dtype))


def _mae_loss(b, hw, p, dtype, d, ratio=0.75):
    """Decoder predictions in bf16 (autocast), images fp32, as MAE training feeds them."""
    length, dim = (hw // p) ** 2, p * p * 3
    _, _, mask = K.random_masking(b, length, ratio, device=d)
    pred = torch.randn(b, length, dim, device=d, dtype=dtype)
    imgs = torch.randn(b, 3, hw, hw, device=d)
    masked = int(length * ratio) * b * dim
    fwd = masked * (4 + SIZE[dtype]) + 4 * b * length
    return Setup(K.masked_patch_loss, K.masked_patch_loss_ref, [pred, imgs, mask, p], {}, [0],
                 {"fwd": (fwd, 0), "fwd+bwd": (fwd + b * length * dim * SIZE[dtype], 0)})


BF16 = torch.bfloat16
# id -> (description, GPU builder, dry-run builder, ROOFLINE goal as (pass, µs) or None)
CASES = {
    "info_nce_queue/bf16 N256 C128 K65536": (
        "MoCo v1/v2 queue", lambda d: _queue(256, 128, 65536, BF16, d),
        lambda d: _queue(16, 32, 256, BF16, d), ("fwd+bwd", 25.0)),
    "info_nce_queue/fp32 N256 C128 K65536": (
        "MoCo queue, fp32", lambda d: _queue(256, 128, 65536, torch.float32, d),
        lambda d: _queue(16, 32, 256, torch.float32, d), None),
    "info_nce_queue/bf16 N256 C256 K65536": (
        "MoCo queue, C=256", lambda d: _queue(256, 256, 65536, BF16, d),
        lambda d: _queue(16, 64, 256, BF16, d), None),
    "info_nce_batch/bf16 1024x4096 C256 sym": (
        "MoCo v3, both directions", lambda d: _mocov3(1024, 4096, 256, BF16, d),
        lambda d: _mocov3(8, 32, 32, BF16, d), ("fwd+bwd", 25.0)),
    "nt_xent/bf16 2N=8192 C128": (
        "SimCLR", lambda d: _nt_xent(4096, 128, BF16, d), lambda d: _nt_xent(16, 32, BF16, d),
        ("fwd+bwd", 150.0)),
    "dino_loss/bf16 B64 2+10 K65536": (
        "DINO cls loss", lambda d: _dino(64, 12, 2, 65536, BF16, d),
        lambda d: _dino(4, 4, 2, 256, BF16, d), ("fwd+bwd", 110.0)),
    # MAE's token gather (encoder) and scatter (decoder) at MAE-L and MAE-H sizes: one
    # table, the ROOFLINE goals on the -L rows
    **{f"{op}/bf16 {size} B64 L{length} D{dim}": (
        desc, lambda d, f=fn, n=length, c=dim: f(64, n, c, BF16, d),
        lambda d, f=fn: f(4, 16, 64, BF16, d), goal)
       for op, fn, size, length, dim, desc, goal in (
           ("gather_tokens", _gather, "MAE-L", 196, 1024, "MAE encoder gather + pos",
            ("fwd", 8.0)),
           ("gather_tokens", _gather, "MAE-H", 256, 1280, "MAE-H encoder gather", None),
           ("scatter_tokens", _scatter, "MAE-L", 196, 512,
            "MAE decoder unshuffle + mask + pos", ("fwd", 9.0)),
           ("scatter_tokens", _scatter, "MAE-H", 256, 512, "MAE-H decoder unshuffle", None))},
    "masked_patch_loss/bf16 pred, fp32 imgs B64 224px p16": (
        "MAE norm-pix masked MSE", lambda d: _mae_loss(64, 224, 16, BF16, d),
        lambda d: _mae_loss(2, 32, 8, BF16, d), ("fwd+bwd", 30.0)),
}


def _call(setup: Setup, path: str, pass_: str):
    """A closure running one path and pass (returning its outputs, so peak memory sees them)."""
    fn = setup.ref if path == "naive" else setup.ours
    backend = None if path == "naive" else path

    def fwd():
        with kernels_backend(backend), torch.no_grad():
            return fn(*setup.args, **setup.kwargs)

    def fwd_bwd():
        leaves = list(setup.args)
        for i in setup.wrt:
            leaves[i] = setup.args[i].detach().requires_grad_(True)
        with kernels_backend(backend):
            out = fn(*leaves, **setup.kwargs)
            up = setup.upstream if setup.upstream is not None else torch.ones_like(out)
            return torch.autograd.grad(out, [leaves[i] for i in setup.wrt], up.to(out.dtype))

    return fwd if pass_ == "fwd" else fwd_bwd


def warm(ctx: Context, case_id: str) -> None:
    """Run the Triton path once per pass, so its kernels are compiled (and cached)."""
    setup = CASES[case_id][2 if ctx.dry_run else 1](ctx.device)
    for p in PASSES:
        _call(setup, "triton", p)()


def bench_case(ctx: Context, case_id: str) -> dict:
    desc, build, build_dry, goal = CASES[case_id]
    setup = (build_dry if ctx.dry_run else build)(ctx.device)
    ceil = ctx.ceilings()
    dtype = next(a.dtype for a in setup.args if torch.is_tensor(a) and a.is_floating_point())
    peak = ceil["bf16_tflops"] if dtype in (torch.bfloat16, torch.float16) else ceil["fp32_tflops"]
    floors = {}
    for p, (nbytes, flops) in setup.floor.items():
        us = max(nbytes / (ceil["copy_gbs"] * 1e3), flops / (peak * 1e6))
        floors[p] = {"bytes": nbytes, "flops": flops, "us": us}
    timings = []
    for path in PATHS:
        for p in PASSES:
            row = {"path": path, "pass": p}
            try:
                fn = _call(setup, path, p)
                row["us"] = time_us(fn, ctx.device, dry_run=ctx.dry_run)
                row["peak_mb"] = peak_extra_mb(fn, ctx.device)
                row["gbs"] = floors[p]["bytes"] / (row["us"] * 1e3)
                row["pct_floor"] = 100.0 * floors[p]["us"] / row["us"]
            except Exception as e:  # noqa: BLE001 - one path failing keeps the others
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                if "out of memory" in str(e) and ctx.cuda:
                    torch.cuda.empty_cache()
            timings.append(row)
            sync(ctx.device)
    if ctx.cuda:  # after every eager number is safe: a failed capture must not cost those
        for row in timings:
            if "us" in row:
                _graph_timing(ctx, _call(setup, row["path"], row["pass"]), row,
                              floors[row["pass"]]["us"])
    naive = {t["pass"]: t.get("us") for t in timings if t["path"] == "naive"}
    for t in timings:
        if t.get("us") and naive.get(t["pass"]):
            t["x_naive"] = naive[t["pass"]] / t["us"]
    row = {"status": "ok", "desc": desc, "dtype": str(dtype).replace("torch.", ""),
           "floor": floors, "timings": timings,
           "ceilings": {k: ceil[k] for k in ("copy_gbs", "bf16_tflops", "fp32_tflops")}}
    if goal is not None:
        gp, gus = goal
        # the kernels' own time: the graph replay where it could be captured
        ours = next((t.get("graph_us", t.get("us")) for t in timings
                     if t["path"] == "triton" and t["pass"] == gp), None)
        row["goal"] = {"pass": gp, "us": gus, "met": ours is not None and ours <= gus}
    if any("error" in t for t in timings if t["path"] == "triton"):
        row["status"] = "error"
        row["error"] = "; ".join(t["error"] for t in timings if "error" in t)[:1000]
    return row


def _graph_timing(ctx: Context, fn, row: dict, floor_us: float) -> None:
    """Time `fn` replayed as a CUDA graph: the GPU's time without Python's launch gaps.

    Eager timings of a few-µs kernel measure the host's dispatch; the graph shows the
    kernels. A path that cannot be captured (a host sync, say) gets the reason instead.
    """
    d = ctx.device
    try:
        side = torch.cuda.Stream(d)
        side.wait_stream(torch.cuda.current_stream(d))
        with torch.cuda.stream(side):  # capture wants its warm-up off the default stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream(d).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        row["graph_us"] = time_us(graph.replay, d, dry_run=False)
        row["graph_pct_floor"] = 100.0 * floor_us / row["graph_us"]
        del graph
    except Exception as e:  # noqa: BLE001 - recorded beside the eager number
        row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        torch.cuda.synchronize(d)  # raises if the context itself is gone: worker restarts


def ceilings(ctx: Context) -> dict:
    """Measured copy bandwidth (read + write counted) and dense matmul peaks on this device."""
    if not ctx.cuda:
        return {"status": "ok", "measured": {}, "note": "no GPU: nominal H100 ceilings"}
    d = ctx.device
    n = 1 << 29  # 1 GiB of bf16 each way: far beyond L2
    src, dst = torch.empty(n, dtype=BF16, device=d), torch.empty(n, dtype=BF16, device=d)
    us = time_us(lambda src=src, dst=dst: dst.copy_(src), d, dry_run=False)
    copy_gbs = 2 * n * 2 / (us * 1e3)
    del src, dst
    out = {"copy_gbs": copy_gbs}
    m = 8192
    for key, dt in (("bf16_tflops", BF16), ("fp32_tflops", torch.float32)):
        a, b = torch.randn(m, m, device=d, dtype=dt), torch.randn(m, m, device=d, dtype=dt)
        us = time_us(lambda a=a, b=b: a @ b, d, dry_run=False, warmup_ms=20, rep_ms=100)
        out[key] = 2 * m**3 / (us * 1e6)
        del a, b
    torch.cuda.empty_cache()
    return {"status": "ok", "measured": out,
            "note": "copy: 1 GiB bf16 copy_, bytes read + written; matmul: 8192^3 torch @ "
                    f"(fp32 as torch runs it: precision '{torch.get_float32_matmul_precision()}')"}


def cases(ctx: Context) -> list[Case]:
    out = [Case("ceilings", lambda: ceilings(ctx), timeout=60.0, min_s=2.0)]
    for cid, (desc, *_rest) in CASES.items():
        out.append(Case(cid, lambda cid=cid: bench_case(ctx, cid), timeout=90.0, min_s=3.0,
                        meta={"op": cid.split("/")[0], "desc": desc}))
    return out
