"""DINO: self-distillation with no labels.

Caron et al. 2021. Student and teacher share the architecture backbone -> DINO head (3-layer
GELU MLP 2048 -> 256 bottleneck -> L2-normalize -> weight-normalized linear to K = 65536).
The teacher is the EMA of the student (0.996 -> 1, cosine). All 2 + n views go through the
student, only the 2 global views through the teacher:

    P_t = softmax((t - c) / tau_t)   (sg)      log P_s = log_softmax(s / tau_s)
    loss = mean over pairs (teacher i, student v != i) of mean_b -sum_k P_t log P_s
    c <- 0.9 c + 0.1 mean(t)   after the loss   fused: selfsup.kernels.DINOLoss

tau_s = 0.1; tau_t warms up 0.04 -> 0.07 over 30 epochs; weight decay 0.04 -> 0.4 (cosine);
each gradient tensor clipped to norm 3.0 (--clip-mode per-param), then the head's last layer
frozen during the first epoch. ViT student: stochastic depth 0.1 (the teacher none),
trunc-normal 0.02 init, bicubic crops. ResNet: SyncBatchNorm under DDP on CUDA. Collapse
shows as a loss stuck at ln K (uniform) or a teacher entropy -> 0 (one prototype): both are
logged.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..kernels import DINOLoss, teacher_temp_schedule
from ..models.heads import DINOHead
from .common import (
    Method,
    build_encoder,
    ema_update,
    frozen_copy,
    is_vit,
    momentum_at,
    multicrop_forward,
    split_decay,
)


class DINO(Method):
    recipe: ClassVar[str] = "dino"
    sync_bn: ClassVar[bool] = True  # official DINO converts ResNet student and teacher
    multicrop: ClassVar[str] = "paper"  # 2 global + n_local views (common.multicrop_kwargs)
    scale_key: ClassVar[str] = "global_scale"  # --crop-scale sets the global crops'

    def __init__(self, cfg) -> None:
        super().__init__()
        vit = is_vit(cfg.arch)
        self.backbone = build_encoder(cfg, **({"pos_embed": "learned"} if vit else {}))
        self.head = DINOHead(self.backbone.feature_dim, cfg.out_dim, hidden_dim=cfg.proj_hidden,
                             bottleneck_dim=cfg.proj_dim,
                             norm_last_layer=cfg.norm_last_layer is not False)
        self.t_backbone, self.t_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.criterion = DINOLoss(cfg.out_dim, student_temp=cfg.temperature,
                                  teacher_temp=cfg.teacher_temp,
                                  center_momentum=cfg.center_momentum, n_global=2)
        spe, total = cfg.extra["steps_per_epoch"], cfg.extra["schedule_steps"]
        warm = min(total, round(cfg.warmup_teacher_temp_epochs * spe))
        self.teacher_temps = teacher_temp_schedule(total, warm, cfg.warmup_teacher_temp,
                                                   cfg.teacher_temp)
        self.freeze_steps = round(cfg.freeze_last_layer_epochs * spe)
        self.base_momentum = self.momentum = cfg.ema_momentum
        # The step lives in a buffer so a resumed run picks the right teacher temperature;
        # forward reads a Python copy (reading the buffer would sync the device every step),
        # re-read from the buffer once after a load_state_dict.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step: int | None = 0
        self.register_load_state_dict_post_hook(DINO._forget_step)

    @staticmethod
    def _forget_step(module, incompatible_keys) -> None:
        module._step = None

    @classmethod
    def preset(cls, arch):
        vit = dict(drop_path=0.1, vit_init="trunc_normal") if is_vit(arch) else {}
        return dict(optimizer="adamw", blr=5e-4, wd=0.04, wd_end=0.4, clip_grad=3.0,
                    clip_mode="per-param", min_lr=1e-6, warmup_epochs=10, epochs=100,
                    temperature=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=30, ema_momentum=0.996, out_dim=65536,
                    proj_hidden=2048, proj_dim=256, n_local=8, freeze_last_layer_epochs=1,
                    center_momentum=0.9, norm_last_layer=True, **vit)

    def forward(self, views: list[torch.Tensor]) -> dict:
        s = multicrop_forward(self.backbone, self.head, views)
        with torch.no_grad():
            t = self.t_head(self.t_backbone(torch.cat(views[:2])))
        if self._step is None:  # once after a resume
            self._step = int(self.step)
        tau_t = float(self.teacher_temps[min(self._step, len(self.teacher_temps) - 1)])
        loss = self.criterion(s, t, teacher_temp=tau_t)
        stats = self.criterion.last_stats
        return {"loss": loss, "teacher_entropy": stats["teacher_entropy"], "kl": stats["kl"],
                "teacher_temp": tau_t, "momentum": self.momentum,
                "uniform_loss": math.log(self.criterion.out_dim)}

    def param_groups(self, cfg) -> list[dict]:
        last = self.head.last_layer
        rest = [(n, p) for n, p in self.named_parameters()
                if not n.startswith("head.last_layer.")]
        # The last layer learns nothing useful before the rest settles: frozen for epoch 1.
        return split_decay(rest) + split_decay(last.named_parameters(),
                                               freeze_steps=self.freeze_steps, name="last_layer")

    def encoder(self):
        # The teacher is what DINO evaluates and releases: the EMA is the better model
        # throughout training (Caron et al. 2021, Fig. 6).
        return self.t_backbone

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step.fill_(step + 1)
        self._step = step + 1
        self.momentum = momentum_at(self.base_momentum, step + 1, total_steps)
        ema_update(self.t_backbone, self.backbone, self.momentum)
        ema_update(self.t_head, self.head, self.momentum)
