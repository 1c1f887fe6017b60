"""DINOv2 ViT options: register tokens (layout, every consumer skips them) and LayerScale."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from selfsup.engine.finetune_utils import Classifier
from selfsup.engine.trainer import train
from selfsup.eval import pool, split_encoder
from selfsup.kernels.testing import fresh_seed
from selfsup.models import build_backbone, export_state_dict
from selfsup.models.export import timm_vit_keys
from selfsup.models.vit import LayerScale, VisionTransformer
from test_trainer import config, read_log

R = 3


def tiny(**kw) -> VisionTransformer:
    kw.setdefault("img_size", 16)
    kw.setdefault("patch_size", 4)
    return build_backbone("vit_tiny", **kw).eval()


@pytest.fixture(autouse=True)
def portable(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "math")


def manual_forward(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Today's ViT written out: x += attn(norm1 x); x += mlp(norm2 x); no LayerScale."""
    t = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    h = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1), t], 1)
    for b in vit.blocks:
        h = h + b.attn(b.norm1(h))
        h = h + b.mlp(b.norm2(h))
    return vit.norm(h)


# ----------------------------------------------------------------------------- LayerScale
def test_defaults_are_todays_vit_bit_for_bit():
    fresh_seed()
    vit = tiny()
    assert set(vit.state_dict()) == set(timm_vit_keys(len(vit.blocks)))  # no new keys
    assert not any(isinstance(m, LayerScale) for m in vit.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), manual_forward(vit, x))
        assert torch.equal(vit(x), manual_forward(vit, x)[:, 0])


@pytest.mark.parametrize("value", [1e-5, 0.1])
def test_layer_scale_init_value_on_both_branches(value):
    vit = tiny(layer_scale=value)
    for blk in vit.blocks:
        for ls in (blk.ls1, blk.ls2):
            assert isinstance(ls, LayerScale)
            assert torch.equal(ls.gamma, torch.full((vit.embed_dim,), value))
            assert ls.gamma.requires_grad


def test_layer_scale_scales_each_residual_branch():
    fresh_seed()
    vit = tiny(layer_scale=1.0)
    ref = tiny()
    ref.load_state_dict({k: v for k, v in vit.state_dict().items() if ".ls" not in k})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), ref.forward_features(x))  # gamma 1: x*1
        h = vit._tokens(x)
        blk = vit.blocks[0]
        blk.ls1.gamma.zero_()  # attention branch off: only the MLP branch is added
        want = h + blk.mlp(blk.norm2(h)) * blk.ls2.gamma
        torch.testing.assert_close(blk(h), want, rtol=0, atol=0)
        blk.ls2.gamma.zero_()  # both off: the block is the identity
        assert torch.equal(blk(h), h)


# ----------------------------------------------------------------------------- registers
def test_register_layout_and_shapes():
    fresh_seed()
    vit = tiny(registers=R)
    x = torch.randn(2, 3, 16, 16)
    L = vit.num_patches
    with torch.no_grad():
        t = vit._tokens(x)
        assert t.shape == (2, 1 + R + L, vit.embed_dim)
        assert torch.equal(t[:, 1:1 + R], vit.reg_token.expand(2, -1, -1))  # no position
        assert torch.equal(t[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[0].expand(2, -1))
        full = vit.forward_features(x, keep_registers=True)
        feats = vit.forward_features(x)
        assert full.shape == (2, 1 + R + L, vit.embed_dim) and feats.shape == (2, 1 + L, 192)
        assert torch.equal(feats[:, 0], full[:, 0]) and torch.equal(feats[:, 1:], full[:, 1 + R:])
        assert vit(x).shape == (2, vit.embed_dim)
        vit.global_pool = "avg"  # the patch mean, never the registers
        torch.testing.assert_close(vit(x), full[:, 1 + R:].mean(1), rtol=0, atol=0)


def test_registers_take_part_in_attention():
    fresh_seed()
    vit = tiny(registers=R)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = vit(x)
        vit.reg_token.add_(1.0)
        assert not torch.allclose(vit(x), before)


def test_mae_masking_never_drops_registers():
    fresh_seed()
    vit = tiny(registers=R)
    x = torch.randn(2, 3, 16, 16)
    ids_keep = torch.stack([torch.randperm(vit.num_patches)[:5] for _ in range(2)])
    with torch.no_grad():
        out = vit.forward_features(x, ids_keep=ids_keep)
        full = vit.forward_features(x, ids_keep=ids_keep, keep_registers=True)
        t = vit._tokens(x, ids_keep)
    assert out.shape == (2, 1 + 5, vit.embed_dim) and full.shape == (2, 1 + R + 5, 192)
    assert torch.equal(t[:, 1:1 + R], vit.reg_token.expand(2, -1, -1))


def test_attention_map_skips_registers():
    fresh_seed()
    vit = tiny(registers=R)
    x = torch.randn(1, 3, 16, 16)
    w = vit.get_last_selfattention(x)
    L = vit.num_patches
    assert w.shape == (1, 3, 1 + L, 1 + L)
    with torch.no_grad():  # the cut-out of the full (1+R+L) map
        h = vit._run_blocks(vit._embed(x), vit.blocks[:-1])
        full = vit.blocks[-1].attn.weights(vit.blocks[-1].norm1(h))
    keep = [0, *range(1 + R, 1 + R + L)]
    assert torch.equal(w, full[:, :, keep][:, :, :, keep])
    assert (w.sum(-1) < 1).all()  # the registers took some of every row's mass


@pytest.mark.parametrize("n_tune", [0, 1])
@pytest.mark.parametrize("gp", ["token", "avg"])
def test_probe_pooling_skips_registers(n_tune, gp):
    fresh_seed()
    vit = tiny(registers=R)
    vit.global_pool = gp
    x = torch.randn(2, 3, 16, 16)
    prefix, _, feature = split_encoder(vit, n_tune)
    with torch.no_grad():
        torch.testing.assert_close(feature(prefix(x)), vit(x))
        assert pool(vit, vit.forward_features(x, keep_registers=True)).shape == (2, 192)
        torch.testing.assert_close(pool(vit, vit.forward_features(x, keep_registers=True)),
                                   vit(x))


def test_finetune_avg_pool_skips_registers():
    fresh_seed()
    vit = tiny(registers=R)
    clf = Classifier(vit, num_classes=5, pool="avg").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = vit._run_blocks(vit._embed(x), vit.blocks)
        torch.testing.assert_close(clf.features(x), clf.fc_norm(h[:, 1 + R:].mean(1)))


def test_export_names_and_bad_values():
    vit = tiny(registers=2, layer_scale=1e-5)
    sd = export_state_dict(vit)
    assert sd["reg_token"].shape == (1, 2, 192) and "blocks.0.ls2.gamma" in sd
    for kw in ({"registers": -1}, {"registers": 1.5}, {"layer_scale": 0.0},
               {"layer_scale": -1e-5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            tiny(**kw)
    with pytest.raises(ValueError, match="registers"):
        build_backbone("resnet_tiny", registers=2)


def test_dinov2_patch14_archs():
    for name, d, depth in (("vit_s14", 384, 12), ("vit_b14", 768, 12), ("vit_l14", 1024, 24),
                           ("vit_g14", 1536, 40)):
        with torch.device("meta"):  # shapes only: ViT-g is 1.1B parameters
            vit = build_backbone(name)
        assert (vit.patch_size, vit.embed_dim, len(vit.blocks)) == (14, d, depth)
        assert vit.grid_size == (16, 16)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["dino", "mae"])
def test_two_step_training_with_registers_and_layer_scale(method, tmp_path):
    cfg = config(method, tmp_path, "--steps", "2", "--registers", "2", "--layer-scale", "1e-5")
    summary = train(cfg)
    assert summary["steps"] == 2
    rows = read_log(Path(cfg.out))
    assert all(math.isfinite(r["loss"]) for r in rows)
    from selfsup.engine import checkpoint as ckpt

    state = ckpt.load(cfg.out)
    keys = state["model"].keys()
    assert any(k.endswith("backbone.reg_token") for k in keys)
    assert any(k.endswith("blocks.0.ls1.gamma") for k in keys)
    # the run's consumers: the pictures (attention maps / MAE reconstruction) and the export
    from PIL import Image

    from selfsup import export as export_cli
    from selfsup import visualize
    from selfsup.data import load_dataset

    image = tmp_path / "item.png"
    Image.fromarray(load_dataset("fashion-mnist-sample", "test").images[0]).save(image)
    kind = "attention" if method == "dino" else "reconstruction"
    out = tmp_path / f"{kind}.png"
    assert visualize.main([kind, "--checkpoint", cfg.out, "--image", str(image),
                           "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 3 * 16
    file = tmp_path / "vit.safetensors"
    assert export_cli.main(["--checkpoint", cfg.out, "--out", str(file)]) == 0
    assert export_cli.load_exported(file)["reg_token"].shape == (1, 2, 192)
