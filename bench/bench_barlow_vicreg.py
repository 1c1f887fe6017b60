"""Barlow Twins and VICReg losses: the paper's formulas (ref, D x D materialised) vs portable
(torch: N x N Gram for 2N <= D, column slabs otherwise) vs Triton (fused Gram sweep).

Rows: loss x impl x shape, fwd+bwd (loss.backward() on both views). Shapes at the paper's
projector width D = 8192: N = 256 (per-GPU batch) and N = 2048 (the paper's global batch),
plus a small smoke row. FLOPs are the implementation's own minimum: ref 2 N D^2 per D x D
product (Barlow: 1 fwd + 2 bwd; VICReg: 2 views x (1 fwd + 2 bwd)), torch 2 N^2 D per N x N
product (Barlow: 2 fwd, 4 bwd; VICReg: 3 per view).
On CPU fp32 and 1-2 threads (the Triton rows are skipped: the interpreter's times mean
nothing); on CUDA bf16. Results: bench/results/cpu/barlow_vicreg.md.
"""

from __future__ import annotations

import pytest
import torch
from _harness import IMPLS, device, run, skip_if_interpreted

from selfsup.kernels import barlow_twins_loss, barlow_twins_loss_ref, vicreg_loss, vicreg_loss_ref

LOSSES = {"barlow": (barlow_twins_loss, barlow_twins_loss_ref),
          "vicreg": (vicreg_loss, vicreg_loss_ref)}
SHAPES = {"small": (64, 512), "N256": (256, 8192), "N2048": (2048, 8192)}
PARAMS = [pytest.param(k, marks=() if k == "small" else pytest.mark.slow) for k in SHAPES]
THREADS = [1] if not torch.cuda.is_available() else [0]


def _flops(loss: str, impl: str, n: int, d: int) -> float:
    if impl == "ref":
        per = 2 * n * d * d
        return 3 * per if loss == "barlow" else 6 * per
    if 2 * n > d:  # the portable direct route: the ref's products, in column slabs
        return 3 * 2 * n * d * d if loss == "barlow" else 6 * 2 * n * d * d
    return 6 * 2 * n * n * d  # Barlow: 2 Grams fwd, 2 + 2 Gram x batch bwd; VICReg: 3 per view


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_barlow_vicreg(benchmark, monkeypatch, loss, impl, shape, threads):
    skip_if_interpreted(impl)
    n, d = SHAPES[shape]
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    z1 = torch.randn(n, d, device=dev).to(dtype).requires_grad_()
    z2 = (0.5 * z1.detach() + torch.randn(n, d, device=dev).to(dtype)).requires_grad_()
    ours, ref = LOSSES[loss]
    if impl != "ref":
        monkeypatch.setenv("SELFSUP_KERNELS", impl)
    fn = (lambda: ref(z1, z2, upcast=False)) if impl == "ref" else (lambda: ours(z1, z2))

    def step():
        z1.grad = z2.grad = None
        out = fn()
        out.backward()
        return out

    try:
        run(benchmark, step, impl=impl, shape=f"{shape} N{n} D{d}", mode="fwd+bwd",
            dtype=str(dtype).replace("torch.", ""), flops=_flops(loss, impl, n, d),
            rounds=None if shape == "small" else 2, loss=loss)
    finally:
        torch.set_num_threads(old_threads)
