"""MAE token kernels at shapes that cross every tile edge, in the layouts the model gives them.

The gather walks x along L in tiles of BLOCK_L patches (x as PatchEmbed returns it, (B, D, L)
in memory, or row-major), D in BLOCK_D chunks; the scatter backward walks GROUP_ROWS rows per
program. L=70 and T=151 cross those tiles, D=200 crosses two column chunks. Float64 against
the references, every input gradient, upstream gradient != 1, both reductions of d pos_embed
(atomics and the fixed-order sum). Also: no contended or ordered atomics in the kernel source,
and the id checks read nothing back from a non-CPU tensor.
"""

import inspect
import re

import pytest
import torch

from selfsup.kernels import mae as M
from selfsup.kernels._triton import HAS_TRITON
from selfsup.kernels.testing import TOL64

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))]
B, D = 2, 200


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], upstream)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", ["patch_embed", "rows"])
@pytest.mark.parametrize("det", [False, True])
def test_gather_across_tiles(seed, backend, backend_name, layout, det):
    backend(backend_name)
    length = 70
    ids_keep, _, _ = M.random_masking(B, length, 0.75)
    if layout == "patch_embed":  # conv(x).flatten(2).transpose(1, 2): strides (L*D, 1, L)
        x = torch.randn(B, D, length, dtype=torch.float64).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(B, length, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, length, D, dtype=torch.float64, requires_grad=True)
    out = M.gather_tokens(x, ids_keep, pos, deterministic=det)
    ref = M.gather_tokens_ref(x, ids_keep, pos)
    torch.testing.assert_close(out, ref, **TOL64)
    g = torch.randn_like(ref) * 3.0
    for a, b in zip(grads(out, (x, pos), g), grads(ref, (x, pos), g), strict=True):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("det", [False, True])
def test_gather_backward_writes_dx_in_the_input_layout(seed, det):
    # the conv's backward then gets the layout it produced: no transposing copy
    from selfsup.kernels.mae import _launch

    length = 70
    ids_keep, _, _ = M.random_masking(B, length, 0.75)
    x = torch.randn(B, D, length, dtype=torch.float64).transpose(1, 2)
    g = torch.randn(B, ids_keep.shape[1], D, dtype=torch.float64)
    assert _launch.x_is_dl(x)
    dx, _ = _launch.gather_tokens_bwd(g, ids_keep, x.shape, x.dtype, torch.float64, True, det,
                                      True)
    assert dx.stride() == x.stride()
    ref = torch.zeros_like(x).scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), g)
    torch.testing.assert_close(dx, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n_prefix", [0, 1])
@pytest.mark.parametrize("det", [False, True])
def test_scatter_across_row_groups(seed, backend, backend_name, n_prefix, det):
    backend(backend_name)
    length = 150
    ids_keep, ids_restore, _ = M.random_masking(B, length, 0.75)
    x = torch.randn(B, n_prefix + ids_keep.shape[1], D, dtype=torch.float64,
                    requires_grad=True)
    tok = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, n_prefix + length, D, dtype=torch.float64, requires_grad=True)
    out = M.scatter_tokens(x, ids_restore, tok, pos, n_prefix=n_prefix, deterministic=det)
    ref = M.scatter_tokens_ref(x, ids_restore, tok, pos, n_prefix=n_prefix)
    torch.testing.assert_close(out, ref, **TOL64)
    g = torch.randn_like(ref) * 0.5
    for a, b in zip(grads(out, (x, tok, pos), g), grads(ref, (x, tok, pos), g), strict=True):
        torch.testing.assert_close(a, b, **TOL64)
    # and without a pos gradient (the decoder's fixed table): no atomics at all
    out = M.scatter_tokens(x, ids_restore, tok, pos.detach(), n_prefix=n_prefix)
    ref = M.scatter_tokens_ref(x, ids_restore, tok, pos.detach(), n_prefix=n_prefix)
    for a, b in zip(grads(out, (x, tok), g), grads(ref, (x, tok), g), strict=True):
        torch.testing.assert_close(a, b, **TOL64)


def test_atomics_are_relaxed_and_never_on_the_mask_token():
    """Static: every atomic in the MAE kernels is `sem="relaxed"` and targets d pos_embed
    (<= B adds per element); the mask-token gradient goes through per-program partial rows."""
    from selfsup.kernels.mae import _kernels

    src = inspect.getsource(_kernels)
    calls = re.findall(r"tl\.atomic_\w+\(([^()]*(?:\([^()]*\)[^()]*)*)\)", src)
    assert calls, "the pattern must see the atomics that exist"
    for args in calls:
        assert 'sem="relaxed"' in args, args
        assert args.lstrip().startswith("dp"), f"atomic on something other than dpos: {args}"


def test_id_checks_read_nothing_back_from_a_device_tensor():
    """A meta tensor has no data: any host read (.item(), int(), min/max) would raise. CPU ids
    are range-checked (the bad-input tests); device ids are trusted, never synchronized on."""
    from selfsup.kernels.mae import _checks

    ids = torch.empty(2, 5, dtype=torch.long, device="meta")
    _checks._check_ids("ids_keep", ids, 2, max_cols=8, upper=8)
    with pytest.raises(ValueError, match="ids_keep values must lie in"):
        _checks._check_ids("ids_keep", torch.full((2, 5), 9), 2, max_cols=8, upper=8)
