"""iBOT: image BERT pre-training with an online tokenizer.

Zhou et al. 2022. DINO's self-distillation of the cls token plus a masked-image-modelling
loss on the patch tokens, where the EMA teacher is the "tokenizer". Per step, with B images:

    masks (2B, N) = block masks of the 2 global crops (selfsup.ssl.masking, host, no sync)
    student: global crops with the masked patch embeddings replaced by the mask token
             (before the position embedding), local crops unmasked
    teacher: the global crops unmasked
    L_cls   = DINO's loss over the crop pairs (teacher crop i, student crop v != i)
    L_patch = per global crop, per image, the mean over its masked tokens j of
              -sum_k P_t(patch j of the same crop) log P_s(patch j of the masked crop)
    loss    = lambda1 L_cls + lambda2 L_patch          (iBOT: 1, 1)

Each global crop's patches are matched with the teacher's patches of the SAME crop (not the
other one: the positions must align). The patch head (the cls head itself when shared, iBOT's
ViT-S/B default, or a head of its own) runs on the masked tokens only, as DINOv2 does, so the
(M, K) logits exist for the M masked tokens rather than all 2B·N (iBOT computes all of them and
weights the unmasked by 0: the same loss). Both losses centre the teacher (DINOLoss /
iBOTPatchLoss: c <- 0.9 c + 0.1 mean t) and warm its temperature up 0.04 -> 0.07.

Preset (iBOT ViT-S/16, ImageNet-1k, 800 epochs): AdamW, blr 5e-4, wd 0.04 -> 0.4 (cosine),
10 warm-up epochs, min lr 1e-6, clip 3.0 per tensor, last layer frozen for epoch 1, EMA 0.996
-> 1, K = 8192 for both heads (shared), norm_last_layer False, 2 global crops of 0.25-1 and 10
locals of 0.05-0.25, drop path 0.1; masks: ratio U[0.1, 0.5] (pred_ratio 0.3 +- 0.2) on half
the images (its pred_ratio list [0, 0.3] picks 0 or 0.3 per image).

Hooks for subclasses (DINOv2): `cls_loss`, `patch_loss` (teacher centering), `extra_losses`
(KoLeo), `masking` (the mask draw).

torch.compile: `forward` = `step_masks` (the mask draw, its counts, the masked-row indices:
Python on the host by design, masking.py) + `masked_forward`, the rest, which compiles as one
graph (fullgraph=True) that does not recompile as training advances. As DINO's, its teacher
temperatures and logged momentum are computed on the device from the `step` buffer (a Python
number that changes per step is a guard: a recompile per step), and the number of masked
tokens M is marked dynamic (it changes every step; dynamo still gives M = 0 and M = 1 graphs
of their own). `forward` itself compiles with one graph break, at `step_masks`, which is
excluded from tracing (dynamo fails inside the draw: random.Random, Python lists, and then
int(masks.sum())), so fullgraph=True of `forward` is refused by design.
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import ClassVar

import torch
from torch import nn

from .. import dist
from ..kernels import DINOLoss, iBOTPatchLoss, teacher_temp_schedule
from ..models.heads import DINOHead
from .common import (
    Method,
    build_encoder,
    ema_update,
    frozen_copy,
    is_vit,
    momentum_at,
    split_decay,
)
from .dino import DINO, DINO_SMALL
from .masking import BlockMasking, mask_rng


class IBOT(Method):
    recipe: ClassVar[str] = "dino"  # iBOT trains on DINO's augmentations (its crop scales)
    multicrop: ClassVar[str] = "paper"  # 2 global + n_local views (common.multicrop_kwargs)
    scale_key: ClassVar[str] = "global_scale"  # --crop-scale sets the global crops'

    def __init__(self, cfg) -> None:
        super().__init__()
        if not is_vit(cfg.arch):
            raise ValueError(f"{cfg.method} needs a ViT backbone (--arch vit_*): the masked "
                             f"patch loss reads patch tokens; got --arch {cfg.arch}")
        if type(self) is IBOT:  # dinov2's flags would otherwise be silently ignored here
            for flag, v, ok in (("--centering", cfg.centering, cfg.centering in (None, "center")),
                                ("--koleo-weight", cfg.koleo_weight, not cfg.koleo_weight)):
                if not ok:
                    raise ValueError(f"{flag} {v} is dinov2's, not ibot's (iBOT centres its "
                                     f"teachers by an EMA and has no KoLeo): use --method dinov2")
        self.backbone = build_encoder(cfg, pos_embed="learned", mask_token=True)
        self.shared_head = not cfg.separate_patch_head
        patch_dim = self._patch_out_dim(cfg)
        head_kw = dict(hidden_dim=cfg.proj_hidden, bottleneck_dim=cfg.proj_dim,
                       norm_last_layer=cfg.norm_last_layer is not False)
        d = self.backbone.feature_dim
        self.head = DINOHead(d, cfg.out_dim, **head_kw)
        if not self.shared_head:  # no attribute at all when shared: one set of weights
            self.patch_head = DINOHead(d, patch_dim, **head_kw)
        self.t_backbone, self.t_head = frozen_copy(self.backbone), frozen_copy(self.head)
        if not self.shared_head:
            self.t_patch_head = frozen_copy(self.patch_head)
        self.criterion = DINOLoss(cfg.out_dim, student_temp=cfg.temperature,
                                  teacher_temp=cfg.teacher_temp,
                                  center_momentum=cfg.center_momentum, n_global=2)
        self.patch_criterion = iBOTPatchLoss(patch_dim, student_temp=cfg.temperature,
                                             teacher_temp=self._patch_temps(cfg)[1],
                                             center_momentum=cfg.center_momentum)
        self.cls_weight = 1.0  # iBOT's lambda1
        self.patch_weight = 1.0 if cfg.patch_loss_weight is None else float(cfg.patch_loss_weight)
        if not (self.patch_weight >= 0 and math.isfinite(self.patch_weight)):
            raise ValueError(f"--patch-loss-weight must be a finite float >= 0, "
                             f"got {cfg.patch_loss_weight}")

        spe, total = cfg.extra["steps_per_epoch"], cfg.extra["schedule_steps"]
        warm = min(total, round(cfg.warmup_teacher_temp_epochs * spe))
        # Device buffers indexed by the `step` buffer, as DINO's (not persistent: rebuilt from
        # the config). float64 as computed: on the CPU the loss reads the very float the
        # schedule gave (results bit-identical to passing float(temps[i])); the kernels take a
        # device tensor to their accumulation dtype themselves.
        self.register_buffer("teacher_temps", teacher_temp_schedule(
            total, warm, cfg.warmup_teacher_temp, cfg.teacher_temp), persistent=False)
        self.register_buffer("teacher_patch_temps", teacher_temp_schedule(
            total, warm, *self._patch_temps(cfg)), persistent=False)
        self.total_steps = total  # momentum_now's schedule length
        self.freeze_steps = round(cfg.freeze_last_layer_epochs * spe)
        self.base_momentum = self.momentum = cfg.ema_momentum

        ratio = cfg.mask_ratio_range if cfg.mask_ratio_range is not None else (0.1, 0.5)
        prob = 0.5 if cfg.mask_probability is None else cfg.mask_probability
        BlockMasking((1, 1), ratio, probability=prob)  # bad flags fail here, not at step 1
        self.mask_ratio, self.mask_probability = tuple(ratio), float(prob)
        self.mask_seed = int(cfg.seed)
        self._maskings: dict[tuple[int, int], BlockMasking] = {}
        self._mask_key = (-1, 0)  # (step, micro-batch) of the last draw
        # The step lives in a buffer so a resumed run picks the right temperatures (and masks);
        # forward reads a Python copy, re-read from the buffer once after a load_state_dict.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step: int | None = 0
        self.register_load_state_dict_post_hook(IBOT._forget_step)

    @staticmethod
    def _forget_step(module, incompatible_keys) -> None:
        module._step = None

    @staticmethod
    def _patch_out_dim(cfg) -> int:
        """The patch head's K: --patch-out-dim, which a shared head must match to --out-dim."""
        k = cfg.patch_out_dim or cfg.out_dim
        if cfg.separate_patch_head:
            return k
        given = "patch_out_dim" in cfg.extra.get("cli_keys", ())
        if given and k != cfg.out_dim:
            raise ValueError(f"--patch-out-dim {k} needs --separate-patch-head: a shared head "
                             f"has --out-dim {cfg.out_dim} outputs for both losses")
        return cfg.out_dim

    @staticmethod
    def _patch_temps(cfg) -> tuple[float, float]:
        """(start, end) of the patch teacher temperature: the cls one's unless given."""
        start = cfg.warmup_teacher_patch_temp
        end = cfg.teacher_patch_temp
        return (cfg.warmup_teacher_temp if start is None else start,
                cfg.teacher_temp if end is None else end)

    @classmethod
    def preset(cls, arch):
        vit = dict(drop_path=0.1, vit_init="trunc_normal") if is_vit(arch) else {}
        return dict(optimizer="adamw", blr=5e-4, wd=0.04, wd_end=0.4, clip_grad=3.0,
                    clip_mode="per-param", min_lr=1e-6, warmup_epochs=10, epochs=800,
                    temperature=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
                    warmup_teacher_temp_epochs=30, ema_momentum=0.996, out_dim=8192,
                    patch_out_dim=8192, separate_patch_head=False, proj_hidden=2048,
                    proj_dim=256, n_local=10, freeze_last_layer_epochs=1, center_momentum=0.9,
                    norm_last_layer=False, mask_ratio_range=(0.1, 0.5), mask_probability=0.5,
                    patch_loss_weight=1.0, crop_scale=(0.25, 1.0),
                    local_crop_scale=(0.05, 0.25), **vit)

    @classmethod
    def small_preset(cls, arch):
        # no CIFAR recipe in the paper: DINO's small preset (dino.DINO_SMALL: 2 locals of
        # 0.2-0.5, globals of 0.5-1, K 4096) with the patch head as wide as the shared one
        return dict(DINO_SMALL, patch_out_dim=DINO_SMALL["out_dim"])

    # ------------------------------------------------------------------------- hooks
    def masking(self, grid: tuple[int, int]) -> BlockMasking:
        """The mask generator for a patch grid (iBOT: each image independently)."""
        if grid not in self._maskings:
            self._maskings[grid] = BlockMasking(grid, self.mask_ratio,
                                                probability=self.mask_probability)
        return self._maskings[grid]

    def teacher_temps_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls, patch) teacher temperatures of this step: 0-d device tensors read at the `step`
        buffer (index_select: indexing with a 0-d integer tensor would read it on the host)."""
        i = self.step.clamp(max=len(self.teacher_temps) - 1).reshape(1)
        return (self.teacher_temps.index_select(0, i).reshape(()),
                self.teacher_patch_temps.index_select(0, i).reshape(()))

    # the EMA momentum of the last update on the device, only logged: DINO's, from the same
    # attributes (step, base_momentum, total_steps)
    momentum_now = DINO.momentum_now

    def cls_loss(self, s_cls: torch.Tensor, t_cls: torch.Tensor, tau: torch.Tensor
                 ) -> torch.Tensor:
        """DINO's loss over the crop pairs; stats in self.criterion.last_stats."""
        return self.criterion(s_cls, t_cls, teacher_temp=tau)

    def patch_loss(self, s_patch: torch.Tensor, t_patch: torch.Tensor, masks: torch.Tensor,
                   tau: torch.Tensor) -> torch.Tensor:
        """(M, K) student / teacher logits of the masked tokens, masks (2B, N) on the host."""
        return self.patch_criterion(s_patch, t_patch, masks, teacher_temp=tau)

    def extra_losses(self, student: dict, teacher: dict, masks: torch.Tensor) -> dict:
        """{name: weighted loss} added to the total and logged (DINOv2: KoLeo)."""
        return {}

    # ------------------------------------------------------------------------- pieces
    def draw_masks(self, n_images: int, grid: tuple[int, int]) -> torch.Tensor:
        """(n_images, N) bool on the host, a function of (seed, rank, step, micro-batch) only:
        a resumed run draws what the uninterrupted one would have (accumulated micro-batches
        each get their own)."""
        step = self._current_step()
        micro = self._mask_key[1] + 1 if self._mask_key[0] == step else 0
        self._mask_key = (step, micro)
        rng = mask_rng(self.mask_seed, dist.rank(), step, micro)
        return self.masking(grid)(n_images, rng)

    def _current_step(self) -> int:
        if self._step is None:  # once after a resume
            self._step = int(self.step)
        return self._step

    def _patch_heads(self) -> tuple[nn.Module, nn.Module]:
        if self.shared_head:
            return self.head, self.t_head
        return self.patch_head, self.t_patch_head

    @staticmethod
    def _masked_index(masks: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Flat row indices of the masked tokens (mask.nonzero() order), computed on the host
        and copied without waiting on the device (pinned for a CUDA target)."""
        idx = masks.reshape(-1).nonzero().squeeze(1)
        if device.type == "cuda":
            idx = idx.pin_memory()
        return idx.to(device, non_blocking=True)

    def student(self, views: list[torch.Tensor], masks: torch.Tensor, idx: torch.Tensor
                ) -> dict:
        """{"cls": (V·B, K) view-major, "patch": (M, Kp), "cls_tokens": (2B, D) backbone cls
        of the masked global crops, "patch_tokens": (M, D)}."""
        tokens = self.backbone.forward_features(torch.cat(views[:2]), mask=masks)  # (2B,1+N,D)
        cls = [tokens[:, 0]]
        for _, group in groupby(views[2:], key=lambda v: tuple(v.shape[-2:])):
            cls.append(self.backbone(torch.cat(list(group))))  # the locals' cls, unmasked
        cls_tokens = torch.cat(cls)
        patch_tokens = tokens[:, 1:].reshape(-1, tokens.shape[-1]).index_select(0, idx)
        s_cls, s_patch = self._heads(self.head, self._patch_heads()[0], cls_tokens,
                                     patch_tokens)
        return {"cls": s_cls, "patch": s_patch, "cls_tokens": cls[0],
                "patch_tokens": patch_tokens}

    @torch.no_grad()
    def teacher(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict:
        """{"cls": (2B, K), "patch": (M, Kp)}: the unmasked global crops."""
        tokens = self.t_backbone.forward_features(torch.cat(views[:2]))  # no mask, ever
        patch_tokens = tokens[:, 1:].reshape(-1, tokens.shape[-1]).index_select(0, idx)
        t_cls, t_patch = self._heads(self.t_head, self._patch_heads()[1], tokens[:, 0],
                                     patch_tokens)
        return {"cls": t_cls, "patch": t_patch}

    def _heads(self, head: nn.Module, patch_head: nn.Module, cls: torch.Tensor,
               patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if head is patch_head:  # shared: one pass over cls and masked tokens together
            out = head(torch.cat([cls, patches]))
            return out[:len(cls)], out[len(cls):]
        return head(cls), patch_head(patches)

    # ------------------------------------------------------------------------- contract
    def forward(self, views: list[torch.Tensor]) -> dict:
        """`step_masks` on the host, then `masked_forward` (module doc)."""
        masks, idx, host_stats = self.step_masks(views)
        return {**self.masked_forward(views, masks, idx), **host_stats}

    # the draw is Python by design (masking.py), which dynamo cannot trace (random.Random):
    # a compiled forward runs this part eagerly and compiles the rest
    @torch.compiler.disable
    def step_masks(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(masks (2B, N) on the host, the flat indices (M,) of their masked tokens on the
        views' device, {"masked_fraction", "masked_images", "uniform_loss"}): no device sync."""
        g = views[0]
        p = self.backbone.patch_size
        grid = (g.shape[-2] // p, g.shape[-1] // p)
        masks = self.draw_masks(2 * g.shape[0], grid)  # (2B, N), crop-major like the batch
        n_masked = int(masks.sum())  # a host tensor: no device sync
        n_images = int(masks.any(1).sum())  # images with a masked token (the rest add 0)
        idx = self._masked_index(masks, g.device)
        # M changes every step: a compiled masked_forward traces it as a symbol from the
        # first call on (without this, the second step's M recompiles once); eager: a no-op
        torch._dynamo.maybe_mark_dynamic(idx, 0)
        # the loss of uniform outputs (collapse): the unmasked images add 0 to the patch loss
        uniform = (self.cls_weight * math.log(self.criterion.out_dim) + self.patch_weight
                   * n_images / len(masks) * math.log(self.patch_criterion.out_dim))
        return masks, idx, {"masked_fraction": n_masked / masks.numel(),
                            "masked_images": n_images / len(masks), "uniform_loss": uniform}

    def masked_forward(self, views: list[torch.Tensor], masks: torch.Tensor, idx: torch.Tensor
                       ) -> dict:
        """The loss and its device statistics for this step's masks (2B, N) and the flat
        indices idx (M,) of their masked tokens: no host read and no Python number that
        changes per step, so torch.compile(fullgraph=True) of it traces one graph for the run.
        """
        s = self.student(views, masks, idx)
        t = self.teacher(views, idx)
        tau_cls, tau_patch = self.teacher_temps_now()
        cls_loss = self.cls_loss(s["cls"], t["cls"], tau_cls)
        # called even with no masked token (M = 0 gives 0): every rank joins the loss's
        # center all-reduce, and the patch head stays in the graph for DDP
        patch_loss = self.patch_loss(s["patch"], t["patch"], masks, tau_patch)
        patch_entropy = self.patch_criterion.last_stats.get("teacher_entropy", 0.0)
        extra = self.extra_losses(s, t, masks)
        loss = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        for v in extra.values():
            loss = loss + v
        stats = self.criterion.last_stats
        return {"loss": loss, "cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                **{k: v.detach() for k, v in extra.items()},
                "teacher_entropy": stats["teacher_entropy"], "kl": stats["kl"],
                "teacher_patch_entropy": patch_entropy, "teacher_temp": tau_cls,
                "teacher_patch_temp": tau_patch, "momentum": self.momentum_now()}

    def param_groups(self, cfg) -> list[dict]:
        # Every head's last layer learns nothing useful before the rest settles: frozen for
        # epoch 1 (iBOT cancels the gradients of both heads' last layers).
        last = [(n, p) for n, p in self.named_parameters() if ".last_layer." in f".{n}"]
        rest = [(n, p) for n, p in self.named_parameters() if ".last_layer." not in f".{n}"]
        return split_decay(rest) + split_decay(last, freeze_steps=self.freeze_steps,
                                               name="last_layer")

    def encoder(self):
        return self.t_backbone  # the teacher, as DINO: iBOT evaluates and releases it

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step.fill_(step + 1)
        self._step = step + 1
        self.momentum = momentum_at(self.base_momentum, step + 1, total_steps)
        ema_update(self.t_backbone, self.backbone, self.momentum)
        ema_update(self.t_head, self.head, self.momentum)
        if not self.shared_head:
            ema_update(self.t_patch_head, self.patch_head, self.momentum)
