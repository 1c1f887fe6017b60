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

--centering sinkhorn (DINOv2, Oquab et al. 2023): P_t = Sinkhorn-Knopp of the teacher logits
over the global batch (epsilon = tau_t, 3 iterations), no center EMA. `sinkhorn_center`
gives it as a center of the same fused loss (derivation there).

Under torch.compile(fullgraph=True) the whole forward is one graph that does not recompile
as training advances: the teacher temperature and the logged momentum are computed on the
device from the `step` buffer (no host read, no Python number that changes per step).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .. import dist
from ..kernels import DINOLoss, teacher_temp_schedule
from ..kernels.dino_loss import _dino_loss_with_stats
from ..models.heads import DINOHead
from .common import (
    SMALL_IMAGES,
    Method,
    build_encoder,
    ema_update,
    frozen_copy,
    is_vit,
    momentum_at,
    multicrop_forward,
    split_decay,
)

CENTERINGS = ("center", "sinkhorn")


# ----------------------------------------------------------------------------- Sinkhorn
def _lse_over_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (K,) logsumexp over the rows of every rank (x is overwritten). The max is
    per column: a prototype far from every sample would underflow under a global max. A rank
    with no rows (no masked patch) still joins both all-reduces."""
    m = x.amax(0) if x.shape[0] else x.new_full(x.shape[1:], float("-inf"))
    if dist.is_dist():
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
    s = dist.all_reduce_sum(x.sub_(m).exp_().sum(0))
    return m + s.log()


@torch.no_grad()
def sinkhorn_center(logits: torch.Tensor, temperature, n_iters: int = 3) -> torch.Tensor:
    """A (1, K) center c with softmax((logits - c) / temperature) == sinkhorn_knopp(logits,
    temperature, n_iters): DINOv2's Sinkhorn-Knopp teacher, fed to the centered DINO / iBOT
    losses unchanged.

    Why a center: Sinkhorn-Knopp scales Q = exp(logits / eps) by a factor per prototype k
    (row normalisations) and one per sample b (column normalisations, the last one making
    each sample's codes sum to 1), so Q_bk = exp(logits_bk / eps) r_k c_b with
    sum_k Q_bk = 1, i.e. Q_b = softmax_k(logits_bk / eps + log r_k): the center
    -eps log r_k (the per-sample factor is the softmax's own normalisation). Iterating on
    log r and log c (logsumexp) is exact in fp32 where exp(logits / eps) itself under- and
    overflows (SwAV's sinkhorn_knopp pays float64 for that); the fused loss then reads the
    logits in their own dtype, as with the EMA center: no (N, K) probability tensor is
    stored. The sums over samples are all-reduced (each rank gets the center of one process
    on the concatenated batch); the per-sample sums are local.

    Args:
        logits: (N, K) teacher logits of this rank (all global crops together; N may be 0).
        temperature: epsilon = the teacher temperature: a float or a 0-d tensor.
        n_iters: alternating normalisations (DINOv2: 3).
    Returns:
        (1, K) center, float64 for float64 logits, else float32.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"sinkhorn_center: logits must be a 2-D (N, K) tensor with K >= 1, "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"sinkhorn_center: n_iters must be an int >= 1, got {n_iters!r}")
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"sinkhorn_center: temperature must be > 0, got {temperature!r}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.detach().to(acc) / temperature
    log_c = None  # per-sample log factors; the first row normalisation sees none
    for it in range(n_iters):
        log_r = -_lse_over_rows(z.clone() if log_c is None else z + log_c[:, None])
        if it < n_iters - 1:
            y = z + log_r  # per row, local: in place, so z and one temporary are all
            m = y.amax(1, keepdim=True)
            log_c = -(m.squeeze(1) + y.sub_(m).exp_().sum(1).log())
    # no rows on any rank (no masked patch anywhere): any finite center, the loss is 0
    log_r = torch.where(torch.isfinite(log_r), log_r, torch.zeros_like(log_r))
    return (-temperature * log_r).reshape(1, -1)


def sinkhorn_dino_loss(s: torch.Tensor, t: torch.Tensor, student_temp, teacher_temp,
                       n_iters: int = 3, n_global: int = 2) -> tuple[torch.Tensor, dict]:
    """The fused DINO loss of student logits s (V*B, K) against DINOv2's Sinkhorn teacher of
    t (n_global*B, K): (loss, {"teacher_entropy", "kl"}), the entropy of the Sinkhorn
    probabilities from the loss's own teacher pass."""
    c = sinkhorn_center(t, teacher_temp, n_iters)
    loss, ent, _ = _dino_loss_with_stats(s, t, c, student_temp=student_temp,
                                         teacher_temp=teacher_temp, n_global=n_global)
    ent = ent.detach()
    return loss, {"teacher_entropy": ent, "kl": loss.detach() - ent}


# ----------------------------------------------------------------------------- method
# DINO for images <= 64 px. The paper has no CIFAR pre-training; solo-learn's cifar/dino.yaml
# keeps the heads (2048 / 256) with K = 4096 prototypes. Fewer, larger local crops: at 32 px a
# local crop is 16 px (recipes.dino_local_size), and the paper's 0.05-0.4 of the image would
# be 7-20 px of it, so 2 locals of 0.2-0.5 below global crops of 0.5-1 (the Fashion-MNIST
# trials: 2 locals and 0.5-1 globals learnt, docs/quality.md). iBOT and DINOv2 start here.
DINO_SMALL = dict(SMALL_IMAGES, out_dim=4096, n_local=2, crop_scale=(0.5, 1.0),
                  local_crop_scale=(0.2, 0.5))


class DINO(Method):
    recipe: ClassVar[str] = "dino"
    sync_bn: ClassVar[bool] = True  # official DINO converts ResNet student and teacher
    multicrop: ClassVar[str] = "paper"  # 2 global + n_local views (common.multicrop_kwargs)
    scale_key: ClassVar[str] = "global_scale"  # --crop-scale sets the global crops'

    def __init__(self, cfg) -> None:
        super().__init__()
        if cfg.koleo_weight:  # DINOv2's regulariser: not silently dropped
            raise ValueError(f"--koleo-weight {cfg.koleo_weight} is dinov2's, not dino's: use "
                             f"--method dinov2")
        vit = is_vit(cfg.arch)
        self.backbone = build_encoder(cfg, **({"pos_embed": "learned"} if vit else {}))
        self.head = DINOHead(self.backbone.feature_dim, cfg.out_dim, hidden_dim=cfg.proj_hidden,
                             bottleneck_dim=cfg.proj_dim,
                             norm_last_layer=cfg.norm_last_layer is not False)
        self.t_backbone, self.t_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.criterion = DINOLoss(cfg.out_dim, student_temp=cfg.temperature,
                                  teacher_temp=cfg.teacher_temp,
                                  center_momentum=cfg.center_momentum, n_global=2)
        self.centering = cfg.centering or "center"
        if self.centering not in CENTERINGS:
            raise ValueError(f"--centering must be one of {', '.join(CENTERINGS)}, got "
                             f"{cfg.centering!r}")
        self.sinkhorn_iters = cfg.sinkhorn_iters or 3  # DINOv2's 3
        spe, total = cfg.extra["steps_per_epoch"], cfg.extra["schedule_steps"]
        warm = min(total, round(cfg.warmup_teacher_temp_epochs * spe))
        # Schedules as device buffers indexed by the `step` buffer: forward reads neither on
        # the host (a sync per step) nor as a Python number (a recompile per step under
        # torch.compile). Not persistent: rebuilt from the config, old checkpoints load.
        temps = teacher_temp_schedule(total, warm, cfg.warmup_teacher_temp, cfg.teacher_temp)
        self.register_buffer("teacher_temps", temps.float(), persistent=False)
        self.freeze_steps = round(cfg.freeze_last_layer_epochs * spe)
        self.base_momentum = self.momentum = cfg.ema_momentum
        self.total_steps = total
        # the optimizer steps taken: saved with the model, so a resumed run continues the
        # teacher temperature where it stopped
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @classmethod
    def preset(cls, arch):
        vit = dict(drop_path=0.1, vit_init="trunc_normal") if is_vit(arch) else {}
        return dict(optimizer="adamw", blr=5e-4, wd=0.04, wd_end=0.4, clip_grad=3.0,
                    clip_mode="per-param", min_lr=1e-6, warmup_epochs=10, epochs=100,
                    temperature=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=30, ema_momentum=0.996, out_dim=65536,
                    proj_hidden=2048, proj_dim=256, n_local=8, freeze_last_layer_epochs=1,
                    center_momentum=0.9, norm_last_layer=True, centering="center", **vit)

    @classmethod
    def small_preset(cls, arch):
        return dict(DINO_SMALL)

    # ------------------------------------------------------------------ per-step values
    def teacher_temp_now(self) -> torch.Tensor:
        """This step's teacher temperature, a 0-d device tensor (index_select, not [step]:
        indexing with a 0-d integer tensor reads it on the host)."""
        i = self.step.clamp(max=len(self.teacher_temps) - 1).reshape(1)
        return self.teacher_temps.index_select(0, i).reshape(())

    def momentum_now(self) -> torch.Tensor:
        """The EMA momentum of the last update (common.momentum_at of `step`), on the device:
        only logged."""
        if self.total_steps <= 1:
            return torch.full((), self.base_momentum, device=self.step.device)
        t = self.step.clamp(0, self.total_steps - 1).float() / (self.total_steps - 1)
        return 1.0 - (1.0 - self.base_momentum) * (torch.cos(math.pi * t) + 1) / 2

    # ------------------------------------------------------------------ the loss
    def distill_loss(self, s: torch.Tensor, t: torch.Tensor, tau_t: torch.Tensor,
                     ) -> tuple[torch.Tensor, dict]:
        """DINO's loss of student logits s (V*B, K) against teacher logits t (2*B, K), with
        the --centering of the teacher, and its collapse statistics (device tensors)."""
        if self.centering == "center":
            loss = self.criterion(s, t, teacher_temp=tau_t)  # updates the EMA center
            return loss, dict(self.criterion.last_stats)
        return sinkhorn_dino_loss(s, t, self.criterion.student_temp, tau_t,
                                  self.sinkhorn_iters)

    def forward(self, views: list[torch.Tensor]) -> dict:
        s = multicrop_forward(self.backbone, self.head, views)
        with torch.no_grad():
            t = self.t_head(self.t_backbone(torch.cat(views[:2])))
        tau_t = self.teacher_temp_now()
        loss, stats = self.distill_loss(s, t, tau_t)
        return {"loss": loss, **stats, "teacher_temp": tau_t, "momentum": self.momentum_now(),
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
        self.momentum = momentum_at(self.base_momentum, step + 1, total_steps)
        ema_update(self.t_backbone, self.backbone, self.momentum)
        ema_update(self.t_head, self.head, self.momentum)
