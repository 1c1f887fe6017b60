"""Barlow Twins loss: portable and Triton paths against the paper's formula (C materialised).

Shared checks (shapes, tolerances, why) in _pair_losses.py.
"""

import pytest
import torch

from _pair_losses import (SHAPES, check_bad_input, check_chunked_direct_route, check_gradcheck,
                          check_lowp, check_matches_ref, views)
from selfsup.kernels import barlow_twins_loss, barlow_twins_loss_ref
from selfsup.kernels.testing import TOL64

PATHS = ["torch", "triton"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("lambd", [0.0051, 0.7, 0.0])
def test_matches_ref_float64(monkeypatch, path, n, d, lambd):
    check_matches_ref(monkeypatch, barlow_twins_loss, barlow_twins_loss_ref, path, n, d,
                      lambd=lambd)


def test_chunked_direct_route(monkeypatch):
    check_chunked_direct_route(monkeypatch, barlow_twins_loss, barlow_twins_loss_ref, lambd=0.3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", [(5, 12), (9, 4)])
def test_gradcheck(monkeypatch, path, n, d):
    check_gradcheck(monkeypatch, barlow_twins_loss, path, n, d, lambd=0.4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(70, 151), (130, 33)])
def test_lowp_gradients_keep_gradscaler_scale(monkeypatch, path, dtype, n, d):
    check_lowp(monkeypatch, barlow_twins_loss, barlow_twins_loss_ref, path, dtype, n, d,
               lambd=0.0051)


def test_bad_input_raises_naming_the_argument():
    check_bad_input(barlow_twins_loss, "barlow_twins_loss", ["lambd"])


def test_identical_whitened_views_cost_only_the_eps():
    """Identical views with decorrelated, centred features (QR of a centred batch): C = I up
    to BatchNorm's eps, so the loss is ~0; redundant features (every column equal: every
    C_ij = 1) cost lambd * D (D - 1)."""
    z, _ = views(16, 8)
    q, _ = torch.linalg.qr((z - z.mean(0)).detach())
    assert barlow_twins_loss(q, q, lambd=1.0).item() < 1e-6
    same = z[:, :1].expand(16, 8).detach()
    torch.testing.assert_close(barlow_twins_loss(same, same, lambd=0.5).double(),
                               barlow_twins_loss_ref(same, same, lambd=0.5), **TOL64)
    assert abs(barlow_twins_loss(same, same, lambd=0.5).item() - 0.5 * 8 * 7) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_launch_is_registered(monkeypatch, dtype):
    """The Gram sweep's launches (both losses) match a registered, compiled configuration."""
    from launch_recorder import LaunchRecorder

    from selfsup.kernels import vicreg_loss

    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    z1, z2 = views(20, 40, dtype)
    with LaunchRecorder() as rec:
        barlow_twins_loss(z1, z2).backward()
        vicreg_loss(z1, z2).backward()
    assert rec.launches  # distinct launch signatures: both losses share one here
    assert not rec.unregistered(), [x.describe() for x in rec.unregistered()]
