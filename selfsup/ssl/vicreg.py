"""VICReg: variance-invariance-covariance regularisation of two views' embeddings.

Bardes et al. 2022. z = expander(backbone(x)) for both views, expander 8192-8192-8192
(Linear-BN-ReLU twice, then a bias-free Linear), and

    L = 25 mean (z1 - z2)^2 + 25 (v(z1) + v(z2)) / 2 + 1 (c(z1) + c(z2))
    v(z) = mean_d relu(1 - sqrt(Var(z_d) + 1e-4)),  c(z) = sum_{i != j} Cov(z)_ij^2 / D

fused: selfsup.kernels.vicreg.vicreg_loss (no D x D covariance when N < D; the statistics
over the global batch across ranks, as the official code gathers the embeddings). Preset:
LARS (biases and BN outside the trust ratio and weight decay), lr 0.2 x batch / 256, wd 1e-6,
10 warm-up epochs of 1000, BYOL's augmentations. --vicreg-weights SIM VAR COV sets the three
coefficients. Multi-crop (--n-local): the loss averaged over common.crop_pairs(symmetric=True).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..kernels.vicreg import vicreg_loss
from .barlowtwins import encode_views, projector_8192
from .common import SMALL_IMAGES, Method, build_encoder, collapse_stats, cpu_heads, crop_pairs


class VICReg(Method):
    recipe: ClassVar[str] = "byol"
    sync_bn: ClassVar[bool] = True
    multicrop: ClassVar[bool] = True

    def __init__(self, cfg) -> None:
        super().__init__()
        w = cfg.vicreg_weights
        if w is None or len(w) != 3 or min(w) < 0:
            raise ValueError(f"--vicreg-weights must be three numbers >= 0 (sim var cov), "
                             f"got {w!r}")
        self.sim, self.var, self.cov = (float(x) for x in w)
        self.backbone = build_encoder(cfg)
        self.projector = projector_8192(self.backbone.feature_dim, cfg.proj_hidden,
                                        cfg.proj_dim)

    @classmethod
    def preset(cls, arch):
        return dict(optimizer="lars", blr=0.2, wd=1e-6, warmup_epochs=10, epochs=1000,
                    proj_hidden=8192, proj_dim=8192, vicreg_weights=(25.0, 25.0, 1.0))

    @classmethod
    def small_preset(cls, arch):
        # solo-learn's cifar/vicreg.yaml (ResNet-18): a 2048-2048-2048 expander, LARS,
        # weights 25 / 25 / 1 as the paper. Its lr 0.3 x B / 256 is for 1000 epochs: LARS
        # (eta 0.001) moves each layer by lr x 1e-3 of its norm per step, so a run of ~10
        # epochs needs a larger lr: blr 4 (the Fashion-MNIST row's; at the paper's 0.2 it
        # gained +3.4, docs/quality.md), crops of 0.5-1, the paper's wd 1e-6 (solo-learn's
        # 1e-4 with 0.3-1 crops: +4.5 in 4500 steps) and on the CPU ResNet a 1024-1024-1024
        # expander
        return dict(SMALL_IMAGES, blr=4.0, crop_scale=(0.5, 1.0),
                    **cpu_heads(arch, dict(proj_hidden=2048, proj_dim=2048),
                                proj_hidden=1024, proj_dim=1024))

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = encode_views(self.backbone, self.projector, views)
        pairs = crop_pairs(len(z), symmetric=True)
        loss = sum(vicreg_loss(z[g], z[v], sim=self.sim, var=self.var, cov=self.cov)
                   for g, v in pairs)
        return {"loss": loss / len(pairs), **collapse_stats(z[0])}
