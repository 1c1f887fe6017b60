"""MAE kernels vs the paper-style references: random masking, token gather/scatter, the loss.

Float64 comparisons run on both fused paths ("torch" portable, "triton" through the
interpreter on CPU) with fresh random inputs, every input gradient and an upstream gradient
that is not 1. Interpreter shapes stay small (L=50, D=72).
"""

import pytest
import torch

from selfsup.kernels import mae as M
from selfsup.kernels._triton import HAS_TRITON
from selfsup.kernels.testing import TOL64, assert_lowp_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))]
RATIOS = [0.0, 0.5, 0.75, 0.9]
B, L, D = 3, 50, 72
# (patch, channels, H, W): 28x28 grey (small-image MAE), ViT /16 and /14 on 3 channels,
# with non-square grids so rows and columns cannot be confused
IMAGES = [(4, 1, 28, 28), (16, 3, 32, 48), (14, 3, 42, 28)]


def official_random_masking(noise, mask_ratio):
    """models_mae.py `random_masking`, index part, written out independently."""
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([n, length], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def grads(out, inputs, upstream):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, upstream)


def assert_all_close(ours, ref, **tol):
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **(tol or TOL64))


# ---------------------------------------------------------------------------- random masking
@pytest.mark.parametrize("ratio", RATIOS + [0.6])
def test_random_masking_is_the_official_algorithm(seed, ratio):
    noise = torch.rand(4, 49, dtype=torch.float64)
    ids_keep, ids_restore, mask = M.random_masking(4, 49, ratio, noise=noise)
    ok, orr, om = official_random_masking(noise, ratio)
    assert torch.equal(ids_keep, ok) and torch.equal(ids_restore, orr) and torch.equal(mask, om)
    assert mask.dtype == torch.float32 and ids_keep.shape == (4, int(49 * (1 - ratio)))
    # the removed count per row, and the kept ids are exactly the unmasked positions
    assert (mask.sum(1) == 49 - ids_keep.shape[1]).all()
    assert (mask.gather(1, ids_keep) == 0).all()


def test_random_masking_generator_is_reproducible():
    run = [M.random_masking(2, 20, 0.75, generator=torch.Generator().manual_seed(7))
           for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*run, strict=True))
    ids_keep, ids_restore, _ = run[0]
    assert torch.equal(ids_restore.argsort(1)[:, :5], ids_keep)


# ---------------------------------------------------------------------------- gather
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_gather_tokens_float64(seed, backend, backend_name, ratio):
    backend(backend_name)
    ids_keep, _, _ = M.random_masking(B, L, ratio)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, L, D, dtype=torch.float64, requires_grad=True)
    out, ref = M.gather_tokens(x, ids_keep, pos), M.gather_tokens_ref(x, ids_keep, pos)
    torch.testing.assert_close(out, ref, **TOL64)
    g = torch.randn_like(ref)
    ours, theirs = grads(out, (x, pos), g), grads(ref, (x, pos), g)
    assert_all_close(ours, theirs)
    dropped = torch.ones(B, L, dtype=torch.bool).scatter_(1, ids_keep, False)
    assert (ours[0][dropped] == 0).all()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gather_tokens_layouts_and_int32_ids(seed, backend, backend_name):
    """x as patch_embed returns it (transposed, (B, D, L) memory), pos as a view of a cls
    table, int32 ids, no pos."""
    backend(backend_name)
    ids_keep, _, _ = M.random_masking(B, L, 0.75)
    x = torch.randn(B, D, L, dtype=torch.float64).transpose(1, 2).requires_grad_()
    table = torch.randn(1, 1 + L, D, dtype=torch.float64, requires_grad=True)
    out = M.gather_tokens(x, ids_keep.int(), table[:, 1:])
    ref = M.gather_tokens_ref(x, ids_keep, table[:, 1:])
    torch.testing.assert_close(out, ref, **TOL64)
    g = torch.randn_like(ref)
    assert_all_close(grads(out, (x, table), g), grads(ref, (x, table), g))
    out = M.gather_tokens(x, ids_keep)
    torch.testing.assert_close(out, M.gather_tokens_ref(x, ids_keep), **TOL64)
    (dx,) = grads(out, (x,), g)
    torch.testing.assert_close(dx, grads(M.gather_tokens_ref(x, ids_keep), (x,), g)[0], **TOL64)


# ---------------------------------------------------------------------------- scatter
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("n_prefix", [0, 1])
def test_scatter_tokens_float64(seed, backend, backend_name, ratio, n_prefix):
    backend(backend_name)
    _, ids_restore, _ = M.random_masking(B, L, ratio)
    lk = int(L * (1 - ratio))
    x = torch.randn(B, n_prefix + lk, D, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, n_prefix + L, D, dtype=torch.float64, requires_grad=True)
    out = M.scatter_tokens(x, ids_restore, tok, pos, n_prefix=n_prefix)
    ref = M.scatter_tokens_ref(x, ids_restore, tok, pos, n_prefix=n_prefix)
    torch.testing.assert_close(out, ref, **TOL64)
    g = torch.randn_like(ref)
    # d mask_token sums up to B·L rows: compare at a tolerance scaled to that sum
    assert_all_close(grads(out, (x, tok, pos), g), grads(ref, (x, tok, pos), g),
                     rtol=1e-7, atol=1e-9 * B * L)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_scatter_tokens_flat_mask_token_no_pos_int32(seed, backend, backend_name):
    backend(backend_name)
    _, ids_restore, _ = M.random_masking(B, L, 0.75)
    x = torch.randn(B, 1 + 12, D, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(D, dtype=torch.float64, requires_grad=True)
    out = M.scatter_tokens(x, ids_restore.int(), tok)
    ref = M.scatter_tokens_ref(x, ids_restore, tok)
    torch.testing.assert_close(out, ref, **TOL64)
    g = torch.randn_like(ref)
    ours, theirs = grads(out, (x, tok), g), grads(ref, (x, tok), g)
    assert ours[1].shape == (D,)
    assert_all_close(ours, theirs, rtol=1e-7, atol=1e-9 * B * L)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_deterministic_option_equals_atomics(seed, backend, backend_name, op):
    backend(backend_name)
    ids_keep, ids_restore, _ = M.random_masking(B, L, 0.75)
    lk = ids_keep.shape[1]
    if op == "gather":
        inputs = (torch.randn(B, L, D, requires_grad=True),
                  torch.randn(1, L, D, requires_grad=True))

        def f(det):
            return M.gather_tokens(inputs[0], ids_keep, inputs[1], deterministic=det)
    else:
        inputs = (torch.randn(B, 1 + lk, D, requires_grad=True),
                  torch.randn(1, 1, D, requires_grad=True),
                  torch.randn(1, 1 + L, D, requires_grad=True))

        def f(det):
            return M.scatter_tokens(inputs[0], ids_restore, inputs[1], inputs[2],
                                    deterministic=det)
    g = torch.randn_like(f(False))
    atomics, det1, det2 = (grads(f(d), inputs, g) for d in (False, True, True))
    assert_all_close(det1, atomics, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(det1, det2, strict=True))  # bitwise run to run


# ---------------------------------------------------------------------------- loss
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("image", IMAGES, ids=lambda s: "p{}c{}_{}x{}".format(*s))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_float64(seed, backend, backend_name, image, norm_pix):
    backend(backend_name)
    p, c, h, w = image
    length = (h // p) * (w // p)
    imgs = torch.randn(B, c, h, w, dtype=torch.float64) * 2 + 0.5
    pred = torch.randn(B, length, p * p * c, dtype=torch.float64, requires_grad=True)
    for ratio in RATIOS:  # fresh mask (noise) each time
        _, _, mask = M.random_masking(B, length, ratio)
        loss = M.masked_patch_loss(pred, imgs, mask, p, norm_pix=norm_pix)
        ref = M.masked_patch_loss_ref(pred, imgs, mask, p, norm_pix=norm_pix)
        torch.testing.assert_close(loss, ref, **TOL64)
        up = torch.randn((), dtype=torch.float64)
        (ours,), (theirs,) = grads(loss, (pred,), up), grads(ref, (pred,), up)
        torch.testing.assert_close(ours, theirs, **TOL64)
        assert (ours[mask == 0] == 0).all()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_masked_patch_loss_strided_inputs_and_bool_mask(seed, backend, backend_name):
    """pred as the decoder returns it (`[:, 1:]` of a cls-prefixed tensor), channels-last
    images, a bool mask; and no gradient work under no_grad."""
    backend(backend_name)
    p, c, h, w = 16, 3, 32, 48
    length = 6
    imgs = torch.randn(B, c, h, w, dtype=torch.float64).to(memory_format=torch.channels_last)
    full = torch.randn(B, 1 + length, p * p * c, dtype=torch.float64, requires_grad=True)
    pred = full[:, 1:]
    _, _, mask = M.random_masking(B, length, 0.5)
    loss = M.masked_patch_loss(pred, imgs, mask.bool(), p)
    ref = M.masked_patch_loss_ref(pred, imgs, mask, p)
    torch.testing.assert_close(loss, ref, **TOL64)
    torch.testing.assert_close(grads(loss * 1.7, (full,), None)[0],
                               grads(ref * 1.7, (full,), None)[0], **TOL64)
    with torch.no_grad():
        torch.testing.assert_close(M.masked_patch_loss(pred, imgs, mask, p), ref.detach(),
                                   **TOL64)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gradcheck_tiny(seed, backend, backend_name):
    backend(backend_name)
    # fast_mode: a few random projections instead of one forward per input element (the
    # interpreter launches a kernel per forward)
    ids_keep, ids_restore, mask = M.random_masking(2, 8, 0.5)
    x = torch.randn(2, 8, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: M.gather_tokens(a, ids_keep, b), (x, pos),
                                    fast_mode=True)
    xv = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(1, 1, 5, dtype=torch.float64, requires_grad=True)
    pe = torch.randn(1, 9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: M.scatter_tokens(a, ids_restore, b, c),
                                    (xv, tok, pe), fast_mode=True)
    imgs = torch.randn(2, 1, 8, 16, dtype=torch.float64)
    pred = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: M.masked_patch_loss(a, imgs, mask, 4), (pred,),
                                    fast_mode=True)


# ---------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(seed, backend, backend_name, dtype):
    backend(backend_name)
    ids_keep, ids_restore, _ = M.random_masking(B, L, 0.75)
    lk = ids_keep.shape[1]

    def check(name, fn, ref_fn, inputs):
        lo = [t.to(dtype).requires_grad_() for t in inputs]
        hi = [t.detach().double().requires_grad_() for t in lo]  # the same rounded values
        ours, ref64, ref_lo = fn(*lo), ref_fn(*hi), ref_fn(*lo)
        assert ours.dtype == ref_lo.dtype
        assert_lowp_close(name, ours, ref64, ref_lo, dtype)
        g = torch.randn_like(ref64).to(ref_lo.dtype)
        for i, (a, b, c) in enumerate(zip(grads(ours, lo, g), grads(ref64, hi, g.double()),
                                          grads(ref_lo, lo, g), strict=True)):
            assert a.dtype == dtype
            assert_lowp_close(f"{name} grad {i}", a, b, c, dtype)

    check("gather", lambda x, p: M.gather_tokens(x, ids_keep, p),
          lambda x, p: M.gather_tokens_ref(x, ids_keep, p),
          [torch.randn(B, L, D), torch.randn(1, L, D)])
    check("scatter", lambda x, t, p: M.scatter_tokens(x, ids_restore, t, p),
          lambda x, t, p: M.scatter_tokens_ref(x, ids_restore, t, p),
          [torch.randn(B, 1 + lk, D), torch.randn(1, 1, D), torch.randn(1, 1 + L, D)])
    p, c, h, w = 16, 3, 32, 48
    _, _, mask = M.random_masking(B, 6, 0.75)
    imgs = torch.randn(B, c, h, w).to(dtype)
    check("loss", lambda a: M.masked_patch_loss(a, imgs, mask, p),
          lambda a: M.masked_patch_loss_ref(a, imgs.to(a.dtype), mask, p),
          [torch.randn(B, 6, p * p * c)])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_autocast_mixed_dtypes_promote_like_torch(seed, backend, backend_name):
    """bf16 activations with fp32 pos_embed / mask_token / images (autocast training).

    bf16 gradients are compared at bf16 resolution: the interpreter truncates fp32 -> bf16
    stores where a GPU rounds to nearest (PLATFORM.md)."""
    backend(backend_name)
    bf16 = dict(rtol=1e-2, atol=1e-5)
    ids_keep, ids_restore, mask = M.random_masking(B, L, 0.75)
    x = torch.randn(B, L, D).bfloat16().requires_grad_()
    pos = torch.randn(1, L, D, requires_grad=True)
    out, ref = M.gather_tokens(x, ids_keep, pos), M.gather_tokens_ref(x, ids_keep, pos)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    (dx, dpos), (rx, rpos) = grads(out, (x, pos), g), grads(ref, (x, pos), g)
    torch.testing.assert_close(dx, rx, **bf16)
    torch.testing.assert_close(dpos, rpos, rtol=1e-5, atol=1e-5)
    xv = torch.randn(B, 1 + ids_keep.shape[1], D).bfloat16().requires_grad_()
    tok = torch.randn(1, 1, D, requires_grad=True)
    out, ref = (f(xv, ids_restore, tok, pos=torch.zeros(1, 1 + L, D))
                for f in (lambda *a, pos: M.scatter_tokens(*a, pos),
                          lambda *a, pos: M.scatter_tokens_ref(*a, pos)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    (dx, dtok), (rx, rtok) = grads(out, (xv, tok), g), grads(ref, (xv, tok), g)
    torch.testing.assert_close(dx, rx, **bf16)
    torch.testing.assert_close(dtok, rtok, rtol=1e-5, atol=1e-4)
    imgs = torch.randn(B, 3, 32, 48)
    _, _, mask = M.random_masking(B, 6, 0.75)
    pred = torch.randn(B, 6, 768).bfloat16().requires_grad_()
    loss, ref = M.masked_patch_loss(pred, imgs, mask, 16), M.masked_patch_loss_ref(pred, imgs,
                                                                                   mask, 16)
    torch.testing.assert_close(loss, ref)
    ours, theirs = grads(loss, (pred,), None)[0], grads(ref, (pred,), None)[0]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=1e-6)


# ---------------------------------------------------------------------------- patchify
@pytest.mark.parametrize("image", IMAGES, ids=lambda s: "p{}c{}_{}x{}".format(*s))
def test_patchify_order_and_roundtrip(seed, image):
    p, c, h, w = image
    imgs = torch.randn(2, c, h, w)
    x = M.patchify(imgs, p)
    gw = w // p
    b, l_, i, j, ch = 1, (h // p - 1) * gw + 1, p - 1, 2, c - 1  # some patch and pixel
    assert x[b, l_, (i * p + j) * c + ch] == imgs[b, ch, (l_ // gw) * p + i, (l_ % gw) * p + j]
    assert torch.equal(M.unpatchify(x, p, image_size=(h, w)), imgs)
    if h == w:
        assert torch.equal(M.unpatchify(x, p), imgs)


# ---------------------------------------------------------------------------- validation
def test_validation_errors_name_the_argument():
    ids_keep, ids_restore, mask = M.random_masking(2, 8, 0.5)
    x, pos = torch.randn(2, 8, 4), torch.randn(1, 8, 4)
    raises = [
        ("mask_ratio", lambda: M.random_masking(2, 8, 1.0)),
        ("mask_ratio", lambda: M.random_masking(2, 8, -0.1)),
        ("mask_ratio", lambda: M.random_masking(2, 8, float("nan"))),
        ("noise", lambda: M.random_masking(2, 8, 0.5, noise=torch.rand(2, 9))),
        ("noise", lambda: M.random_masking(2, 8, 0.5, noise=torch.rand(16))),
        ("batch", lambda: M.random_masking(0, 8, 0.5)),
        ("length", lambda: M.random_masking(2, 8.0, 0.5)),
        ("x", lambda: M.gather_tokens(torch.randn(2, 8), ids_keep)),
        ("x", lambda: M.gather_tokens(x.long(), ids_keep)),
        ("ids_keep", lambda: M.gather_tokens(x, ids_keep.float())),
        ("ids_keep", lambda: M.gather_tokens(x, ids_keep[:1])),
        ("ids_keep", lambda: M.gather_tokens(x, ids_keep + 8)),
        ("ids_keep", lambda: M.gather_tokens(x, torch.zeros(2, 9, dtype=torch.long))),
        ("pos_embed", lambda: M.gather_tokens(x, ids_keep, torch.randn(1, 7, 4))),
        ("pos_embed", lambda: M.gather_tokens(x, ids_keep, pos.int())),
        ("device", lambda: M.gather_tokens(x, ids_keep, pos.to("meta"))),
        ("x_vis", lambda: M.scatter_tokens(torch.randn(2, 5), ids_restore, pos[0, 0])),
        ("ids_restore", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore[:, :3],
                                                 pos[0, 0])),
        ("ids_restore", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore - 1,
                                                 pos[0, 0])),
        ("ids_restore", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore.double(),
                                                 pos[0, 0])),
        ("mask_token", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore,
                                                torch.randn(5))),
        ("pos_embed", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore, pos[0, 0],
                                               pos)),
        ("n_prefix", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore, pos[0, 0],
                                              n_prefix=-1)),
        ("device", lambda: M.scatter_tokens(torch.randn(2, 5, 4), ids_restore,
                                            pos[0, 0].to("meta"))),
    ]
    imgs, pred = torch.randn(2, 3, 32, 48), torch.randn(2, 6, 768)
    m6 = torch.ones(2, 6)
    raises += [
        ("patch_size", lambda: M.masked_patch_loss(pred, imgs, m6, 10)),
        ("patch_size", lambda: M.masked_patch_loss(pred, imgs, m6, 0)),
        ("pred.s last dim", lambda: M.masked_patch_loss(torch.randn(2, 6, 700), imgs, m6, 16)),
        ("pred", lambda: M.masked_patch_loss(torch.randn(2, 5, 768), imgs, m6, 16)),
        ("pred", lambda: M.masked_patch_loss(pred.long(), imgs, m6, 16)),
        ("imgs", lambda: M.masked_patch_loss(pred, imgs[0], m6, 16)),
        ("imgs", lambda: M.masked_patch_loss(pred, imgs.to(torch.uint8), m6, 16)),
        ("mask", lambda: M.masked_patch_loss(pred, imgs, torch.ones(2, 5), 16)),
        ("device", lambda: M.masked_patch_loss(pred, imgs, m6.to("meta"), 16)),
        ("patch_size", lambda: M.patchify(imgs, 5)),
        ("patch_size", lambda: M.unpatchify(pred, 5)),
    ]
    for arg, fn in raises:
        with pytest.raises(ValueError, match=arg):
            fn()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_masked_patch_loss_repeated_backward(seed, backend, backend_name):
    """Every backward through a retained graph is right, even after an upstream gradient of 0,
    and never changes an earlier result: the first scales the saved gradient in place (CPU),
    later ones scale it by the ratio into a fresh tensor (`_custom_op.scaled_grad_buffer`)."""
    backend(backend_name)
    _, _, mask = M.random_masking(B, 6, 0.5)
    imgs = torch.randn(B, 3, 32, 48, dtype=torch.float64)
    pred = torch.randn(B, 6, 768, dtype=torch.float64, requires_grad=True)
    loss = M.masked_patch_loss(pred, imgs, mask, 16)
    (ref,) = grads(M.masked_patch_loss_ref(pred, imgs, mask, 16), (pred,), None)
    out = []
    for up in (1.7, -0.3, 2.5):
        (g,) = torch.autograd.grad(loss, pred, torch.tensor(up, dtype=torch.float64),
                                   retain_graph=True)
        out.append((g, g.clone(), up))
    for g, first_value, up in out:
        torch.testing.assert_close(g, ref * up, **TOL64)
        assert torch.equal(g, first_value)  # a later backward left it alone
    loss = M.masked_patch_loss(pred, imgs, mask, 16)
    torch.autograd.grad(loss, pred, torch.tensor(0.0, dtype=torch.float64), retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(loss, pred)[0], ref, **TOL64)
