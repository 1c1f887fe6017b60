"""InfoNCE family: ref (the papers' pseudocode) vs portable torch vs Triton, fwd and fwd+bwd.

Shapes are ROOFLINE.md's (marked slow), plus one small shape per loss for the CI smoke run:
- queue: MoCo N=256, C=128, K=65536 (queue and keys without grad, as MoCo uses it);
- batch: MoCo v3 1024 local queries x 4096 gathered keys, C=256, keys without grad (one of the
  two directions of the symmetric loss; the floor is half of ROOFLINE's two-direction one);
- nt_xent: SimCLR 2N=8192 and the CPU-target 2N=4096, C=128, grads to both views.

"fwd" is a forward with the queries requiring grad (training's forward: the fused paths
already accumulate dq there); "fwd+bwd" adds the backward. Inputs are bf16 on CUDA
(ROOFLINE's floors) and fp32 on CPU (its CPU table). floor_us uses H100 SXM ceilings
(790 TFLOP/s bf16, 3.0 TB/s), so % of floor means something only there. On CPU rows run at
1 and 2 threads: ROOFLINE's targets are for 1 thread, and the portable path must not fall
behind the naive one at 2.

    pytest bench/bench_info_nce.py --benchmark-enable --benchmark-only -m slow \\
        -k "queue-N256 or 2N4096" --benchmark-json out.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import IMPLS, device, run, skip_if_interpreted

from selfsup.kernels import info_nce_batch, info_nce_queue, nt_xent

PEAK_FLOPS, PEAK_BW = 790e12, 3.0e12  # H100 SXM, ROOFLINE.md
# name: (kind, dims, slow, ROOFLINE CPU target for fwd+bwd at 1 thread)
CASES = {
    "queue-N64-C128-K4096": ("queue", dict(n=64, c=128, k=4096), False, ""),
    "queue-N256-C128-K65536": ("queue", dict(n=256, c=128, k=65536), True,
                               "<= 300 ms, <= 10 MB"),
    "batch-128x512-C256": ("batch", dict(n=128, m=512, c=256), False, ""),
    "batch-1024x4096-C256": ("batch", dict(n=1024, m=4096, c=256), True, ""),
    "ntxent-2N512-C128": ("nt_xent", dict(n=256, c=128), False, ""),
    "ntxent-2N4096-C128": ("nt_xent", dict(n=2048, c=128), True, "<= 400 ms, <= 50 MB"),
    "ntxent-2N8192-C128": ("nt_xent", dict(n=4096, c=128), True, ""),
}
PARAMS = [pytest.param(k, marks=pytest.mark.slow if v[2] else ()) for k, v in CASES.items()]
THREADS = [1, 2]


def inputs(kind, dims, dtype, dev):
    g = torch.Generator().manual_seed(0)

    def rows(n):
        return torch.randn(n, dims["c"], generator=g).to(dev, dtype)

    if kind == "queue":
        queue = F.normalize(rows(dims["k"]).float(), dim=1).to(dtype)
        return [rows(dims["n"]).requires_grad_(True), rows(dims["n"]), queue]
    if kind == "batch":
        return [rows(dims["n"]).requires_grad_(True), rows(dims["m"])]
    return [rows(dims["n"]).requires_grad_(True), rows(dims["n"]).requires_grad_(True)]


def roofline(kind, dims, passes, itemsize):
    """(bytes, flops, floor_us): inputs read once and grads written once; one logits GEMM
    for fwd, plus the dq GEMM (queue, batch) or three more (nt_xent: dq, recompute, dk)."""
    c = dims["c"]
    if kind == "queue":
        n, m, gemms, grad_rows = dims["n"], dims["k"], 2, dims["n"]
        read_rows = dims["k"] + 2 * n
    elif kind == "batch":
        n, m, gemms, grad_rows = dims["n"], dims["m"], 2, dims["n"]
        read_rows = dims["n"] + dims["m"]
    else:
        n = m = 2 * dims["n"]
        gemms, grad_rows, read_rows = 4, n, n
    gemms = 1 if passes == "fwd" else gemms
    flops = gemms * 2.0 * n * m * c
    nbytes = (read_rows + (grad_rows if passes != "fwd" else 0)) * c * itemsize
    return nbytes, flops, round(max(nbytes / PEAK_BW, flops / PEAK_FLOPS) * 1e6, 2)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_info_nce(benchmark, monkeypatch, impl, case, passes, threads):
    skip_if_interpreted(impl)
    dev = device()
    if dev.type == "cuda" and threads != THREADS[0]:
        pytest.skip("CPU thread counts only")
    kind, dims, slow, target = CASES[case]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    monkeypatch.setenv("SELFSUP_KERNELS", impl)
    args = inputs(kind, dims, dtype, dev)
    wrt = [a for a in args if a.requires_grad]
    temperature = {"queue": 0.2, "batch": 0.2, "nt_xent": 0.1}[kind]
    fn = {"queue": info_nce_queue, "batch": info_nce_batch, "nt_xent": nt_xent}[kind]

    def step():
        loss = fn(*args, temperature)
        if passes == "fwd+bwd":
            torch.autograd.grad(loss, wrt)
        return loss

    nbytes, flops, floor_us = roofline(kind, dims, passes, args[0].element_size())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run(benchmark, step, impl=impl, shape=case, bytes_moved=nbytes, flops=flops,
            floor_us=floor_us, rounds=7 if slow else 20, passes=passes,
            dtype=str(dtype).replace("torch.", ""), cpu_target=target)
    finally:
        torch.set_num_threads(old)


# MoCo's queue dtype (docs/kernels-infonce.md): a bf16 run with the queue stored in bf16 (what
# MoCo does), an fp32 queue cast to bf16 every step, and the old behaviour (fp32 queue and k:
# everything promoted to the fp32 tf32x3 kernel).
QUEUE_VARIANTS = ("stored-bf16", "cast-per-step", "promoted-fp32")


@pytest.mark.parametrize("variant", QUEUE_VARIANTS)
def test_moco_queue_dtype(benchmark, monkeypatch, variant):
    skip_if_interpreted("triton")  # a GPU measurement: the kernels' traffic
    dev = device()
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    dims = dict(n=256, c=128, k=65536)
    q, k, queue = inputs("queue", dims, torch.bfloat16, dev)
    if variant != "stored-bf16":
        queue = queue.float()

    def step():
        keys = queue.to(torch.bfloat16) if variant == "cast-per-step" else queue
        pos = k.float() if variant == "promoted-fp32" else k
        loss = info_nce_queue(q, pos, keys, 0.2)
        torch.autograd.grad(loss, [q])
        return loss

    nbytes, flops, floor_us = roofline("queue", dims, "fwd+bwd", 2)
    run(benchmark, step, impl="triton", shape=f"moco-queue-{variant}", bytes_moved=nbytes,
        flops=flops, floor_us=floor_us, rounds=20, passes="fwd+bwd", dtype="bfloat16")
