"""resnet_tiny's gradients under CPU bf16 autocast on the 16-px crops SwAV's local views use.

Behind the ImageNet stem a 16-px crop reaches layer4 at 1 x 1, where oneDNN's bf16 weight
gradient of the 3x3 stride-2 conv left its 8 off-centre taps (which meet only padding, so
their gradient is exactly 0) uninitialised: inf / NaN / 1e30 at random (torch 2.13, Zen 4
AVX512-BF16), the non-finite SwAV loss of docs/quality.md. models.resnet.Conv3x3 runs a
3x3 conv on a 1 x 1 input as the 1 x 1 conv of its centre tap.
"""

from __future__ import annotations

import pytest
import torch

from selfsup.kernels.testing import fresh_seed
from selfsup.models.resnet import conv3x3


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_on_1x1_input_bf16_matches_float64(stride, channels_last):
    torch.manual_seed(fresh_seed())
    conv = conv3x3(128, 256, stride)
    x = torch.randn(128, 128, 1, 1)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), \
            x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(128, 256, 1, 1) * 65536  # GradScaler's upstream
    for _ in range(4):  # the garbage came at random: ~2 draws in 3 failed
        conv.weight.grad = x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.shape == (128, 256, 1, 1)
        y.backward(g)
        w64 = conv.weight.detach().double().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y64 = torch.nn.functional.conv2d(x64, w64, stride=stride, padding=1)
        y64.backward(g.double())
        # bf16 operands: ~2^-8 relative per product, sqrt(128) of them (and 128 images) summed
        scale = w64.grad.abs().max().item()
        assert torch.isfinite(conv.weight.grad).all()
        assert (conv.weight.grad.double() - w64.grad).abs().max().item() <= 0.02 * scale
        off = conv.weight.grad.clone()
        off[:, :, 1, 1] = 0
        assert off.abs().max().item() == 0.0  # the padding-only taps: exactly 0
        assert (x.grad.double() - x64.grad).abs().max().item() <= 0.02 * x64.grad.abs().max()
        assert (y.double() - y64).abs().max().item() <= 0.02 * y64.abs().max()


def test_swav_with_16px_local_crops_bf16_gradients_finite(monkeypatch):
    """The failing trial's shape: SwAV on 28-px globals and its default 16-px locals (96/224
    of 28), bf16 autocast, NHWC."""
    from selfsup.data.recipes import get_recipe
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class

    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    argv = ["--method", "swav", "--data", "fashion-mnist-sample", "--device", "cpu",
            "--arch", "resnet_tiny", "--no-cifar-stem", "--img-size", "28", "--n-local", "2",
            "--out-dim", "300", "--queue-size", "0"]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class("swav").preset)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100)
    cls = method_class("swav")
    sizes = get_recipe(cfg.aug or cls.recipe, cfg.img_size, **cls.recipe_kwargs(cfg)).view_sizes
    assert list(sizes) == [28, 28, 16, 16]
    torch.manual_seed(fresh_seed())
    m = cls(cfg).train().to(memory_format=torch.channels_last)
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        views = [torch.randn(128, 3, s, s).to(memory_format=torch.channels_last)
                 for s in sizes]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(views)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        bad = [n for n, p in m.named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients: {bad}"
