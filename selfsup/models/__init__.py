"""Backbones (ViT tiny→huge, ResNet-18/50, a tiny ResNet) and SSL heads. Knows no methods.

    net = build_backbone("vit_b", img_size=224, pos_embed="learned")   # (B, 3, H, W) -> (B, D)
    net.feature_dim                                                    # D

ViTs carry timm's state_dict names and ResNets torchvision's, so `export_state_dict` is the
state_dict checked against those names and `load_backbone_state_dict` reads it (or the
libraries' own checkpoints) back.
"""

from __future__ import annotations

from torch import nn

# The function `attention` is not re-exported: a package attribute of that name would shadow
# the submodule selfsup.models.attention.
from .attention import BACKENDS as ATTN_BACKENDS
from .export import export_state_dict, export_timm_state_dict, load_backbone_state_dict
from .heads import MLP, DINOHead, MAEDecoder
from .resnet import ARCHS as RESNET_ARCHS
from .resnet import ResNet
from .vit import ALIASES, Block, VisionTransformer, ViTConfig
from .vit import ARCHS as VIT_ARCHS

ARCHS: dict[str, object] = {**VIT_ARCHS, **RESNET_ARCHS}  # name -> ViTConfig | ResNetConfig


def build_backbone(name: str, *, img_size: int | tuple[int, int] = 224,
                   patch_size: int | None = None, in_chans: int = 3, attn: str | None = None,
                   frozen_patch_embed: bool = False, pos_embed: str = "sincos",
                   cifar_stem: bool = False, drop_path: float = 0.0, init: str = "xavier",
                   zero_init_residual: bool = False, registers: int = 0,
                   layer_scale: float | None = None, mask_token: bool = False) -> nn.Module:
    """The backbone `name` without a classifier; `.feature_dim` is its output width.

    ViT-only options (patch_size, attn, frozen_patch_embed, pos_embed, drop_path: the
    stochastic-depth rate of the last block, init: "xavier" (MAE, MoCo v3) or "trunc_normal"
    (DINO), registers: DINOv2 register tokens, layer_scale: LayerScale init or None,
    mask_token: iBOT's learned mask token for forward_features(mask=)) and the
    ResNet-only cifar_stem and zero_init_residual (each block's last BN
    gamma 0: MoCo v3, SimSiam) raise a ValueError when set to a non-default value for the
    other family, rather than being dropped silently.
    """
    key = ALIASES.get(name, name)
    if key in VIT_ARCHS:
        if cifar_stem or zero_init_residual:
            raise ValueError(f"cifar_stem and zero_init_residual apply to ResNets only, "
                             f"not {name!r}")
        return VisionTransformer.from_name(
            key, img_size=img_size, in_chans=in_chans, attn=attn, pos_embed=pos_embed,
            frozen_patch_embed=frozen_patch_embed, drop_path=drop_path, init=init,
            registers=registers, layer_scale=layer_scale, mask_token=mask_token,
            **({} if patch_size is None else {"patch_size": patch_size}))
    if key in RESNET_ARCHS:
        vit_only = dict(patch_size=patch_size, attn=attn, frozen_patch_embed=frozen_patch_embed,
                        pos_embed=pos_embed, drop_path=drop_path, init=init,
                        registers=registers, layer_scale=layer_scale, mask_token=mask_token)
        defaults = dict(patch_size=None, attn=None, frozen_patch_embed=False, pos_embed="sincos",
                        drop_path=0.0, init="xavier", registers=0, layer_scale=None,
                        mask_token=False)
        bad = [k for k, v in vit_only.items() if v != defaults[k]]
        if bad:
            raise ValueError(f"{', '.join(bad)} apply to ViTs only, not {name!r}")
        return ResNet.from_name(key, in_chans=in_chans, cifar_stem=cifar_stem,
                                zero_init_residual=zero_init_residual)
    names = sorted(ARCHS) + sorted(ALIASES)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(names)}")


__all__ = [
    "ALIASES",
    "ARCHS",
    "ATTN_BACKENDS",
    "Block",
    "DINOHead",
    "MAEDecoder",
    "MLP",
    "RESNET_ARCHS",
    "ResNet",
    "VIT_ARCHS",
    "ViTConfig",
    "VisionTransformer",
    "build_backbone",
    "export_state_dict",
    "export_timm_state_dict",
    "load_backbone_state_dict",
]
