"""Section "kernels": each public op on its Triton path against its *_ref in float64.

tests/kernels make CPU tensors, so on a CUDA machine they test the interpreter or the
portable path, never the compiled kernels; this section does. Per op, dtype (fp32, bf16,
fp16) and shape (odd, production): the forward value and every input gradient, with an
upstream gradient != 1 (1.75, exact in every dtype; 65536 for fp16 losses, GradScaler's
initial scale), judged by selfsup.kernels.testing.assert_lowp_close: error vs float64 within
2x PyTorch's own error in that dtype (the *_ref run on the same rounded inputs) + atol.
The Triton path is forced (SELFSUP_KERNELS=triton), so a silent fallback cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import selfsup.kernels as K
from selfsup.kernels.testing import LOWP_ATOL, assert_lowp_close, fresh_seed, max_abs_err

from .common import Case, Context, kernels_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UPSTREAM = 1.75  # a scalar loss's upstream gradient: != 1, exact in fp16 and bf16
FP16_LOSS_UPSTREAM = 65536.0  # GradScaler's initial scale
# Tensor outputs (gather/scatter) get a random upstream tensor; in fp16 scaled by 2^8, as a
# scaled activation gradient, small enough that d pos_embed's batch sums stay finite.
FP16_TENSOR_SCALE = 256.0


@dataclass
class Inputs:
    """fp32 (or index) arguments of one op call. kinds: "x" is rounded to the dtype under
    test; "x32" is rounded too but handed to our op as fp32 (DINO's fp32 center with lowp
    logits, as training does); "keep" is passed unchanged (indices, masks, numbers)."""

    args: list
    kinds: list[str]
    grad: list[bool]
    kwargs: dict


def _r(*shape, device, scale=1.0):
    return scale * torch.randn(*shape, device=device)


def make_queue(s, d):
    n, c, k, t = s["N"], s["C"], s["K"], s["T"]
    return Inputs([_r(n, c, device=d), _r(n, c, device=d),
                   F.normalize(_r(k, c, device=d), dim=1), t],
                  ["x", "x", "x", "keep"], [True, True, False, False], {})


def make_batch(s, d):
    return Inputs([_r(s["N"], s["C"], device=d), _r(s["M"], s["C"], device=d), s["T"]],
                  ["x", "x", "keep"], [True, True, False], {"positive_offset": s["offset"]})


def make_nt_xent(s, d):
    return Inputs([_r(s["N"], s["C"], device=d), _r(s["N"], s["C"], device=d), s["T"]],
                  ["x", "x", "keep"], [True, True, False], {})


def make_dino(s, d):
    b, v, g, k = s["B"], s["V"], s["G"], s["K"]
    return Inputs([_r(v * b, k, device=d), _r(g * b, k, device=d), _r(1, k, device=d, scale=0.3)],
                  ["x", "x", "x32"], [True, False, False],
                  {"student_temp": s["ts"], "teacher_temp": s["tt"], "n_global": g})


def make_gather(s, d):
    b, length, dim = s["B"], s["L"], s["D"]
    ids_keep, _, _ = K.random_masking(b, length, s["ratio"], device=d)
    return Inputs([_r(b, length, dim, device=d), ids_keep, _r(1, length, dim, device=d)],
                  ["x", "keep", "x"], [True, False, True], {})


def make_scatter(s, d):
    b, length, dim = s["B"], s["L"], s["D"]
    ids_keep, ids_restore, _ = K.random_masking(b, length, s["ratio"], device=d)
    n_vis = 1 + ids_keep.shape[1]  # the cls token leads
    return Inputs([_r(b, n_vis, dim, device=d), ids_restore, _r(1, 1, dim, device=d),
                   _r(1, 1 + length, dim, device=d)],
                  ["x", "keep", "x", "x"], [True, False, True, True], {"n_prefix": 1})


def make_loss(s, d):
    b, c, h, w, p = s["B"], s["C"], s["H"], s["W"], s["p"]
    _, _, mask = K.random_masking(b, (h // p) * (w // p), s["ratio"], device=d)
    return Inputs([_r(b, (h // p) * (w // p), p * p * c, device=d), _r(b, c, h, w, device=d),
                   mask, p], ["x", "x", "keep", "keep"], [True, False, False, False],
                  {"norm_pix": True})


# op name -> (ours, reference, input maker, {shape name: (GPU shape, dry-run shape)})
OPS = {
    "info_nce_queue": (K.info_nce_queue, K.info_nce_queue_ref, make_queue, {
        "odd": (dict(N=37, C=100, K=1000, T=0.04), dict(N=13, C=40, K=100, T=0.04)),
        "prod": (dict(N=256, C=128, K=65536, T=0.2), dict(N=16, C=32, K=256, T=0.2))}),
    "info_nce_batch": (K.info_nce_batch, K.info_nce_batch_ref, make_batch, {
        "odd": (dict(N=37, M=131, C=100, offset=50, T=0.04),
                dict(N=13, M=21, C=40, offset=5, T=0.04)),
        "prod": (dict(N=1024, M=4096, C=256, offset=1024, T=0.2),
                 dict(N=16, M=32, C=32, offset=16, T=0.2))}),
    "nt_xent": (K.nt_xent, K.nt_xent_ref, make_nt_xent, {
        "odd": (dict(N=37, C=100, T=0.04), dict(N=13, C=40, T=0.04)),
        "prod": (dict(N=4096, C=128, T=0.1), dict(N=16, C=32, T=0.1))}),
    "dino_loss": (K.dino_loss, K.dino_loss_ref, make_dino, {
        "odd": (dict(B=3, V=5, G=2, K=1000, ts=0.1, tt=0.04),
                dict(B=2, V=4, G=2, K=50, ts=0.1, tt=0.04)),
        "prod": (dict(B=64, V=12, G=2, K=65536, ts=0.1, tt=0.04),
                 dict(B=4, V=4, G=2, K=256, ts=0.1, tt=0.04))}),
    "gather_tokens": (K.gather_tokens, K.gather_tokens_ref, make_gather, {
        "odd": (dict(B=3, L=37, D=100, ratio=0.75), dict(B=2, L=9, D=20, ratio=0.75)),
        "prod": (dict(B=64, L=196, D=1024, ratio=0.75), dict(B=4, L=16, D=64, ratio=0.75))}),
    "scatter_tokens": (K.scatter_tokens, K.scatter_tokens_ref, make_scatter, {
        "odd": (dict(B=3, L=37, D=100, ratio=0.75), dict(B=2, L=9, D=20, ratio=0.75)),
        "prod": (dict(B=64, L=196, D=512, ratio=0.75), dict(B=4, L=16, D=64, ratio=0.75))}),
    "masked_patch_loss": (K.masked_patch_loss, K.masked_patch_loss_ref, make_loss, {
        "odd": (dict(B=3, C=3, H=32, W=48, p=16, ratio=0.5),
                dict(B=2, C=3, H=16, W=24, p=8, ratio=0.5)),
        "prod": (dict(B=64, C=3, H=224, W=224, p=16, ratio=0.75),
                 dict(B=2, C=3, H=32, W=32, p=8, ratio=0.75))}),
}


# the arguments' names, for the gradient labels ("d q", "d pos_embed", ...)
ARG_NAMES = {
    "info_nce_queue": ("q", "k", "queue", "T"), "info_nce_batch": ("q", "k", "T"),
    "nt_xent": ("z1", "z2", "T"), "dino_loss": ("student_out", "teacher_out", "center"),
    "gather_tokens": ("x", "ids_keep", "pos_embed"),
    "scatter_tokens": ("x_vis", "ids_restore", "mask_token", "pos_embed"),
    "masked_patch_loss": ("pred", "imgs", "mask", "patch_size"),
}


def _cast(inp: Inputs, dtype, which: str) -> list:
    """The arguments as ours / torch-in-dtype / float64 see them (same rounded values)."""
    out = []
    for a, kind in zip(inp.args, inp.kinds, strict=True):
        if kind == "keep" or not torch.is_tensor(a):
            out.append(a)
            continue
        lo = a.to(dtype)
        if which == "64":
            out.append(lo.double())
        elif which == "ours" and kind == "x32":
            out.append(lo.float())
        else:
            out.append(lo)
    return out


def _loss_and_grads(fn, args, inp: Inputs, upstream):
    """[value, *input grads]; `upstream` is a float (scalar outputs) or a tensor (fp32)."""
    leaves = [a.detach().clone().requires_grad_(True) if g else a
              for a, g in zip(args, inp.grad, strict=True)]
    out = fn(*leaves, **inp.kwargs)
    wrt = [x for x, g in zip(leaves, inp.grad, strict=True) if g]
    scale = 1.0
    if torch.is_tensor(upstream):
        up = upstream.to(out.dtype)
    else:
        # A loss in fp16 cannot hold 65536 (max 65504): halve the upstream until it fits and
        # scale the gradients back by that exact power of two (what the rounding sees is the
        # same, bar subnormals).
        u = float(upstream)
        while u > torch.finfo(out.dtype).max:
            u, scale = u / 2, scale * 2
        up = torch.full_like(out, u)
    grads = torch.autograd.grad(out, wrt, up)
    grads = [g.double() * scale if scale != 1.0 else g for g in grads]
    return [out.detach(), *grads]


def _judge(label, ours, ref64, theirs, dtype) -> dict:
    """assert_lowp_close's verdict, with the measured numbers kept for the report."""
    e_ours, e_torch = max_abs_err(ours, ref64), max_abs_err(theirs, ref64)
    note = ""
    if not torch.isfinite(torch.tensor(e_torch)):
        # torch's own low-precision run overflowed: judge against the best the dtype allows
        # (the float64 result rounded to it) instead of an infinite bound.
        theirs = ref64.to(dtype)
        e_torch = max_abs_err(theirs, ref64)
        note = "torch's own run in this dtype was not finite; bound from rounding float64"
    row = {"name": label, "ours": e_ours, "torch": e_torch,
           "bound": 2 * e_torch + LOWP_ATOL[dtype], "ok": True, "note": note}
    try:
        assert_lowp_close(label, ours, ref64, theirs, dtype)
    except AssertionError as e:
        row.update(ok=False, message=str(e))
    return row


def check(ctx: Context, op: str, dtype_name: str, shape_name: str) -> dict:
    ours_fn, ref_fn, make, shapes = OPS[op]
    shape = shapes[shape_name][1 if ctx.dry_run else 0]
    dtype = DTYPES[dtype_name]
    seed = fresh_seed()
    inp = make(shape, ctx.device)
    names = [f"d {n}" for n, g in zip(ARG_NAMES[op], inp.grad, strict=True) if g]
    with torch.no_grad():  # the output's shape and dtype, for a tensor upstream
        probe = ref_fn(*_cast(inp, dtype, "lo"), **inp.kwargs)
    if probe.dim() == 0:
        upstream = FP16_LOSS_UPSTREAM if dtype == torch.float16 else UPSTREAM
    else:
        scale = FP16_TENSOR_SCALE if dtype == torch.float16 else UPSTREAM
        upstream = (scale * torch.randn(probe.shape, device=ctx.device)).to(dtype)
        up_desc = f"randn x {scale:g}"
    del probe
    backoff, overflowed = 1, []
    while True:
        with kernels_backend("triton"):
            ours = _loss_and_grads(ours_fn, _cast(inp, dtype, "ours"), inp, upstream)
        theirs = _loss_and_grads(ref_fn, _cast(inp, dtype, "lo"), inp, upstream)
        bad = [who for who, r in (("ours", ours), ("torch", theirs))
               if not all(bool(torch.isfinite(g).all()) for g in r[1:])]
        overflowed = overflowed or bad
        if not bad or torch.is_tensor(upstream) or dtype != torch.float16 or backoff >= 2**12:
            break
        # GradScaler's back-off: a scaled gradient that overflows fp16 (tiny batches at
        # T=0.04 do) makes training halve the scale and retry; so do we.
        upstream, backoff = upstream / 2, backoff * 2
    if not torch.is_tensor(upstream):
        up_desc = f"{upstream:g}" + (f" (GradScaler back-off from {upstream * backoff:g}: "
                                     f"non-finite {' and '.join(overflowed)} gradients above)"
                                     if backoff > 1 else "")
    ref64 = _loss_and_grads(ref_fn, _cast(inp, dtype, "64"), inp,
                            upstream.double() if torch.is_tensor(upstream) else upstream)
    labels = ["value", *names]
    checks = [_judge(lb, a, b, c, dtype)
              for lb, a, b, c in zip(labels, ours, ref64, theirs, strict=True)]
    ok = all(c["ok"] for c in checks)
    return {"status": "pass" if ok else "fail", "op": op, "dtype": dtype_name,
            "shape_name": shape_name, "shape": _shape_text(shape), "upstream": up_desc,
            "seed": seed, "checks": checks}


def warm(ctx: Context, op: str, dtype_name: str, shape_name: str) -> None:
    """Run only our op, forward and backward, so Triton compiles (and caches) its kernels."""
    ours_fn, _, make, shapes = OPS[op]
    inp = make(shapes[shape_name][1 if ctx.dry_run else 0], ctx.device)
    args = _cast(inp, DTYPES[dtype_name], "ours")
    with kernels_backend("triton"):
        out = ours_fn(*args, **inp.kwargs)  # the output's shape, for a tensor upstream
        up = UPSTREAM if out.dim() == 0 else torch.randn_like(out)
        _loss_and_grads(ours_fn, args, inp, up)


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def warm_tasks() -> list[tuple]:
    """Every (op, dtype, shape) of this section, for the parallel compile warm-up."""
    return [(op, dt, sh) for sh in ("odd", "prod") for op in OPS for dt in DTYPES]


def cases(ctx: Context, warm_up: Case | None = None) -> list[Case]:
    checks = [Case(f"{op}/{dt}/{sh}", lambda op=op, dt=dt, sh=sh: check(ctx, op, dt, sh),
                   timeout=120.0, min_s=2.0, meta={"op": op, "dtype": dt, "shape_name": sh})
              for op, dt, sh in warm_tasks()]
    return ([warm_up] if warm_up is not None else []) + checks
