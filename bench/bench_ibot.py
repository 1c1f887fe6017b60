"""iBOT patch loss incl. the center update: the papers' formula (ref) vs portable (torch) vs
Triton, time and peak memory.

Rows: impl x shape x dtype x mode (fwd = loss under no_grad; fwd+bwd = loss.backward()) x
threads (CPU only). "ours" is `iBOTPatchLoss` as the methods call it (loss, teacher entropy
and center EMA from one pass) on the gathered (M, K) layout with a host mask (DINOv2's);
"ref" is `ibot_patch_loss_ref` plus the same center update in plain torch.

The production shape is DINOv2 ViT-L's: 8192 masked tokens x K = 65536 (B = 64 images of
128 masked tokens). Its floor (ROOFLINE.md section 4: read S, read T, write dS, bf16 on an
H100 at 3.0 TB/s) is 6 B/element = 3.2 GB -> 1074 us; the naive loss materialises ~60-90
B/element (15-22 GB). On this CPU (23 GB RAM shared by several jobs) the full shape does not
fit beside the naive version, so the recorded CPU rows are "dinov2/8": a 1/8 row slice (1024
masked tokens of 8 images, K = 65536), whose memory scales linearly in M (x8 for the full
shape). "dinov2" (the full shape) runs on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _harness import IMPLS, device, run, skip_if_interpreted

from selfsup.kernels import iBOTPatchLoss, ibot_patch_loss_ref

H100_BW = 3.0e12  # B/s, ROOFLINE.md
# name: (B images, masked tokens per image, N tokens per image, K)
SHAPES = {"small": (4, 16, 49, 4096), "dinov2/8": (8, 128, 256, 65536),
          "dinov2": (64, 128, 256, 65536)}
PARAMS = [pytest.param(k, marks=() if k == "small" else pytest.mark.slow) for k in SHAPES]
THREADS = [1, 2] if not torch.cuda.is_available() else [0]
DTYPES = [torch.float32, torch.bfloat16]


def _bytes(m, k, esize, mode):
    """Minimum traffic: read T and S once (+ write dS for fwd+bwd)."""
    return m * k * esize * (3 if mode == "fwd+bwd" else 2)


def _mask(b, n_masked, n):
    """n_masked masked tokens in every image (random positions), drawn on the host."""
    scores = torch.rand(b, n)
    return scores.argsort(1).argsort(1) < n_masked


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_ibot_loss(benchmark, monkeypatch, impl, shape, dtype, mode, threads):
    skip_if_interpreted(impl)
    b, n_masked, n, k = SHAPES[shape]
    dev = device()
    if shape == "dinov2" and dev.type != "cuda":
        pytest.skip("the full DINOv2 shape with the naive loss beside it does not fit in RAM")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    mask = _mask(b, n_masked, n)
    m = int(mask.sum())
    s = (torch.randn(m, k, device=dev) * 2).to(dtype).requires_grad_(mode == "fwd+bwd")
    t = torch.randn(m, k, device=dev).to(dtype)
    crit = iBOTPatchLoss(k).to(dev)
    if impl != "ref":
        monkeypatch.setenv("SELFSUP_KERNELS", impl)

    def ours():
        return crit(s, t, mask)

    def ref():
        loss = ibot_patch_loss_ref(s, t, mask, crit.center, teacher_temp=0.07)
        with torch.no_grad():  # DINOv2's center update: mean of the masked teacher logits
            crit.center.mul_(0.9).add_(t.float().mean(0, keepdim=True), alpha=0.1)
        return loss

    loss_fn = ref if impl == "ref" else ours

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return loss_fn()
        loss = loss_fn()
        loss.backward()
        s.grad = None  # freed after, not before: the peak then counts the new gradient
        return loss

    nbytes = _bytes(m, k, s.element_size(), mode)
    try:
        run(benchmark, step, impl=impl, shape=f"{shape} M{m} K{k}", mode=mode,
            dtype=str(dtype).replace("torch.", ""), bytes_moved=nbytes,
            floor_us=round(nbytes / H100_BW * 1e6, 1),
            rounds=None if shape == "small" else 3)
    finally:
        torch.set_num_threads(old_threads)
