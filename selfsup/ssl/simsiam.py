"""SimSiam: a siamese network with a predictor and stop-gradient; no negatives, no EMA.

Chen and He 2021. For two views: z = f(x) (backbone + 3-layer projector, BN after every
layer, the output BN without affine), p = h(z) (predictor 2048 -> 512 -> 2048):

    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -mean cos(p, z)

Without the stop-gradient the model collapses (loss -1, output std -> 0): the collapse monitor
watches std(normalize(z)), healthy near 1/sqrt(d). The predictor keeps a fixed lr. As the
official code: the projector's hidden width is the backbone's (2048 for ResNet-50; --proj-hidden
sets another), weight decay on every parameter, zero-init residuals.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..models.heads import MLP
from .common import (
    SMALL_IMAGES,
    Method,
    build_encoder,
    collapse_stats,
    cosine_loss,
    cpu_heads,
    crop_pairs,
    is_vit,
    split_decay,
)


class SimSiam(Method):
    recipe: ClassVar[str] = "mocov2"
    sync_bn: ClassVar[bool] = True
    multicrop: ClassVar[bool] = True  # an option (--local-crops), not the paper's

    def __init__(self, cfg) -> None:
        super().__init__()
        self.backbone = build_encoder(cfg)
        d, out = self.backbone.feature_dim, cfg.proj_dim
        hid = cfg.proj_hidden or d  # official: the backbone's width
        layers = cfg.proj_layers or 3  # the paper's CIFAR-10 projector: 2 (small_preset)
        self.projector = MLP(d, hid, out, layers, bn=True, last_bn=True, last_bn_affine=False)
        self.predictor = MLP(out, cfg.pred_hidden, out, 2, bn=True)

    @classmethod
    def preset(cls, arch):
        return dict(optimizer="sgd", blr=0.05, wd=1e-4, momentum=0.9, proj_hidden=None,
                    proj_dim=2048, pred_hidden=512, epochs=100, decay_all=True,
                    zero_init_residual=not is_vit(arch))

    @classmethod
    def small_preset(cls, arch):
        # the paper's CIFAR-10 settings (Chen & He 2021, appendix B): SGD, wd 5e-4, momentum
        # 0.9, the predictor's hidden 512. Its lr 0.03 x B / 256 is for 800 epochs; in runs
        # of ~10, blr 0.2 (the Fashion-MNIST row's lr 0.1 at batch 128) with crops of 0.5-1,
        # the ImageNet preset's 3-layer projector (+5.2 in 4800 steps; with the paper's CIFAR
        # 2 layers +5.0, and +4.9 in 6000) and on the CPU ResNet 1024 / 512 wide (2048 / 2048)
        # zero-init residuals off (common.py, small images)
        return dict(SMALL_IMAGES, optimizer="sgd", blr=0.2, wd=5e-4, momentum=0.9,
                    crop_scale=(0.5, 1.0), pred_hidden=512,
                    zero_init_residual=False,
                    **cpu_heads(arch, dict(proj_hidden=2048, proj_dim=2048),
                                proj_hidden=1024, proj_dim=512))

    def forward(self, views: list[torch.Tensor]) -> dict:
        # multi-crop (--local-crops): every view predicts each global view's z but its own,
        # averaged (two views: exactly the loss above)
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zv) for zv in z]
        pairs = sorted(crop_pairs(len(views), symmetric=False), key=lambda gv: gv[1])
        loss = sum(cosine_loss(p[v], z[g]) / len(pairs) for g, v in pairs)
        return {"loss": loss, **collapse_stats(z[0])}

    def param_groups(self, cfg) -> list[dict]:
        enc = [(n, p) for n, p in self.named_parameters() if not n.startswith("predictor.")]
        # The paper's fixed-lr predictor: the cosine schedule does not apply to it.
        decay_all = bool(cfg.decay_all)
        return (split_decay(enc, decay_all=decay_all)
                + split_decay(self.predictor.named_parameters(), decay_all=decay_all,
                              fixed_lr=True, name="predictor"))
