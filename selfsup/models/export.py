"""Backbone weights in the names other libraries use, and loading them back.

Our ViT already carries timm's VisionTransformer names and our ResNet torchvision's, so the
export is the state_dict itself, checked against the expected key set. To load the export in
timm, build the model with ``num_classes=0`` (no head) and, for a sin-cos model, any
``pos_embed``: the table travels as a tensor like timm's learned one.

`load_backbone_state_dict` goes the other way and also accepts the full checkpoints of those
libraries: it drops classifier keys (timm ``head.*``, torchvision ``fc.*``) and resizes a ViT
position table saved at another image size.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import ResNet
from .vit import VisionTransformer, resize_pos_embed

_CLASSIFIER_PREFIXES = ("head.", "fc.", "fc_norm.", "head_drop.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile (`_orig_mod`) or DDP (`module`)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def timm_vit_keys(depth: int, *, registers: int = 0, layer_scale: bool = False) -> list[str]:
    """The state_dict keys of a head-less timm VisionTransformer (class token; `reg_token`
    with registers, `blocks.N.ls{1,2}.gamma` with LayerScale)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    if registers:
        keys.insert(1, "reg_token")
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
        if layer_scale:
            keys += [f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"]
    return keys + ["norm.weight", "norm.bias"]


def export_timm_state_dict(vit: nn.Module) -> dict[str, torch.Tensor]:
    """A flat {timm key: tensor} dict for timm's VisionTransformer (num_classes=0)."""
    vit = _unwrap(vit)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"vit must be a selfsup VisionTransformer, got {type(vit).__name__}")
    # timm's ViT has no mask token: iBOT's is a pre-training parameter, not part of the
    # features, so the export leaves it out (--init-from keeps a model's own fresh one)
    sd = {k: v for k, v in vit.state_dict().items() if k != "mask_token"}
    expected = timm_vit_keys(len(vit.blocks), registers=vit.num_registers,
                             layer_scale=vit.layer_scale is not None)
    if set(sd) != set(expected):  # a model change that would silently break timm loading
        extra, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
        raise RuntimeError(f"ViT state_dict drifted from timm's names: extra {extra[:5]}, "
                           f"missing {missing[:5]}")
    return {k: sd[k].detach() for k in expected}


def export_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """timm names for a ViT, torchvision names (no fc) for a ResNet."""
    encoder = _unwrap(encoder)
    if isinstance(encoder, VisionTransformer):
        return export_timm_state_dict(encoder)
    if isinstance(encoder, ResNet):
        return {k: v.detach() for k, v in encoder.state_dict().items()}
    raise ValueError(f"encoder must be a selfsup VisionTransformer or ResNet, "
                     f"got {type(encoder).__name__}")


def load_backbone_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                             strict: bool = True):
    """Load an export (or a timm / torchvision checkpoint) into our backbone, in place.

    Classifier keys are dropped; a ViT `pos_embed` saved for another patch grid is resized
    (bicubic) to the model's. Returns load_state_dict's (missing, unexpected) result.
    """
    model = _unwrap(model)
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    if isinstance(model, VisionTransformer) and "pos_embed" in sd:
        pos = sd["pos_embed"]
        n_new = model.num_patches
        n_old = pos.shape[1] - 1
        if pos.dim() == 3 and n_old != n_new:
            side = int(round(n_old ** 0.5))
            if side * side != n_old:
                raise ValueError(f"pos_embed holds {n_old} patches, not a square grid; "
                                 f"cannot resize it to {model.grid_size}")
            sd["pos_embed"] = resize_pos_embed(pos, (side, side), model.grid_size)
    return model.load_state_dict(sd, strict=strict)
