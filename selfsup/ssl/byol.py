"""BYOL: an online network predicts an EMA target network's projection.

Grill et al. 2020. online: backbone -> projector (4096 -> 256) -> predictor (4096 -> 256);
target: EMA of backbone + projector, tau 0.996 -> 1 on a cosine (0.99 for short runs).

    L = (2 - 2 cos(p(x1), sg(z_t(x2)))) + (2 - 2 cos(p(x2), sg(z_t(x1))))   (batch mean)

The augmentation is asymmetric (recipe "byol": blur always on view 1, solarize on view 2).
The preset is the official code's 300-epoch one (base lr 0.3, wd 1e-6, tau 0.99); its
1000-epoch values, the paper's headline, are 0.2, 1.5e-6, 0.996 (docs/recipes.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..models.heads import MLP
from .common import (
    SMALL_IMAGES,
    Method,
    build_encoder,
    collapse_stats,
    cpu_heads,
    crop_pairs,
    ema_update,
    frozen_copy,
    momentum_at,
)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


class BYOL(Method):
    recipe: ClassVar[str] = "byol"
    sync_bn: ClassVar[bool] = True
    multicrop: ClassVar[bool] = True  # an option (--local-crops), not the paper's

    def __init__(self, cfg) -> None:
        super().__init__()
        self.base_momentum = self.momentum = cfg.ema_momentum
        self.backbone = build_encoder(cfg)
        d, hid, out = self.backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim
        self.projector = MLP(d, hid, out, 2, bn=True)
        self.predictor = MLP(out, cfg.pred_hidden, out, 2, bn=True)
        self.t_backbone, self.t_projector = frozen_copy(self.backbone), frozen_copy(self.projector)

    @classmethod
    def preset(cls, arch):
        return dict(optimizer="lars", blr=0.3, wd=1e-6, ema_momentum=0.99, proj_hidden=4096,
                    proj_dim=256, pred_hidden=4096, warmup_epochs=10, epochs=300)

    @classmethod
    def small_preset(cls, arch):
        # no official CIFAR recipe; solo-learn's cifar/byol.yaml (ResNet-18): LARS at lr 1.0 x
        # B / 256, wd 1e-5, tau 0.99, heads 4096 / 256 as the preset, no blur (solarize on the
        # second view kept). Its 1000 epochs of LARS are not what a run of ~10 needs: batch 64
        # (twice the steps per image), SGD at lr 0.1 (blr 0.4, wd 1e-4: the Fashion-MNIST
        # row's), crops of 0.5-1 and, on the CPU ResNet, 1024-wide heads. At batch 128 (on
        # Fashion-MNIST): LARS at blr 1.0 with 0.3-1 crops and 4096-wide heads +4.3 in 4000
        # steps (10.1 CPU min), SGD the same (+4.3 in 3800), 0.5-1 crops with 1024-wide
        # heads +5.0 in 4800 (8.4 CPU min) and 5200 (9.1)
        return dict(SMALL_IMAGES, batch_size=64, optimizer="sgd", blr=0.4, wd=1e-4,
                    crop_scale=(0.5, 1.0), **cpu_heads(arch, proj_hidden=1024, pred_hidden=1024))

    def forward(self, views: list[torch.Tensor]) -> dict:
        # multi-crop (--local-crops): every view predicts each global view's target but its
        # own; the sum rescaled to two terms (two views: exactly the loss above)
        z = [self.projector(self.backbone(v)) for v in views]
        with torch.no_grad():
            t = [self.t_projector(self.t_backbone(v)) for v in views[:2]]
        p = [self.predictor(zv) for zv in z]
        pairs = crop_pairs(len(views), symmetric=False)
        loss = sum(byol_loss(p[v], t[g]) for g, v in sorted(pairs, key=lambda gv: gv[1]))
        if len(pairs) > 2:
            loss = loss * (2 / len(pairs))
        return {"loss": loss, "momentum": self.momentum, **collapse_stats(z[0])}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.momentum = momentum_at(self.base_momentum, step + 1, total_steps)
        ema_update(self.t_backbone, self.backbone, self.momentum)
        ema_update(self.t_projector, self.projector, self.momentum)
