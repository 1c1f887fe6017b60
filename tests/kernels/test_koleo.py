"""KoLeo loss: chunked path vs the B x B float64 reference, coinciding rows, low precision."""

from __future__ import annotations

import pytest
import torch

from selfsup.kernels import koleo as K
from selfsup.kernels.koleo import koleo_loss, koleo_loss_ref
from selfsup.kernels.testing import TOL64, assert_lowp_close, fresh_seed


@pytest.mark.parametrize("b,d", [(2, 3), (3, 5), (17, 33), (64, 7)])
def test_float64_matches_ref_value_and_grad(b, d):
    seed = fresh_seed()
    x = torch.randn(b, d, dtype=torch.float64) * 3.0
    g = 0.37  # upstream gradient != 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = koleo_loss(xa), koleo_loss_ref(xb)
    (la * g).backward()
    (lb * g).backward()
    torch.testing.assert_close(la, lb, **TOL64, msg=f"seed {seed}")
    torch.testing.assert_close(xa.grad, xb.grad, **TOL64, msg=f"seed {seed}")


def test_formula_by_hand():
    # unit rows: e1, e2, and one 10 degrees from e1 -> nearest distances known in closed form
    a = torch.tensor(0.1745329252, dtype=torch.float64)
    x = torch.stack([torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]),
                     torch.tensor([a.cos(), a.sin(), 0.0]) * 5]).double()
    small = 2 * torch.sin(a / 2)  # chord between e1 and the tilted row
    rho = torch.stack([small, torch.sqrt(2 - 2 * torch.sin(a)), small])
    torch.testing.assert_close(koleo_loss(x, eps=1e-8), -torch.log(rho + 1e-8).mean())


def test_chunked_search_matches_unchunked(monkeypatch):
    fresh_seed()
    x = torch.randn(37, 9, dtype=torch.float64)
    full = koleo_loss(x)
    monkeypatch.setattr(K, "_CHUNK_ELEMS", 37 * 4)  # 4 rows per chunk, last chunk ragged
    torch.testing.assert_close(koleo_loss(x), full, **TOL64)


@pytest.mark.parametrize("b", [2, 3, 8])
def test_coinciding_rows_finite(b):
    fresh_seed()
    x = torch.randn(b, 6, dtype=torch.float64)
    x[1] = x[0] * 2.5  # same direction: identical after normalisation
    x.requires_grad_()
    loss = koleo_loss(x, eps=1e-8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() >= -torch.log(torch.tensor(1e-8)).item() / b - 1e-6  # the eps floor
    if b == 2:  # both rows see distance 0
        torch.testing.assert_close(loss, -torch.log(torch.tensor(1e-8, dtype=torch.float64)))


def test_all_rows_equal_float32_finite():
    x = torch.ones(4, 5, requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_upstream_65536(dtype):
    fresh_seed()
    x64 = torch.randn(48, 24, dtype=torch.float64)
    x = x64.to(dtype)
    xr = x.double().requires_grad_()  # the reference on the very same (rounded) inputs
    ref = koleo_loss_ref(xr)
    (ref * 65536).backward()
    xl = x.clone().requires_grad_()
    torch_lowp = koleo_loss_ref(xl)
    torch_lowp.backward()  # at 65536 torch's fp16 gradient overflows to inf/NaN; ours must not
    xo = x.clone().requires_grad_()
    out = koleo_loss(xo)
    (out * 65536).backward()
    assert out.dtype == torch.float32 and xo.grad.dtype == dtype
    assert torch.isfinite(xo.grad).all()
    assert_lowp_close("value", out, ref, torch_lowp, dtype)
    # gradients at 65536 scale: judge relative to their magnitude
    scale = xr.grad.abs().max().item()
    assert_lowp_close("grad", xo.grad / scale, xr.grad / scale, xl.grad.double() * 65536 / scale, dtype)


@pytest.mark.parametrize("bad", [torch.randn(4), torch.randn(2, 3, 4), torch.randn(1, 8),
                                 torch.ones(4, 3, dtype=torch.long)])
def test_bad_input_names_x(bad):
    with pytest.raises(ValueError, match=r"\bx\b"):
        koleo_loss(bad)
    with pytest.raises(ValueError, match=r"\bx\b"):
        koleo_loss_ref(bad)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        koleo_loss(torch.randn(3, 4), eps=0.0)


def test_autocast_does_not_change_the_neighbour_search():
    fresh_seed()
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = koleo_loss(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, koleo_loss_ref(x.double()).float(), rtol=1e-5, atol=1e-5)
