"""DINOv2: iBOT with Sinkhorn-Knopp teachers, KoLeo, LayerScale and registers.

Oquab et al. 2023. The iBOT objective (ibot.py: DINO's cls loss over the crop pairs + the
masked-patch loss on the masked tokens only) with DINOv2's changes:

    teacher   Sinkhorn-Knopp over the global batch for both losses (epsilon = the teacher
              temperature, 3 iterations), no center EMA       (--centering center: iBOT's)
    KoLeo     + w * sum over the 2 global crops of koleo(student backbone cls tokens of the
              crop), w = 0.1 (--koleo-weight; 0 turns it off): spreads the features
    masks     half the images masked (mask_sample_probability 0.5), ratios stratified over
              [0.1, 0.5] across the masked images, a block at most half the grid
    model     LayerScale 1e-5 (--layer-scale), optional registers (--registers 4, Darcet et
              al. 2023), drop path 0.3 (0.4 for L/g), the last head layer's norm trained

    loss = L_cls + L_patch + w * (koleo(cls_0) + koleo(cls_1))

`sinkhorn_center` (dino.py) turns the Sinkhorn teacher into the exact center of the fused
DINO / iBOT losses, so both run their fused kernels unchanged and no (N, K) probability tensor
is stored. The logged "koleo" is the weighted term; "teacher_entropy" and
"teacher_patch_entropy" are the entropies of the Sinkhorn teachers.

Presets: DINOv2's ssl_default_config for vit_small14 / vit_base14 (and any other ViT): AdamW,
lr 0.004 * sqrt(batch / 1024) (here blr 0.004 / 32 with --lr-scaling sqrt), wd 0.04 -> 0.4,
10 warm-up epochs of 100, EMA 0.992 -> 1, K = 65536 for both heads (shared), bottleneck 256,
crops 0.32-1 and 8 locals of 0.05-0.32; vit_large14 / vit_giant14 follow its vitl14/vitg14
configs: K = 131072, bottleneck 384, separate patch head, drop path 0.4, EMA 0.994, 500
epochs, 80 warm-up, lr 2e-4 * sqrt(batch / 1024), wd end 0.2. Every size: the patch
embedding at lr x 0.2. Not reproduced: DINOv2's layer-wise lr decay (0.9 in the default
config, 1.0 for L/g, i.e. none), per-module gradient clipping (here the global norm),
uniform drop path (here linear in depth), SwiGLU in ViT-g. Local crops are a whole number
of patches (98 px at 224 for patch 14, as DINOv2's L/g configs). docs/dinov2.md.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..data.recipes import dino_local_size
from ..kernels import koleo_loss
from ..kernels.ibot import _ibot_loss_with_stats
from ..models.vit import ALIASES, ARCHS
from .dino import CENTERINGS, sinkhorn_center, sinkhorn_dino_loss
from .ibot import IBOT
from .masking import BlockMasking

# DINOv2's patch_embed_lr_mult (every config): the patch embedding learns at 0.2 x the lr
PATCH_EMBED_LR_SCALE = 0.2

# vitl14.yaml / vitg14.yaml over ssl_default_config (the ViT-L/g trained from scratch)
_LARGE = dict(out_dim=131072, patch_out_dim=131072, proj_dim=384, separate_patch_head=True,
              drop_path=0.4, ema_momentum=0.994, epochs=500, warmup_epochs=80,
              blr=2e-4 / 32, wd_end=0.2)


class DINOv2(IBOT):
    recipe: ClassVar[str] = "dino"  # DINO's multi-crop augmentations

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.centering = cfg.centering or "sinkhorn"
        if self.centering not in CENTERINGS:
            raise ValueError(f"--centering must be one of {', '.join(CENTERINGS)}, got "
                             f"{cfg.centering!r}")
        self.sinkhorn_iters = cfg.sinkhorn_iters or 3
        w = 0.1 if cfg.koleo_weight is None else float(cfg.koleo_weight)
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"--koleo-weight must be a finite float >= 0, got {cfg.koleo_weight}")
        self.koleo_weight = w

    @classmethod
    def preset(cls, arch):
        base = dict(optimizer="adamw", lr_scaling="sqrt", blr=0.004 / 32, wd=0.04, wd_end=0.4,
                    clip_grad=3.0, clip_mode="global", min_lr=1e-6, warmup_epochs=10,
                    epochs=100, temperature=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
                    warmup_teacher_temp_epochs=30, ema_momentum=0.992, out_dim=65536,
                    patch_out_dim=65536, separate_patch_head=False, proj_hidden=2048,
                    proj_dim=256, n_local=8, freeze_last_layer_epochs=1, center_momentum=0.9,
                    norm_last_layer=False, mask_ratio_range=(0.1, 0.5), mask_probability=0.5,
                    patch_loss_weight=1.0, crop_scale=(0.32, 1.0),
                    local_crop_scale=(0.05, 0.32), centering="sinkhorn", koleo_weight=0.1,
                    drop_path=0.3, layer_scale=1e-5, vit_init="trunc_normal")
        if ALIASES.get(arch, arch) in ("vit_large14", "vit_giant14"):
            base.update(_LARGE)
        return base

    @classmethod
    def small_preset(cls, arch):
        # no CIFAR recipe in the paper: iBOT's small preset (DINO's, dino.DINO_SMALL, with the
        # patch head as wide) and DINO's optimizer, blr 5e-4 x B / 256 (the sqrt rule's
        # 0.004 x sqrt(B / 1024) is 5.6x that at batch 128), DINO's drop path 0.1 for a small
        # ViT (0.3 is the ViT-L/g value) and LayerScale 0.1, CaiT's init for nets of <= 18
        # blocks trained from scratch (DINOv2's 1e-5 is for ViT-g: at 12 blocks it starts every
        # residual branch nearly off; docs/quality.md)
        return dict(super().small_preset(arch), lr_scaling="linear", blr=5e-4, drop_path=0.1,
                    layer_scale=0.1)

    def param_groups(self, cfg) -> list[dict]:
        """IBOT's groups (weight decay split, the last layers frozen for epoch 1), with the
        student's patch embedding in groups of its own at lr x PATCH_EMBED_LR_SCALE."""
        slow = {id(p) for p in self.backbone.patch_embed.parameters()}
        out = []
        for g in super().param_groups(cfg):
            for is_slow in (False, True):
                ps = [p for p in g["params"] if (id(p) in slow) == is_slow]
                if ps:
                    scale = g.get("lr_scale", 1.0) * (PATCH_EMBED_LR_SCALE if is_slow else 1.0)
                    out.append({**g, "params": ps, **({"lr_scale": scale} if is_slow else {})})
        return out

    @classmethod
    def recipe_kwargs(cls, cfg) -> dict:
        """IBOT's, with local crops a whole number of patches wide: DINOv2's 98 px at 224 for
        patch 14 (96 px would leave 12 px outside the patch grid); patch 16 / 8 / 4 keep
        DINO's 96/224 of the global size. Needs --img-size (the loader's default is decided
        later)."""
        kw = super().recipe_kwargs(cfg)
        arch = ARCHS.get(ALIASES.get(cfg.arch, cfg.arch))
        img = cfg.img_size
        if img and arch is not None:
            p = cfg.patch_size or (4 if img <= 64 else arch.patch_size)  # as build_encoder
            kw["local_size"] = p * max(1, round(dino_local_size(img) / p))
        return kw

    # ------------------------------------------------------------------ IBOT's hooks
    def masking(self, grid: tuple[int, int]) -> BlockMasking:
        """DINOv2's draw: int(n p) of the n images masked, their ratios one per bin of the
        range (stratified), a block at most half the grid."""
        if grid not in self._maskings:
            self._maskings[grid] = BlockMasking(
                grid, self.mask_ratio, probability=self.mask_probability, stratified=True,
                max_block=max(4, grid[0] * grid[1] // 2))
        return self._maskings[grid]

    def cls_loss(self, s_cls: torch.Tensor, t_cls: torch.Tensor, tau) -> torch.Tensor:
        if self.centering == "center":
            return super().cls_loss(s_cls, t_cls, tau)
        loss, stats = sinkhorn_dino_loss(s_cls, t_cls, self.criterion.student_temp, tau,
                                         self.sinkhorn_iters)
        self.criterion.last_stats = stats  # read by IBOT.forward, as DINOLoss sets it
        return loss

    def patch_loss(self, s_patch: torch.Tensor, t_patch: torch.Tensor, masks: torch.Tensor,
                   tau) -> torch.Tensor:
        if self.centering == "center":
            return super().patch_loss(s_patch, t_patch, masks, tau)
        # the masked tokens of every rank are the Sinkhorn columns (M = 0 on a rank joins)
        c = sinkhorn_center(t_patch, tau, self.sinkhorn_iters)
        loss, ent, _, _ = _ibot_loss_with_stats(
            s_patch, t_patch, masks, c, student_temp=self.patch_criterion.student_temp,
            teacher_temp=tau)
        self.patch_criterion.last_stats = {"teacher_entropy": ent.detach()}
        return loss

    def extra_losses(self, student: dict, teacher: dict, masks: torch.Tensor) -> dict:
        """KoLeo on each global crop's student cls tokens (backbone output, after the final
        norm), summed over the 2 crops as DINOv2; per rank, as DINOv2 (no gather)."""
        if not self.koleo_weight:
            return {}
        x = student["cls_tokens"]
        b = x.shape[0] // 2
        return {"koleo": self.koleo_weight * (koleo_loss(x[:b]) + koleo_loss(x[b:]))}
