"""Barlow Twins: make the cross-correlation of two views' embeddings the identity.

Zbontar et al. 2021. z = projector(backbone(x)) for both views, projector 8192-8192-8192
(Linear-BN-ReLU twice, then a bias-free Linear); each z standardised per feature over the batch
(BatchNorm without affine), C = z1^T z2 / N (D x D):

    L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2       lambda = 0.0051

fused: selfsup.kernels.barlow_twins.barlow_twins_loss (never forms C when N < D; the global
batch's statistics across ranks). No predictor, no EMA, no negatives: the redundancy term is
what prevents collapse. Preset: LARS, lr 0.2 x batch / 256 for the weights and 0.0048 x batch /
256 for biases and BN parameters (both outside LARS' trust ratio and weight decay), wd 1.5e-6,
10 warm-up epochs of 1000, BYOL's augmentations (recipe "byol"). Multi-crop (--n-local):
the loss averaged over the pairs of common.crop_pairs(symmetric=True).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..kernels.barlow_twins import barlow_twins_loss
from ..models.heads import MLP
from .common import (
    SMALL_IMAGES,
    Method,
    build_encoder,
    collapse_stats,
    cpu_heads,
    crop_pairs,
    split_decay,
)

BIAS_LR = 0.0048 / 0.2  # the paper's bias / BN lr relative to the weights'


def projector_8192(d: int, hidden: int, out: int) -> MLP:
    """Barlow Twins' and VICReg's projector: (Linear-BN-ReLU) x 2, then a bias-free Linear."""
    return MLP(d, hidden, out, 3, bn=True, bias=False)


def encode_views(backbone, projector, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """One embedding per view, each view its own batch (its own BN statistics, as two-view
    runs have always had)."""
    return [projector(backbone(v)) for v in views]


class BarlowTwins(Method):
    recipe: ClassVar[str] = "byol"
    sync_bn: ClassVar[bool] = True
    multicrop: ClassVar[bool] = True

    def __init__(self, cfg) -> None:
        super().__init__()
        self.lambd = cfg.barlow_lambda
        if not isinstance(self.lambd, (int, float)) or self.lambd < 0:
            raise ValueError(f"--barlow-lambda must be a number >= 0, got {self.lambd!r}")
        self.backbone = build_encoder(cfg)
        self.projector = projector_8192(self.backbone.feature_dim, cfg.proj_hidden,
                                        cfg.proj_dim)

    @classmethod
    def preset(cls, arch):
        return dict(optimizer="lars", blr=0.2, wd=1.5e-6, warmup_epochs=10, epochs=1000,
                    proj_hidden=8192, proj_dim=8192, barlow_lambda=0.0051)

    @classmethod
    def small_preset(cls, arch):
        # solo-learn's cifar/barlow.yaml (ResNet-18): a 2048-2048-2048 projector, LARS,
        # lambda 0.0051 as the paper. Its lr 0.3 x B / 256 is for 1000 epochs: LARS (eta
        # 0.001) moves each layer by lr x 1e-3 of its norm per step, so a run of ~10 epochs
        # needs a larger lr: blr 4 (the Fashion-MNIST row's; at the paper's 0.2 it gained +1.8,
        # docs/quality.md), crops of 0.5-1, the paper's wd 1.5e-6 (solo-learn's 1e-4 with
        # 0.3-1 crops: +4.6 in 4500 steps) and on the CPU ResNet a 1024-1024-1024 projector
        return dict(SMALL_IMAGES, blr=4.0, crop_scale=(0.5, 1.0),
                    **cpu_heads(arch, dict(proj_hidden=2048, proj_dim=2048),
                                proj_hidden=1024, proj_dim=1024))

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = encode_views(self.backbone, self.projector, views)
        pairs = crop_pairs(len(z), symmetric=True)
        loss = sum(barlow_twins_loss(z[g], z[v], lambd=self.lambd) for g, v in pairs)
        return {"loss": loss / len(pairs), **collapse_stats(z[0])}

    def param_groups(self, cfg) -> list[dict]:
        groups = split_decay(self.named_parameters(), decay_all=bool(cfg.decay_all))
        for g in groups:
            if g.get("lars_exclude"):  # biases and BN: the paper's 0.0048 (x batch / 256)
                g["lr_scale"] = BIAS_LR
        return groups
