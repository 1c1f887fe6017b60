"""DINO loss incl. the center update: official pair loop (ref) vs portable (torch) vs Triton.

Rows: impl x shape x mode (fwd = loss under no_grad; fwd+bwd = loss.backward()) x threads
(CPU only). "ours" is `DINOLoss` as the trainer calls it (loss, collapse stats and center
EMA from one pass); "ref" is `dino_loss_ref` plus the official center update. The dino shape
is ROOFLINE.md section 4: B=64 per GPU, 2 global + 10 local crops, K=65536; its floor is
72.7 us for fwd+bwd (read T + read S + write dS, bf16 on an H100). On CPU the logits are
fp32, as in ROOFLINE's CPU targets (fwd+bwd <= 535 ms and <= 272 MB at 1 thread); on CUDA
bf16. The small shape is a quick smoke row; the dino shape is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from _harness import IMPLS, device, run, skip_if_interpreted

from selfsup.kernels import DINOLoss, dino_loss_ref

H100_BW = 3.0e12  # B/s, ROOFLINE.md
# name: (B, n_global, n_local, K)
SHAPES = {"small": (8, 2, 4, 4096), "dino": (64, 2, 10, 65536)}
PARAMS = [pytest.param(k, marks=() if k == "small" else pytest.mark.slow) for k in SHAPES]
THREADS = [1, 2] if not torch.cuda.is_available() else [0]


def _bytes(b, g, v, k, esize, mode):
    """Minimum traffic: read T and S once (+ write dS for fwd+bwd)."""
    return (g * b * k + v * b * k * (2 if mode == "fwd+bwd" else 1)) * esize


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_dino_loss(benchmark, monkeypatch, impl, shape, mode, threads):
    skip_if_interpreted(impl)
    b, g, n_local, k = SHAPES[shape]
    v = g + n_local
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = (torch.randn(v * b, k, device=dev) * 2).to(dtype).requires_grad_(mode == "fwd+bwd")
    t = torch.randn(g * b, k, device=dev).to(dtype)
    crit = DINOLoss(k).to(dev)
    if impl != "ref":
        monkeypatch.setenv("SELFSUP_KERNELS", impl)

    def ours():
        return crit(s, t)

    def ref():
        loss = dino_loss_ref(s, t, crit.center)
        with torch.no_grad():  # the official update_center
            mean = t.float().sum(0, keepdim=True) / len(t)
            crit.center.mul_(0.9).add_(mean, alpha=0.1)
        return loss

    loss_fn = ref if impl == "ref" else ours

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return loss_fn()
        s.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    nbytes = _bytes(b, g, v, k, s.element_size(), mode)
    try:
        run(benchmark, step, impl=impl, shape=f"{shape} B{b} {g}+{n_local} K{k}", mode=mode,
            dtype=str(dtype).replace("torch.", ""), bytes_moved=nbytes,
            floor_us=round(nbytes / H100_BW * 1e6, 1), rounds=3 if shape == "dino" else None)
    finally:
        torch.set_num_threads(old_threads)
