"""MoCo v1 / v2: contrastive learning against a momentum key encoder and a queue of keys.

He et al. 2020 (v1), Chen et al. 2020 (v2). Per step, for two views x_q, x_k:

    q = normalize(f_q(x_q))              (N, C)   query encoder, trained
    k = sg(normalize(f_k(x_k)))          (N, C)   key encoder: EMA of f_q, m = 0.999
    loss = CE([q.k, q.queue^T] / T, 0)   fused: selfsup.kernels.info_nce_queue
    queue <- enqueue(all_gather(k))      ring buffer, any batch size (MoCoQueue)

v1: SGD lr 0.03 x batch/256, x0.1 at epochs 120 and 160 of 200 (--lr-schedule step).
v2 = v1 + a 2-layer MLP head, T = 0.2, stronger augmentation, cosine lr. Both decay every
parameter (biases and BN too), as the official code. The initial random queue is the same on
every rank (engine.distributed broadcasts rank 0's state when wrapping).

Shuffle BN: BatchNorm statistics of a sub-batch leak which samples share it, so the key
encoder sees its batch shuffled across GPUs and unshuffles its outputs. Across ranks this is
real (all_gather, a shared permutation, local slice, all_gather back). On one process it is
emulated by running both encoders on groups of >= 32 samples (per-group BN statistics), the
key groups drawn from a shuffled batch; with fewer than 64 samples there is one group and no
emulation.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import dist
from ..kernels import MoCoQueue, info_nce_queue
from ..models.heads import MLP
from .common import SMALL_IMAGES, Method, build_encoder, collapse_stats, ema_update, frozen_copy

GROUP = 32  # samples per emulated "GPU" for single-process shuffle BN
QUEUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # by --precision


class MoCo(Method):
    """MoCo v2 (the default variant); MoCoV1 changes the head, temperature and recipe."""

    version: ClassVar[int] = 2
    recipe: ClassVar[str] = "mocov2"

    def __init__(self, cfg) -> None:
        super().__init__()
        self.temperature, self.momentum = cfg.temperature, cfg.ema_momentum
        self.shuffle_bn = bool(cfg.shuffle_bn)
        self.backbone = build_encoder(cfg)
        d = self.backbone.feature_dim
        # v1: one linear layer; v2: Linear-ReLU-Linear with the backbone's width as hidden.
        self.head = MLP(d, cfg.proj_hidden or d, cfg.proj_dim, 1 if self.version == 1 else 2,
                        bn=False)
        self.key_backbone, self.key_head = frozen_copy(self.backbone), frozen_copy(self.head)
        # keys stored in the training dtype, so the fused loss runs its bf16/fp16 kernels
        # (an fp32 queue would promote the whole loss to fp32; see MoCoQueue)
        self.queue = MoCoQueue(cfg.proj_dim, cfg.queue_size,
                               dtype=QUEUE_DTYPES.get(cfg.precision, torch.float32))
        self._pending: torch.Tensor | None = None  # keys of this step, enqueued after it

    @classmethod
    def preset(cls, arch):
        v1 = dict(lr_schedule="step", lr_milestones=(120.0, 160.0)) if cls.version == 1 else {}
        return dict(temperature=0.07 if cls.version == 1 else 0.2, queue_size=65536,
                    ema_momentum=0.999, proj_dim=128,
                    optimizer="sgd", blr=0.03, wd=1e-4, momentum=0.9, epochs=200,
                    shuffle_bn=True, decay_all=True, **v1)

    @classmethod
    def small_preset(cls, arch):
        # the official MoCo CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo):
        # T 0.1, K 4096, m 0.99, a cosine lr (v1 too). Its symmetric loss is not implemented
        # here (docs/presets.md). Its lr 0.06 at batch 512 (blr 0.03) and wd 5e-4 are for 200
        # epochs; in runs of ~10, blr 0.4 with wd 1e-4 (the Fashion-MNIST rows' lr 0.1 at
        # batch 64) and crops of 0.5-1: v2 +4.7 in 5500 steps (6.9 CPU min)
        v1 = dict(lr_schedule="cosine", lr_milestones=None) if cls.version == 1 else {}
        return dict(SMALL_IMAGES, blr=0.4, wd=1e-4, crop_scale=(0.5, 1.0), temperature=0.1,
                    queue_size=4096, ema_momentum=0.99, **v1)

    # ------------------------------------------------------------------ encoders
    def query(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._groups(len(x))
        if groups == 1:
            return self.head(self.backbone(x))
        return torch.cat([self.head(self.backbone(c)) for c in x.chunk(groups)])

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        def f(t):
            return self.key_head(self.key_backbone(t))

        if self.shuffle_bn and dist.is_dist():
            n, r = len(x), dist.rank()
            x_all = dist.all_gather_nograd(x)
            perm = dist.broadcast(torch.randperm(len(x_all), device=x.device))
            k_local = f(x_all[perm[r * n:(r + 1) * n]])
            k_all = dist.all_gather_nograd(k_local)[torch.argsort(perm)]
            return k_all[r * n:(r + 1) * n]
        groups = self._groups(len(x))
        if groups == 1:
            return f(x)
        perm = torch.randperm(len(x), device=x.device)
        k = torch.cat([f(c) for c in x[perm].chunk(groups)])
        return k[torch.argsort(perm)]

    def _groups(self, n: int) -> int:
        if not self.shuffle_bn or dist.is_dist():
            return 1
        return max(1, min(8, n // GROUP))

    # ------------------------------------------------------------------ contract
    def forward(self, views: list[torch.Tensor]) -> dict:
        q = self.query(views[0])
        k = F.normalize(self.key(views[1]), dim=1).to(self.queue.queue.dtype)
        loss = info_nce_queue(q, k, self.queue.queue, self.temperature)
        keys = dist.all_gather_nograd(k)  # --accum-steps: every micro-batch's keys join
        self._pending = keys if self._pending is None else torch.cat([self._pending, keys])
        return {"loss": loss, **collapse_stats(q)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_head, self.head, self.momentum)
        if self._pending is not None:
            self.queue.enqueue(self._pending)
            self._pending = None


class MoCoV1(MoCo):
    version = 1
    recipe = "mocov1"
