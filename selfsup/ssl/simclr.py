"""SimCLR: NT-Xent over 2N views with in-batch negatives.

Chen et al. 2020. z = normalize(proj(f(x))) for both views; anchor i's positive is the other
view of its image, its negatives the other 2N - 2 rows, never itself:

    loss = nt_xent(z1, z2, T)        fused: selfsup.kernels.nt_xent, T = 0.1 (0.5 short runs)

Across ranks the features are all-gathered with their gradient, so the loss equals the
single-process loss on the concatenated batch (every rank computes the whole 2NW x 2NW loss).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .. import dist
from ..kernels import nt_xent
from ..models.heads import MLP
from .common import Method, build_encoder, collapse_stats


class SimCLR(Method):
    recipe: ClassVar[str] = "mocov2"
    sync_bn: ClassVar[bool] = True

    def __init__(self, cfg) -> None:
        super().__init__()
        self.temperature = cfg.temperature
        self.backbone = build_encoder(cfg)
        d = self.backbone.feature_dim
        self.projector = MLP(d, cfg.proj_hidden, cfg.proj_dim, 2, bn=True)

    @classmethod
    def preset(cls, arch):
        return dict(optimizer="lars", blr=0.3, wd=1e-6, temperature=0.1, proj_hidden=2048,
                    proj_dim=128, warmup_epochs=10, epochs=100)

    def forward(self, views: list[torch.Tensor]) -> dict:
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        loss = nt_xent(dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2),
                       self.temperature)
        return {"loss": loss, **collapse_stats(z1)}
