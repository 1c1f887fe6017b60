"""MAE masking ops: ref vs portable torch vs Triton, forward and forward+backward.

Rows: impl (ref | torch | triton) x op x shape x mode.
- gather: encoder `gather_tokens(x, ids_keep, pos)` at width D (pos learned, so d pos is on);
- scatter: decoder `scatter_tokens(x_vis, ids_restore, mask_token, pos)` at width Dd;
- loss: `masked_patch_loss(pred, imgs, mask, p, norm_pix=True)`, fp32 images;
- pipeline: ROOFLINE.md's CPU case "MAE-L masking + norm-pix loss": random_masking, the
  encoder gather and decoder scatter (fixed sin-cos pos, as the official model) and the loss,
  forward+backward with random upstream gradients for the token outputs.
Shapes: MAE ViT-L/16 (B=64, L=196, D=1024, Dd=512, 224 px) and ViT-H/14 (L=256, D=1280,
Dd=512, 224 px) are marked slow; "tiny" is the CI smoke row.
floor_us = minimum bytes / 3.0 TB/s (H100, ROOFLINE.md), only meaningful on that GPU. On CUDA
activations are bf16 (the floors' assumption) with fp32 images; on CPU everything is fp32,
as the CPU targets were measured. Triton rows run only on CUDA.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from _harness import IMPLS, device, run, skip_if_interpreted

from selfsup.kernels import mae as M

BW = 3.0e12  # bytes/s, H100 SXM copy bandwidth (ROOFLINE.md)
# name: (B, L, D, Dd, patch, image side)
SHAPES = {
    "tiny": (4, 49, 192, 128, 4, 28),
    "mae-l": (64, 196, 1024, 512, 16, 224),
    "mae-h": (64, 256, 1280, 512, 14, 224),
}
SHAPE_PARAMS = [pytest.param(k, marks=() if k == "tiny" else pytest.mark.slow) for k in SHAPES]
RATIO = 0.75
THREADS = [pytest.param(t, marks=pytest.mark.skipif(torch.cuda.is_available() or
                                                    (os.cpu_count() or 1) < t, reason="CPU"))
           for t in (1, 2)]


def act_dtype():
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def make(op, shape):
    """(inputs, call(inputs) -> outputs, grad_inputs, bytes_fwd, bytes_fwd_bwd)."""
    b, length, d, dd, p, side = SHAPES[shape]
    dev, dt = device(), act_dtype()
    e = torch.finfo(dt).bits // 8
    ids_keep, ids_restore, mask = M.random_masking(b, length, RATIO, device=dev)
    lk = ids_keep.shape[1]
    if op == "gather":
        x = torch.randn(b, length, d, device=dev, dtype=dt, requires_grad=True)
        pos = torch.randn(1, length, d, device=dev, dtype=dt, requires_grad=True)
        fwd = (2 * b * lk * d + length * d) * e
        bwd = (b * lk * d + b * length * d + length * d) * e
        return (lambda f: f(x, ids_keep, pos)), [x, pos], fwd, fwd + bwd
    if op == "scatter":
        t = 1 + length
        xv = torch.randn(b, 1 + lk, dd, device=dev, dtype=dt, requires_grad=True)
        tok = torch.randn(1, 1, dd, device=dev, dtype=dt, requires_grad=True)
        pos = torch.randn(1, t, dd, device=dev, dtype=dt, requires_grad=True)
        fwd = (b * (1 + lk) * dd + t * dd + b * t * dd) * e
        return ((lambda f: f(xv, ids_restore, tok, pos, n_prefix=1)), [xv, tok, pos], fwd,
                2 * fwd)
    c = 3 if side > 32 else 1
    imgs = torch.randn(b, c, side, side, device=dev)
    pred = torch.randn(b, length, p * p * c, device=dev, dtype=dt, requires_grad=True)
    n_m = length - lk
    # masked fp32 pixels + masked pred read, every grad row written; backward re-scales it
    fwd = b * n_m * p * p * c * (4 + e) + b * length * p * p * c * e
    return ((lambda f: f(pred, imgs, mask, p, norm_pix=True)), [pred], fwd,
            fwd + 2 * b * length * p * p * c * e)


FNS = {"ref": {"gather": M.gather_tokens_ref, "scatter": M.scatter_tokens_ref,
               "loss": M.masked_patch_loss_ref},
       "fused": {"gather": M.gather_tokens, "scatter": M.scatter_tokens,
                 "loss": M.masked_patch_loss}}


def force(monkeypatch, impl):
    if impl != "ref":
        monkeypatch.setenv("SELFSUP_KERNELS", impl)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
@pytest.mark.parametrize("op", ["gather", "scatter", "loss"])
@pytest.mark.parametrize("impl", IMPLS)
def test_mae_op(benchmark, monkeypatch, impl, op, shape, mode):
    skip_if_interpreted(impl)
    force(monkeypatch, impl)
    call, inputs, bytes_fwd, bytes_all = make(op, shape)
    fn = FNS["ref" if impl == "ref" else "fused"][op]

    with torch.no_grad():
        out = call(fn)
    up = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)

    def step():
        out = call(fn)
        return out if mode == "fwd" else torch.autograd.grad(out, inputs, up)

    nbytes = bytes_fwd if mode == "fwd" else bytes_all
    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
        run(benchmark, step, impl=impl, shape=f"{op} {shape}", bytes_moved=nbytes,
            floor_us=round(nbytes / BW * 1e6, 2), mode=mode, dtype=str(act_dtype()))


def pipeline_inputs(shape):
    b, length, d, dd, p, side = SHAPES[shape]
    dev, dt = device(), act_dtype()
    c = 3 if side > 32 else 1
    lk = int(length * (1 - RATIO))
    leaf = dict(device=dev, dtype=dt, requires_grad=True)
    return dict(
        b=b, length=length, p=p,
        x=torch.randn(b, length, d, **leaf),  # patch embeddings
        pos=torch.randn(1, length, d, device=dev, dtype=dt),  # fixed sin-cos: no grad
        x_dec=torch.randn(b, 1 + lk, dd, **leaf),  # decoder_embed(latent), cls first
        tok=torch.randn(1, 1, dd, **leaf),
        dec_pos=torch.randn(1, 1 + length, dd, device=dev, dtype=dt),
        pred=torch.randn(b, length, p * p * c, **leaf),
        imgs=torch.randn(b, c, side, side, device=dev),
        g_enc=torch.randn(b, lk, d, device=dev, dtype=dt),
        g_dec=torch.randn(b, 1 + length, dd, device=dev, dtype=dt),
    )


def pipeline_step(t, impl):
    ref = impl == "ref"
    ids_keep, ids_restore, mask = M.random_masking(t["b"], t["length"], RATIO,
                                                   device=t["x"].device)
    enc = (M.gather_tokens_ref if ref else M.gather_tokens)(t["x"], ids_keep, t["pos"])
    dec = (M.scatter_tokens_ref if ref else M.scatter_tokens)(t["x_dec"], ids_restore, t["tok"],
                                                              t["dec_pos"], n_prefix=1)
    loss = (M.masked_patch_loss_ref if ref else M.masked_patch_loss)(t["pred"], t["imgs"], mask,
                                                                     t["p"], norm_pix=True)
    return torch.autograd.grad([loss, enc, dec], [t["x"], t["x_dec"], t["tok"], t["pred"]],
                               [torch.ones_like(loss), t["g_enc"], t["g_dec"]])


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_mae_masking_pipeline(benchmark, monkeypatch, impl, shape, threads):
    """ROOFLINE CPU target (MAE-L): <= 330 ms and <= 160 MB (official ~650 ms, 319 MB)."""
    skip_if_interpreted(impl)
    force(monkeypatch, impl)
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    try:
        t = pipeline_inputs(shape)
        run(benchmark, lambda: pipeline_step(t, impl), impl=impl, shape=f"pipeline {shape}",
            rounds=None if shape == "tiny" else 9, mode="fwd+bwd", dtype=str(act_dtype()))
    finally:
        torch.set_num_threads(before)
