"""MAE: masked autoencoders.

He et al. 2022. Per image: patchify, add the fixed 2D sin-cos position embedding, keep a
random 25% of the patches (`random_masking` + `gather_tokens`, fused), prepend cls and run the
ViT on the visible tokens only (~3x less compute). The decoder (8 x 512 by default) embeds
them, puts one learned mask token in every removed slot (`scatter_tokens`), adds its own
position embedding and predicts the pixels of every patch. The loss is the per-patch MSE
against the (per-patch normalized, with norm_pix) target, averaged over the masked patches
only (`masked_patch_loss`, fused, gradient computed in the same pass).

AdamW (0.9, 0.95), blr 1.5e-4, weight decay 0.05, 40 warm-up epochs, bicubic crops. For small
images (<= 64 px) the decoder defaults to 2 x 128.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..kernels import masked_patch_loss, random_masking
from ..models.heads import MAEDecoder
from .common import SMALL_IMAGES, Method, build_encoder, is_vit


class MAE(Method):
    recipe: ClassVar[str] = "mae"

    def __init__(self, cfg) -> None:
        super().__init__()
        if not is_vit(cfg.arch):
            raise ValueError(f"MAE needs a ViT backbone (--arch vit_*), got --arch {cfg.arch}")
        self.backbone = build_encoder(cfg)
        # The cls token is trained (the patch tokens attend to it in the encoder and the
        # decoder, so the loss reaches it), but no loss term reads it as an image feature;
        # MAE's features are the mean of the patch tokens, as in its fine-tuning recipe
        # (global_pool=True).
        self.backbone.global_pool = "avg"
        small = cfg.img_size <= 64
        dec_dim = cfg.decoder_dim or (128 if small else 512)
        depth = cfg.decoder_depth or (2 if small else 8)
        p = self.backbone.patch_size
        self.decoder = MAEDecoder(self.backbone.num_patches, p * p * cfg.in_chans,
                                  self.backbone.feature_dim, dec_dim=dec_dim, depth=depth,
                                  heads=max(1, dec_dim // 32), grid_size=self.backbone.grid_size)
        if cfg.grad_ckpt:
            self.decoder.set_grad_checkpointing(True)
        self.mask_ratio, self.norm_pix = cfg.mask_ratio, cfg.norm_pix

    @classmethod
    def preset(cls, arch):
        return dict(optimizer="adamw", blr=1.5e-4, wd=0.05, betas=(0.9, 0.95),
                    warmup_epochs=40, epochs=800, mask_ratio=0.75, norm_pix=True)

    @classmethod
    def small_preset(cls, arch):
        # small-ViT CIFAR practice, solo-learn's cifar/mae.yaml: patch 4 at 32 px, a 0.75 mask,
        # the normalized-pixel target, AdamW (0.9, 0.95) at lr 2e-4 x B / 256, wd 0.05, its
        # 10 warm-up epochs (the paper's 40 are 5% of 800). Its decoder is 512 x 8; this one
        # keeps its small-image default of 128 x 2, a quarter of the encoder's cost at vit_tiny
        return dict(batch_size=SMALL_IMAGES["batch_size"], patch_size=4, mask_ratio=0.75,
                    norm_pix=True, blr=2e-4, warmup_epochs=10)

    def forward(self, views: list[torch.Tensor]) -> dict:
        imgs = views[0]  # (B, C, H, W)
        ids_keep, ids_restore, mask = random_masking(
            imgs.shape[0], self.backbone.num_patches, self.mask_ratio, device=imgs.device)
        latent = self.backbone.forward_features(imgs, ids_keep=ids_keep)  # (B, 1+L_keep, D)
        pred = self.decoder(latent, ids_restore)  # (B, L, p*p*C)
        loss = masked_patch_loss(pred, imgs, mask, self.backbone.patch_size,
                                 norm_pix=self.norm_pix)
        return {"loss": loss, "masked_fraction": mask.float().mean()}
