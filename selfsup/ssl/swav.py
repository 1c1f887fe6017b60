"""SwAV: swapped prediction of the Sinkhorn-Knopp codes of other views.

Caron et al. 2020. backbone -> projection MLP (2048 -> BN -> ReLU -> 128) -> L2-normalize ->
K = 3000 prototypes (a bias-free Linear whose rows are re-normalised after every step, so the
scores are cosines). V = 2 global (224 px, 0.14-1) + 6 local (96 px, 0.05-0.14) views run
through the network, consecutive same-size views as one batch (common.multicrop_forward). For
each global view a, its codes (no gradient) are predicted from every other view:

    q_a = sinkhorn_knopp(s_a, eps 0.05, 3 iterations)       equipartitioned over the batch
    L   = mean_a mean_{v != a} mean_b -sum_k q_a log softmax(s_v / 0.1)

fused: selfsup.kernels.swav (the Sinkhorn sums all-reduced across ranks). Small batches get a
queue of the last 3840 global-view embeddings (per-rank share of it, as the official code),
scored against today's prototypes and put before the batch in the Sinkhorn input, so the
equipartition is over ~4k rows; it fills from epoch 15 (the paper's batch-256 setting) and
joins once full. The prototypes are frozen for the first epoch, counted in optimizer steps
(param-group freeze_steps, so --steps runs freeze them too). Preset: LARS, lr 0.3 x batch / 256
(4.8 at 4096), wd 1e-6, 10 warm-up epochs of 800, SyncBN. The queue and its fill level are
buffers: a resumed run continues with the same queue.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..kernels.swav import sinkhorn_knopp, swav_loss
from ..models.heads import MLP
from .common import SMALL_IMAGES, Method, build_encoder, cpu_heads, multicrop_forward, split_decay

N_ASSIGN = 2  # the codes are computed for the 2 global views (crops_for_assign 0 1)


class SwAVHead(nn.Module):
    """projection MLP -> L2-normalize -> prototypes. forward: (scores (B, K), z (B, D))."""

    def __init__(self, in_dim: int, hidden: int, out: int, n_prototypes: int) -> None:
        super().__init__()
        self.projector = MLP(in_dim, hidden, out, 2, bn=True)
        self.prototypes = nn.Linear(out, n_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scores and embeddings in one tensor, so multicrop_forward can concatenate them
        z = F.normalize(self.projector(x), dim=1)
        return torch.cat([self.prototypes(z), z], dim=1)


class SwAV(Method):
    recipe: ClassVar[str] = "swav"
    sync_bn: ClassVar[bool] = True
    multicrop: ClassVar[str] = "paper"
    scale_key: ClassVar[str] = "global_scale"

    def __init__(self, cfg) -> None:
        super().__init__()
        for flag, v, ok in (("--temperature", cfg.temperature, (cfg.temperature or 0) > 0),
                            ("--sinkhorn-eps", cfg.sinkhorn_eps, (cfg.sinkhorn_eps or 0) > 0),
                            ("--sinkhorn-iters", cfg.sinkhorn_iters,
                             isinstance(cfg.sinkhorn_iters, int) and cfg.sinkhorn_iters >= 1),
                            ("--out-dim", cfg.out_dim,
                             isinstance(cfg.out_dim, int) and cfg.out_dim >= 1),
                            ("--queue-size", cfg.queue_size,
                             isinstance(cfg.queue_size, int) and cfg.queue_size >= 0)):
            if not ok:
                raise ValueError(f"{flag} is invalid for swav: got {v!r}")
        self.temperature, self.eps, self.iters = cfg.temperature, cfg.sinkhorn_eps, \
            cfg.sinkhorn_iters
        self.backbone = build_encoder(cfg)
        self.head = SwAVHead(self.backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim,
                             cfg.out_dim)
        spe = cfg.extra["steps_per_epoch"]
        self.freeze_steps = round(cfg.freeze_last_layer_epochs * spe)
        self.queue_start = round(cfg.queue_start_epochs * spe)
        # each rank keeps its share of the queue (the official code's queue_length // world)
        q_len = cfg.queue_size // dist.world_size()
        self.register_buffer("queue", torch.zeros(N_ASSIGN, q_len, cfg.proj_dim))
        self.register_buffer("queue_fill", torch.zeros((), dtype=torch.long))  # rows written
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step: int | None = 0
        self._fill: int | None = 0
        self._queue_used = False  # whether this step's codes saw the queue (logged)
        self.register_load_state_dict_post_hook(SwAV._forget_counters)

    @classmethod
    def preset(cls, arch):
        # min_lr: the official final_lr (absolute, at the paper's batch 4096 and lr 4.8)
        return dict(optimizer="lars", blr=0.3, wd=1e-6, warmup_epochs=10, epochs=800,
                    min_lr=0.0048,
                    temperature=0.1, sinkhorn_eps=0.05, sinkhorn_iters=3, out_dim=3000,
                    proj_hidden=2048, proj_dim=128, n_local=6, queue_size=3840,
                    queue_start_epochs=15, freeze_last_layer_epochs=1)

    @classmethod
    def small_preset(cls, arch):
        # no official CIFAR recipe; solo-learn's cifar/swav.yaml (ResNet-18): the 2 crops of
        # 32 px without multi-crop (at 28-32 px the paper's 16-px locals of 0.05-0.14 are
        # 6-10 px; on Fashion-MNIST they cost more than they gave, docs/quality.md), LARS at
        # lr 0.6 x B / 256, wd 1e-6, K 3000, queue 3840 from epoch 50, prototypes frozen for
        # 2 epochs, T 0.1. For runs of ~10 epochs: LARS at blr 4 as Barlow Twins' (its lr is
        # for 1000 epochs), K = 300 prototypes (the paper's 3000 are for ImageNet's 1000
        # classes; small-image sets have 10-100) with a 1024-row queue (> K / batch rows of
        # codes per step), crops of 0.5-1 and on the CPU ResNet a 1024-wide projector: the
        # Fashion-MNIST row's settings (docs/quality.md)
        return dict(SMALL_IMAGES, n_local=0, blr=4.0, crop_scale=(0.5, 1.0), out_dim=300,
                    queue_size=1024,
                    queue_start_epochs=50, freeze_last_layer_epochs=2,
                    **cpu_heads(arch, proj_hidden=1024))

    @staticmethod
    def _forget_counters(module, incompatible_keys) -> None:
        module._step = module._fill = None

    def _counters(self) -> tuple[int, int]:
        # Python copies of the step and fill buffers: reading a buffer every step would sync
        # the device; re-read once after a load_state_dict (a resume)
        if self._step is None:
            self._step, self._fill = int(self.step), int(self.queue_fill)
        return self._step, self._fill

    @torch.no_grad()
    def _codes(self, scores: torch.Tensor, z: torch.Tensor, b: int) -> torch.Tensor:
        """(N_ASSIGN, B, K) codes of the global views. A full queue joins the Sinkhorn input
        (only the batch's rows are kept); from queue_start on, this batch's global embeddings
        are pushed in front of it (the official ring shift, newest first)."""
        step, fill = self._counters()
        q_len = self.queue.shape[1]
        active = q_len > 0 and step >= self.queue_start
        full = active and fill >= q_len
        self._queue_used = full
        codes = []
        for a in range(N_ASSIGN):
            s = scores[a * b:(a + 1) * b].float()
            if full:
                s = torch.cat([self.queue[a] @ self.head.prototypes.weight.float().T, s])
            codes.append(sinkhorn_knopp(s, self.eps, self.iters)[-b:])
        if active and self.training:
            n = min(b, q_len)
            self.queue[:, n:] = self.queue[:, :q_len - n].clone()
            self.queue[:, :n] = z[:N_ASSIGN * b].float().view(N_ASSIGN, b, -1)[:, :n]
            self.queue_fill.add_(n)
            self._fill = fill + n
        return torch.stack(codes)

    def forward(self, views: list[torch.Tensor]) -> dict:
        out = multicrop_forward(self.backbone, self.head, views)
        k = self.head.prototypes.out_features
        scores, z = out[:, :k], out[:, k:]
        b = views[0].shape[0]
        codes = self._codes(scores.detach(), z.detach(), b)
        loss = swav_loss(scores, codes, len(views), self.temperature)
        return {"loss": loss, "queue_used": float(self._queue_used),
                "code_max": codes.max(dim=2).values.mean()}

    def param_groups(self, cfg) -> list[dict]:
        rest = [(n, p) for n, p in self.named_parameters()
                if not n.startswith("head.prototypes.")]
        # the paper freezes the prototypes for the first epoch (freeze_prototypes_niters)
        return (split_decay(rest, decay_all=bool(cfg.decay_all))
                + split_decay(self.head.prototypes.named_parameters(),
                              freeze_steps=self.freeze_steps, name="prototypes"))

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step.fill_(step + 1)
        self._counters()
        self._step = step + 1
        self.head.normalize_prototypes()  # the scores stay cosines
