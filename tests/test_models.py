"""Backbones and attention backends (selfsup.models); heads and export are in
test_model_heads.py.

Everything runs at tiny sizes except one ViT-H/14 forward; parameter counts are taken on the
meta device, so they cost nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfsup.models.attention as attn_mod
from selfsup.kernels import random_masking
from selfsup.models import (
    ALIASES,
    VIT_ARCHS,
    ResNet,
    VisionTransformer,
    build_backbone,
)
from selfsup.models.attention import attention, attention_math
from selfsup.models.vit import DropPath, sincos_pos_embed


def tiny_vit(**kw) -> VisionTransformer:
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, **kw}
    return VisionTransformer(**kw)


def grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Input and parameter gradients of <model(x), g>."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(model(x), [x, *params], g)


# ----------------------------------------------------------------------------- attention
# fp32: 1e-4 of each tensor's largest value (~800 ulp): the two backends sum the softmax and
# its gradient in different orders, and 2e-5 absolute failed on one weight gradient of ~0.3 at
# SELFSUP_TEST_SEED=911944237 (3.6e-5 apart, 1.1e-4 relative)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_sdpa_and_math_agree_forward_backward(seed, monkeypatch, dtype, tol):
    model = tiny_vit().to(dtype)
    x = torch.randn(3, 3, 16, 16, dtype=dtype, requires_grad=True)
    g = 0.37 * torch.randn(3, 32, dtype=dtype)
    out = {}
    for name in ("sdpa", "math"):
        monkeypatch.setenv("SELFSUP_ATTN", name)
        out[name] = (model(x), grads(model, x, g))
    for a, b in zip([out["sdpa"][0], *out["sdpa"][1]], [out["math"][0], *out["math"][1]],
                    strict=True):
        torch.testing.assert_close(a, b, atol=tol * float(b.abs().max()), rtol=tol)


def test_attention_function_odd_shape_noncontiguous(seed):
    # N = 37 tokens, 3 heads of width 8; the packed qkv is a strided slice of a wider tensor
    wide = torch.randn(2, 37, 3 * 24 + 5, dtype=torch.float64)
    qkv = wide[..., :72].requires_grad_(True)
    assert not qkv.is_contiguous()
    q, k, v = qkv.reshape(2, 37, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref = attention_math(q, k, v).transpose(1, 2).reshape(2, 37, 24)
    for name in ("sdpa", "math", "auto"):
        torch.testing.assert_close(attention(qkv, 3, name), ref, atol=1e-12, rtol=1e-12)
    g = 0.37 * torch.randn_like(ref)
    (d_ref,) = torch.autograd.grad(ref, qkv, g)
    (d_sdpa,) = torch.autograd.grad(attention(qkv, 3, "sdpa"), qkv, g)
    torch.testing.assert_close(d_sdpa, d_ref, atol=1e-12, rtol=1e-12)


def test_forced_xformers_on_cpu_warns_once_and_equals_sdpa(seed, monkeypatch):
    attn_mod.reset_warnings()
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")
    want = model(x)
    monkeypatch.setenv("SELFSUP_ATTN", "xformers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [model(x), model(x)]  # 2 blocks x 2 calls: 4 fallbacks, one warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "xformers" in msgs[0] and "sdpa" in msgs[0], msgs
    for y in got:
        torch.testing.assert_close(y, want, atol=0, rtol=0)
    # auto on CPU picks sdpa silently
    monkeypatch.setenv("SELFSUP_ATTN", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_selfsup_attn_env_forces_backend(monkeypatch):
    calls = {"math": 0, "sdpa": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(attn_mod, "attention_math", counting("math", attn_mod.attention_math))
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention",
                        counting("sdpa", F.scaled_dot_product_attention))
    model = tiny_vit(attn="math")  # the environment overrides the constructor's choice
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")
    model(x)
    assert calls == {"math": 0, "sdpa": 2}
    monkeypatch.setenv("SELFSUP_ATTN", "math")
    model(x)
    assert calls == {"math": 2, "sdpa": 2}
    monkeypatch.delenv("SELFSUP_ATTN")
    model(x)  # the constructor's "math"
    assert calls == {"math": 4, "sdpa": 2}
    monkeypatch.setenv("SELFSUP_ATTN", "flash")
    with pytest.raises(ValueError, match="SELFSUP_ATTN"):
        model(x)
    with pytest.raises(ValueError, match="attn"):
        tiny_vit(attn="flash")


def test_autocast_bf16_every_backend(monkeypatch):
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    model.blocks[0].attn.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    for name in ("auto", "sdpa", "math", "xformers"):
        monkeypatch.setenv("SELFSUP_ATTN", name)
        with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
            warnings.simplefilter("ignore", RuntimeWarning)
            y = model(x)
            y.float().square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(model.cls_token.grad).all()
    assert seen == [torch.bfloat16] * 4  # the attention itself ran in bf16


# ----------------------------------------------------------------------------- sizes and counts
TABLE_M = {"vit_tiny": 5.7, "vit_small": 22, "vit_base": 86, "vit_large": 304, "vit_huge": 632}


def vit_analytic(d, depth, p, in_chans=3, img=224, pos=True):
    per_block = 12 * d * d + 13 * d  # qkv 3d²+3d, proj d²+d, fc1 4d²+4d, fc2 4d²+d, 2 LN 4d
    n = depth * per_block + d * in_chans * p * p + d + d + 2 * d  # + patch, cls, final norm
    return n + (1 + (img // p) ** 2) * d * pos


@pytest.mark.parametrize("name", list(TABLE_M))
def test_vit_parameter_counts(name):
    cfg = VIT_ARCHS[name]
    with torch.device("meta"):
        learned = build_backbone(name, pos_embed="learned")
        sincos = build_backbone(name)
    n = sum(p.numel() for p in learned.parameters())
    assert n == vit_analytic(cfg.embed_dim, cfg.depth, cfg.patch_size)
    # the table counts timm's 1000-class head
    with_head = n + cfg.embed_dim * 1000 + 1000
    assert abs(with_head / (TABLE_M[name] * 1e6) - 1) < 0.01, with_head
    # sin-cos: the table is a buffer, still in the state_dict
    assert sum(p.numel() for p in sincos.parameters()) == n - sincos.pos_embed.numel()
    assert "pos_embed" in sincos.state_dict()


def test_resnet_parameter_counts_and_aliases():
    with torch.device("meta"):
        r18, r50, tiny = (build_backbone(n) for n in ("resnet18", "resnet50", "resnet_tiny"))
        for alias, full in ALIASES.items():
            a, b = build_backbone(alias), build_backbone(full)
            assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(r18) == 11_176_512 and count(r50) == 23_508_032  # torchvision minus fc
    assert (r18.feature_dim, r50.feature_dim, tiny.feature_dim) == (512, 2048, 256)
    assert [len(getattr(tiny, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="resnet_tiny"):
        build_backbone("resnet101")


def test_build_backbone_rejects_options_of_the_other_family():
    with pytest.raises(ValueError, match="patch_size"):
        build_backbone("resnet18", patch_size=4)
    with pytest.raises(ValueError, match="frozen_patch_embed"):
        build_backbone("resnet18", frozen_patch_embed=True)
    with pytest.raises(ValueError, match="cifar_stem"):
        build_backbone("vit_tiny", img_size=32, patch_size=4, cifar_stem=True)
    with pytest.raises(ValueError, match="pos_embed"):
        tiny_vit(pos_embed="rope")
    with pytest.raises(ValueError, match="patch_size"):
        tiny_vit(img_size=18)


def test_vit_huge_forward_on_cpu(seed):
    vit = build_backbone("vit_h").eval()  # ~2.5 GB of fp32 weights
    assert (vit.patch_size, vit.grid_size, len(vit.blocks), vit.num_heads) == (14, (16, 16), 32,
                                                                                 16)
    with torch.no_grad():
        y = vit(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1280) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- ViT behaviour
def test_init_writes_every_tensor(seed):
    vit = tiny_vit(pos_embed="learned")
    assert all(torch.isfinite(p).all() for p in vit.state_dict().values())
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
               for m in vit.modules() if isinstance(m, nn.LayerNorm))
    assert all(not m.bias.any() for m in vit.modules() if isinstance(m, nn.Linear))
    qkv = vit.blocks[0].attn.qkv.weight  # q, k, v each xavier with fan_out D
    assert qkv.abs().max() <= (6 / 64) ** 0.5 and qkv.abs().max() > (6 / 128) ** 0.5
    assert 0.01 < vit.cls_token.std() < 0.03 and vit.pos_embed.abs().max() <= 0.04
    with torch.device("meta"):  # built where the caller says
        assert tiny_vit().blocks[0].mlp.fc1.weight.is_meta


def test_frozen_patch_embed_no_grad_and_unchanged_after_adamw(seed):
    vit = tiny_vit(frozen_patch_embed=True)
    frozen = {k: v.clone() for k, v in vit.patch_embed.state_dict().items()}
    qkv_before = vit.blocks[0].attn.qkv.weight.clone()
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-2, weight_decay=0.1)
    vit(torch.randn(4, 3, 16, 16)).square().sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in vit.patch_embed.parameters())
    opt.step()
    for k, v in vit.patch_embed.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, qkv_before)  # the step did happen


def test_mae_ids_keep_equals_blocks_on_gathered_tokens(seed):
    vit = tiny_vit().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    ids_keep, _, _ = random_masking(3, vit.num_patches, 0.75)
    got = vit.forward_features(x, ids_keep=ids_keep)
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    kept = tokens[torch.arange(3)[:, None], ids_keep]  # (B, L_keep, D) by fancy indexing
    h = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1), kept], 1)
    for blk in vit.blocks:
        h = blk(h)
    assert got.shape == (3, 1 + 4, 32)
    torch.testing.assert_close(got, vit.norm(h), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="ids_keep"):
        vit.forward_features(x, ids_keep=ids_keep[0])


def test_grad_checkpointing_same_values_and_grads(seed):
    vit = tiny_vit().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    g = 0.37 * torch.randn(2, 32, dtype=torch.float64)
    plain = grads(vit, x, g)
    vit.set_grad_checkpointing(True)
    for a, b in zip(grads(vit, x, g), plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_sincos_interpolation_equals_model_built_at_that_size(seed):
    vit = tiny_vit(img_size=32)  # grid 8 x 8
    other = tiny_vit(img_size=(16, 24))  # grid 4 x 6, non-square
    assert torch.equal(vit.pos_embed_for((4, 6)), other.pos_embed)
    assert torch.equal(other.pos_embed, sincos_pos_embed(32, (4, 6)))
    sd = {k: v for k, v in vit.state_dict().items() if k != "pos_embed"}
    other.load_state_dict(sd, strict=False)
    x = torch.randn(2, 3, 16, 24)
    torch.testing.assert_close(vit(x), other(x), atol=0, rtol=0)
    # row-major tokens: token r*gw + c encodes column c in its first half, row r in its second
    t = sincos_pos_embed(32, (4, 6), cls_token=False)[0]
    assert torch.equal(t[1 * 6 + 2, :16], t[3 * 6 + 2, :16])  # same column
    assert torch.equal(t[1 * 6 + 2, 16:], t[1 * 6 + 5, 16:])  # same row


def test_learned_pos_embed_resize(seed):
    vit = tiny_vit(img_size=32, pos_embed="learned")
    assert vit.pos_embed_for((8, 8)) is vit.pos_embed  # same grid: identity
    small = vit.pos_embed_for((4, 6))
    assert small.shape == (1, 1 + 24, 32)
    assert torch.equal(small[:, 0], vit.pos_embed[:, 0])  # cls row kept
    with torch.no_grad():  # a constant grid stays constant under bicubic resizing
        vit.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(vit.pos_embed_for((4, 6))[:, 1:], torch.full((1, 24, 32), 0.5))
    vit(torch.randn(2, 3, 16, 24)).square().sum().backward()  # local crops train it too
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad[:, 1:].abs().sum() > 0


def test_last_selfattention_matches_the_last_block(seed):
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    w = vit.get_last_selfattention(x)
    assert w.shape == (2, 4, 17, 17)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 17))
    # weights @ v through proj reproduce the block's attention output
    with torch.no_grad():
        h = vit._run_blocks(vit._embed(x), vit.blocks[:-1])
        last = vit.blocks[-1]
        u = last.norm1(h)
        v = last.attn.qkv(u).reshape(2, 17, 3, 4, 8)[:, :, 2].transpose(1, 2)
        via_w = last.attn.proj((w @ v).transpose(1, 2).reshape(2, 17, 32))
        torch.testing.assert_close(via_w, last.attn(u), atol=1e-5, rtol=1e-5)


def test_prefix_and_tail_compose_to_forward(seed):
    vit = tiny_vit(depth=3)
    x = torch.randn(2, 3, 16, 16)
    h = vit._run_blocks(vit._embed(x), vit.blocks[:1])  # selfsup.eval's partial fine-tuning
    torch.testing.assert_close(vit.norm(vit._run_blocks(h, vit.blocks[1:]))[:, 0], vit(x))


def test_drop_path(seed):
    dp = DropPath(0.25).train()
    y = dp(torch.ones(4000, 3, 5))
    per_sample = y.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # whole sample
    assert set(per_sample[:, 0].tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((per_sample[:, 0] == 0).float().mean() - 0.25) < 0.04
    assert torch.equal(dp.eval()(y), y)
    rates = [b.drop_path.p for b in tiny_vit(depth=3, drop_path=0.2).blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


# ----------------------------------------------------------------------------- ResNet
def torchvision_resnet_keys(blocks_per_stage, bottleneck):
    """torchvision's ResNet state_dict keys without fc, written from its documented layout."""
    def bn(prefix):
        return [f"{prefix}.{s}" for s in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys = ["conv1.weight", *bn("bn1")]
    convs = 3 if bottleneck else 2
    for stage, n in enumerate(blocks_per_stage, start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight", *bn(f"{p}.bn{c}")]
            if b == 0 and (bottleneck or stage > 1):
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys


def test_resnet_state_dict_keys_match_torchvision():
    with torch.device("meta"):
        r50, r18 = build_backbone("resnet50"), build_backbone("resnet18")
    assert list(r50.state_dict()) == torchvision_resnet_keys([3, 4, 6, 3], True)
    assert list(r18.state_dict()) == torchvision_resnet_keys([2, 2, 2, 2], False)
    sd = r50.state_dict()
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)
    assert r50.conv1.kernel_size == (7, 7) and isinstance(r50.maxpool, nn.MaxPool2d)


def test_resnet_cifar_stem_and_zero_init(seed):
    net = build_backbone("resnet_tiny", img_size=32, cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    y = net(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 256) and torch.isfinite(y).all()
    y.sum().backward()
    assert net.conv1.weight.grad.abs().sum() > 0
    zi = ResNet.from_name("resnet50", zero_init_residual=True)
    assert not zi.layer1[0].bn3.weight.any() and zi.layer1[0].bn1.weight.all()
    assert net.eval()(torch.randn(2, 1, 16, 16).expand(-1, 3, -1, -1)).shape == (2, 256)


def test_global_pool_avg_returns_the_mean_patch_token():
    vit = build_backbone("vit_tiny", img_size=16, patch_size=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        assert torch.equal(vit(x), tokens[:, 0])
        vit.global_pool = "avg"
        torch.testing.assert_close(vit(x), tokens[:, 1:].mean(1))
