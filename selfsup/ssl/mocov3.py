"""MoCo v3: in-batch keys from a momentum encoder, a predictor, a symmetric loss.

Chen, Xie and He 2021 ("An Empirical Study of Training Self-Supervised Vision Transformers").
For two views x1, x2 (N local rows on each of W ranks):

    q1 = pred(proj(f(x1)))           query branch, trained
    k2 = sg(proj_m(f_m(x2)))         momentum branch: EMA, m 0.99 -> 1 on a cosine
    ctr(q, k) = 2T * CE(q @ all_gather(k)^T / T, labels = i + N * rank)
    loss = ctr(q1, k2) + ctr(q2, k1)          fused: selfsup.kernels.info_nce_batch

ViT: the patch projection is frozen at its random init (gradient spikes start there) and the
position embedding is fixed 2D sin-cos. T = 0.2 for ViT, 1.0 for ResNet. As the official code:
BYOL's asymmetric augmentation, crops of 0.08-1 for ViT and 0.2-1 for ResNet (CONFIG.md's
--crop-min=.2), no bias in any MLP Linear, weight decay on every parameter (AdamW; its LARS
skips biases and norms), ResNets with zero-init residuals.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .. import dist
from ..kernels import info_nce_batch
from ..models.heads import MLP
from .common import (
    SMALL_IMAGES,
    Method,
    build_encoder,
    collapse_stats,
    cpu_heads,
    crop_scale_kwargs,
    ema_update,
    frozen_copy,
    is_vit,
    momentum_at,
    recipe_is_default,
)


class MoCoV3(Method):
    recipe: ClassVar[str] = "byol"
    sync_bn: ClassVar[bool] = True

    def __init__(self, cfg) -> None:
        super().__init__()
        self.temperature, self.base_momentum = cfg.temperature, cfg.ema_momentum
        vit = is_vit(cfg.arch)
        self.backbone = build_encoder(cfg, **({"frozen_patch_embed": True} if vit else {}))
        d, hid, out = self.backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim
        # Projector: 3 layers for ViT, 2 for ResNet, last BN without affine; predictor: 2.
        bias = cfg.mlp_bias is not False
        self.projector = MLP(d, hid, out, 3 if vit else 2, bn=True, last_bn=True,
                             last_bn_affine=False, bias=bias)
        self.predictor = MLP(out, cfg.pred_hidden, out, 2, bn=True, bias=bias)
        self.m_backbone, self.m_projector = frozen_copy(self.backbone), frozen_copy(self.projector)
        self.momentum = self.base_momentum

    @classmethod
    def preset(cls, arch):
        common = dict(ema_momentum=0.99, proj_hidden=4096, proj_dim=256, pred_hidden=4096,
                      mlp_bias=False, decay_all=True)
        if is_vit(arch):
            return dict(common, temperature=0.2, optimizer="adamw", blr=1.5e-4, wd=0.1,
                        warmup_epochs=40, epochs=300)
        return dict(common, temperature=1.0, optimizer="lars", blr=0.6, wd=1e-6,
                    warmup_epochs=10, epochs=100, zero_init_residual=True)

    @classmethod
    def small_preset(cls, arch):
        # no official CIFAR recipe; solo-learn's cifar/mocov3.yaml (ResNet-18): T 0.2, tau
        # 0.99, heads 4096 / 256 as the preset. A ViT keeps the paper's AdamW (its T is 0.2
        # already). A ResNet: solo-learn's LARS at lr 0.3 x B / 256 is for 1000 epochs; in
        # runs of ~10, SGD at blr 0.4 with wd 1e-4 (the Fashion-MNIST row's lr 0.2 at batch
        # 128), crops of 0.5-1 and, on the CPU ResNet, 1024-wide heads
        if is_vit(arch):
            return dict(SMALL_IMAGES, temperature=0.2)
        # zero-init residuals off (common.py, small images)
        return dict(SMALL_IMAGES, temperature=0.2, optimizer="sgd", blr=0.4, wd=1e-4,
                    crop_scale=(0.5, 1.0), zero_init_residual=False,
                    **cpu_heads(arch, proj_hidden=1024, pred_hidden=1024))

    @classmethod
    def recipe_kwargs(cls, cfg) -> dict:
        if cfg.crop_scale is None and not is_vit(cfg.arch) and recipe_is_default(cfg, cls):
            return {"scale": (0.2, 1.0)}  # the official ResNet-50 commands: --crop-min=.2
        return crop_scale_kwargs(cfg, "scale")

    def ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k_all = dist.all_gather_nograd(k)
        loss = info_nce_batch(q, k_all, self.temperature, positive_offset=len(q) * dist.rank())
        return loss * (2 * self.temperature)

    def forward(self, views: list[torch.Tensor]) -> dict:
        x1, x2 = views[0], views[1]
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.m_projector(self.m_backbone(x1))
            k2 = self.m_projector(self.m_backbone(x2))
        loss = self.ctr(q1, k2) + self.ctr(q2, k1)
        return {"loss": loss, "momentum": self.momentum, **collapse_stats(q1)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.momentum = momentum_at(self.base_momentum, step + 1, total_steps)
        ema_update(self.m_backbone, self.backbone, self.momentum)
        ema_update(self.m_projector, self.projector, self.momentum)
