"""SimCLR: NT-Xent over 2N views with in-batch negatives.

Chen et al. 2020. z = normalize(proj(f(x))) for both views; anchor i's positive is the other
view of its image, its negatives the other 2N - 2 rows, never itself:

    loss = nt_xent(z1, z2, T)        fused: selfsup.kernels.nt_xent, T = 0.1 (0.5 short runs)

Augmentation (recipe "simclr"): crops of 0.08-1 and colour distortion of strength 1.0 (jitter
0.8, 0.8, 0.8, 0.2), as the paper's ImageNet runs; --jitter-strength 0.5 --no-blur is its
CIFAR-10 recipe. LARS at 0.3 x batch / 256; --lr-scaling sqrt --blr 0.075 is the paper's
square-root rule (better for small batches and short runs).

Across ranks (W of them, N rows each) every rank scores only its own 2N anchors against the
2NW gathered keys, as the official code does; the ranks' mean is the loss of the whole batch
and, with DDP averaging, so is the gradient. One process runs the fused kernel on [z1; z2].
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import dist
from ..kernels import nt_xent
from ..models.heads import MLP
from .common import (
    SMALL_IMAGES,
    Method,
    build_encoder,
    collapse_stats,
    crop_pairs,
    crop_scale_kwargs,
    multicrop_kwargs,
)


def local_nt_xent(a1: torch.Tensor, a2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                  offset: int, temperature: float) -> torch.Tensor:
    """NT-Xent of the anchors [a1; a2] (N rows each, L2-normalized) against all keys
    [k1; k2] (M >= N rows each), where a1[i] is k1[offset + i] and a2[i] is k2[offset + i].

    The kernels' public API (selfsup.kernels) has no self-mask at an offset, so this
    materializes the (2N, 2M) logits: W times fewer than the (2NW)^2 of the full loss that
    every rank used to compute, and small next to the encoder (2 x 512 x 8192 floats at
    batch 4096 on 8 GPUs)."""
    n, m = len(a1), len(k1)
    anchors, keys = torch.cat([a1, a2]).float(), torch.cat([k1, k2]).float()
    with torch.autocast(anchors.device.type, enabled=False):
        logits = anchors @ keys.T / temperature  # (2N, 2M)
    rows = torch.arange(2 * n, device=logits.device)
    own = offset + rows % n  # the image's index in the gathered batch
    self_col = own + (rows >= n) * m  # a1[i] is k1[own], a2[i] is k2[own]
    pos_col = own + (rows < n) * m  # the other view
    logits = logits.masked_fill(F.one_hot(self_col, 2 * m).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_col)


class SimCLR(Method):
    recipe: ClassVar[str] = "simclr"
    sync_bn: ClassVar[bool] = True
    multicrop: ClassVar[bool] = True  # an option (--local-crops), not the paper's

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

    @classmethod
    def small_preset(cls, arch):
        # the paper's CIFAR-10 recipe (Chen et al. 2020, appendix B.9): colour distortion of
        # strength 0.5, no blur. Its T 0.5 and LARS are for 500-1000 epochs; in runs of ~10
        # (docs/presets.md) T 0.1 (the paper's ImageNet value) and AdamW at lr 1e-3 x B / 128
        # learned faster on Fashion-MNIST: +5.2 k-NN points in 5500 steps (7.8 CPU min), where
        # the paper's CIFAR settings gave +1.7 in 3500 (4.9 CPU min)
        return dict(SMALL_IMAGES, temperature=0.1, jitter_strength=0.5, optimizer="adamw",
                    lr_scaling="linear", blr=2e-3, wd=1e-4)

    @classmethod
    def recipe_kwargs(cls, cfg) -> dict:
        strength = {} if cfg.jitter_strength is None else {"strength": cfg.jitter_strength}
        return {**crop_scale_kwargs(cfg, "scale"), **strength, **multicrop_kwargs(cfg, cls)}

    def forward(self, views: list[torch.Tensor]) -> dict:
        # multi-crop (--local-crops): NT-Xent of each pair of common.crop_pairs(symmetric),
        # averaged (two views: the one pair)
        z = [self.projector(self.backbone(v)) for v in views]
        pairs = crop_pairs(len(z), symmetric=True)
        loss = sum(self._pair_loss(z[g], z[v]) for g, v in pairs)
        if len(pairs) > 1:
            loss = loss / len(pairs)
        return {"loss": loss, **collapse_stats(z[0])}

    def _pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if dist.is_dist():
            a1, a2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            loss = local_nt_xent(a1, a2, dist.all_gather_with_grad(a1),
                                 dist.all_gather_with_grad(a2), len(z1) * dist.rank(),
                                 self.temperature)
        else:
            loss = nt_xent(z1, z2, self.temperature)
        return loss
