"""SSL heads (MLP, DINOHead, MAEDecoder) and backbone export / loading (selfsup.models)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.kernels import random_masking
from selfsup.models import (
    MLP,
    DINOHead,
    MAEDecoder,
    VisionTransformer,
    build_backbone,
    export_state_dict,
    export_timm_state_dict,
    load_backbone_state_dict,
)
from selfsup.models.vit import sincos_pos_embed


def tiny_vit(**kw) -> VisionTransformer:
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, **kw}
    return VisionTransformer(**kw)


# ----------------------------------------------------------------------------- export
def test_export_timm_keys_and_shapes():
    with torch.device("meta"):
        vit = build_backbone("vit_small")
    sd = export_timm_state_dict(vit)
    block = {"norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384),
             "attn.qkv.bias": (1152,), "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
             "norm2.weight": (384,), "norm2.bias": (384,), "mlp.fc1.weight": (1536, 384),
             "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,)}
    want = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
            "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
            **{f"blocks.{i}.{k}": s for i in range(12) for k, s in block.items()},
            "norm.weight": (384,), "norm.bias": (384,)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    with pytest.raises(ValueError, match="VisionTransformer"):
        export_timm_state_dict(build_backbone("resnet_tiny"))


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_export_file_roundtrip_identical_features(seed, tmp_path, pos_embed):
    from selfsup.export import load_exported, save_weights

    vit = tiny_vit(pos_embed=pos_embed).eval()
    save_weights(export_state_dict(vit), tmp_path / "vit.safetensors")
    fresh = tiny_vit(pos_embed=pos_embed).eval()
    fresh.load_state_dict(load_exported(tmp_path / "vit.safetensors"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh(x), vit(x))
    net = build_backbone("resnet_tiny").eval()
    save_weights(export_state_dict(net), tmp_path / "r.pt", "torch")
    back = build_backbone("resnet_tiny").eval()
    back.load_state_dict(load_exported(tmp_path / "r.pt"))
    assert not any(k.startswith("fc") for k in export_state_dict(net))
    assert torch.equal(back(x), net(x))


def test_load_backbone_state_dict_drops_head_and_resizes_pos(seed):
    src = tiny_vit(img_size=32, pos_embed="learned")  # a checkpoint at another size + head
    sd = {**export_state_dict(src), "head.weight": torch.zeros(10, 32),
          "head.bias": torch.zeros(10)}
    dst = tiny_vit(img_size=16, pos_embed="learned")
    load_backbone_state_dict(dst, sd)
    assert torch.equal(dst.pos_embed, src.pos_embed_for((4, 4)))
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


# ----------------------------------------------------------------------------- heads
def layout(m: nn.Module) -> list[str]:
    out = []
    for layer in m:
        if isinstance(layer, nn.Linear):
            bias = "b" if layer.bias is not None else ""
            out.append(f"L{layer.in_features}-{layer.out_features}{bias}")
        elif isinstance(layer, nn.BatchNorm1d):
            out.append("BN" if layer.affine else "BN-")
        else:
            out.append(type(layer).__name__)
    return out


def test_mlp_layouts_of_the_methods():
    assert layout(MLP(512, 512, 128, 1, bn=False)) == ["L512-128b"]  # MoCo v1
    assert layout(MLP(512, 2048, 128, 2, bn=False)) == ["L512-2048b", "ReLU", "L2048-128b"]
    assert layout(MLP(512, 2048, 2048, 3, bn=True, last_bn=True, last_bn_affine=False)) == [
        "L512-2048", "BN", "ReLU", "L2048-2048", "BN", "ReLU", "L2048-2048", "BN-"]  # SimSiam
    assert layout(MLP(2048, 512, 2048, 2, bn=True)) == ["L2048-512", "BN", "ReLU", "L512-2048b"]
    assert layout(MLP(384, 4096, 256, 3, bn=True, last_bn=True, last_bn_affine=False)) == [
        "L384-4096", "BN", "ReLU", "L4096-4096", "BN", "ReLU", "L4096-256", "BN-"]  # MoCo v3
    assert layout(MLP(512, 4096, 256, 2, bn=True)) == ["L512-4096", "BN", "ReLU", "L4096-256b"]
    assert MLP(8, 16, 4, 2)(torch.randn(5, 8)).shape == (5, 4)
    with pytest.raises(ValueError, match="num_layers"):
        MLP(8, 16, 4, 0)


def test_dino_head_weight_norm_and_shapes(seed):
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(5, 32)).shape == (5, 100)
    ll = head.last_layer
    assert not ll.weight_g.requires_grad and torch.equal(ll.weight_g, torch.ones(100, 1))
    assert (ll.weight_g.shape, ll.weight_v.shape) == ((100, 1), (100, 16))
    free = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    with torch.no_grad():
        free.last_layer.weight_g.uniform_(0.5, 2.0)
        free.last_layer.weight_v.mul_(torch.rand(100, 1) * 10)  # row scale of v does not matter
    torch.testing.assert_close(free.last_layer.weight.norm(dim=1, keepdim=True),
                               free.last_layer.weight_g)
    x = torch.randn(3, 16)
    torch.testing.assert_close(free.last_layer(x), x @ free.last_layer.weight.T)
    free(torch.randn(5, 32)).sum().backward()
    assert free.last_layer.weight_v.grad.abs().sum() > 0
    assert free.last_layer.weight_g.grad.abs().sum() > 0
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_dino_head_deepcopy_ema_parameter_order(seed):
    from selfsup.ssl.common import ema_update

    student = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, use_bn=True)
    teacher = copy.deepcopy(student)
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in teacher.named_parameters()]
    assert "last_layer.weight_v" in dict(student.named_parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.75)
    for t, b, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)


def test_mae_decoder_shape_and_mask_token(seed):
    vit = tiny_vit(img_size=(16, 24))  # grid 4 x 6, L = 24
    dec = MAEDecoder(vit.num_patches, 4 * 4 * 3, 32, dec_dim=16, depth=2, heads=2,
                     grid_size=vit.grid_size)
    ids_keep, ids_restore, mask = random_masking(3, 24, 0.75)
    latent = vit.forward_features(torch.randn(3, 3, 16, 24), ids_keep=ids_keep).detach()
    seen = {}
    def keep_first_input(module, args):  # returns None: a hook's return would replace args
        seen.setdefault("x", args[0])

    dec.decoder_blocks[0].register_forward_pre_hook(keep_first_input)
    pred = dec(latent, ids_restore)
    assert pred.shape == (3, 24, 48)
    x, pos = seen["x"], dec.decoder_pos_embed
    emb = dec.decoder_embed(latent)
    for b in range(3):
        removed = mask[b].nonzero().flatten()
        torch.testing.assert_close(x[b, 1 + removed], dec.mask_token[0] + pos[0, 1 + removed])
        torch.testing.assert_close(x[b, 1 + ids_keep[b]], emb[b, 1:] + pos[0, 1 + ids_keep[b]])
        torch.testing.assert_close(x[b, 0], emb[b, 0] + pos[0, 0])
    assert torch.equal(pos, sincos_pos_embed(16, (4, 6)))
    g = torch.randn_like(pred)
    ref = torch.autograd.grad(pred, list(dec.parameters()), g)
    dec.set_grad_checkpointing(True)
    got = torch.autograd.grad(dec(latent, ids_restore), list(dec.parameters()), g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="grid_size"):
        MAEDecoder(24, 48, 32, dec_dim=16, depth=1, heads=2)
