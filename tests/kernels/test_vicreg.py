"""VICReg loss: portable and Triton paths against the paper's formula (covariances materialised).

Shared checks (shapes, tolerances, why) in _pair_losses.py.
"""

import pytest
import torch

from _pair_losses import (SHAPES, check_bad_input, check_chunked_direct_route, check_gradcheck,
                          check_lowp, check_matches_ref, views)
from selfsup.kernels import vicreg_loss, vicreg_loss_ref

PATHS = ["torch", "triton"]
WEIGHTS = [dict(sim=25.0, var=25.0, cov=1.0), dict(sim=0.0, var=3.0, cov=0.5),
           dict(sim=1.0, var=0.0, cov=0.0)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("w", WEIGHTS)
def test_matches_ref_float64(monkeypatch, path, n, d, w):
    check_matches_ref(monkeypatch, vicreg_loss, vicreg_loss_ref, path, n, d, **w)


def test_hinge_active_and_inactive_features(monkeypatch):
    """Half the features with std < 1 (hinge on), half > 1 (off): both sides of the kink."""
    z1, z2 = views(33, 40)
    with torch.no_grad():
        z1[:, :20] *= 0.1
        z2[:, 20:] *= 0.05
    for path in PATHS:
        monkeypatch.setenv("SELFSUP_KERNELS", path)
        l0 = vicreg_loss_ref(z1, z2)
        l1 = vicreg_loss(z1, z2)
        g0 = torch.autograd.grad(l0 * 3.0, (z1, z2))
        g1 = torch.autograd.grad(l1 * 3.0, (z1, z2))
        torch.testing.assert_close(l1, l0, rtol=1e-7, atol=1e-9)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_chunked_direct_route(monkeypatch):
    check_chunked_direct_route(monkeypatch, vicreg_loss, vicreg_loss_ref, sim=2.0, var=3.0, cov=4.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", [(5, 12), (9, 4)])
def test_gradcheck(monkeypatch, path, n, d):
    check_gradcheck(monkeypatch, vicreg_loss, path, n, d, sim=2.0, var=3.0, cov=4.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(70, 151), (130, 33)])
def test_lowp_gradients_keep_gradscaler_scale(monkeypatch, path, dtype, n, d):
    check_lowp(monkeypatch, vicreg_loss, vicreg_loss_ref, path, dtype, n, d)


def test_bad_input_raises_naming_the_argument():
    check_bad_input(vicreg_loss, "vicreg_loss", ["sim", "var", "cov"])
