"""What every method shares: the contract base class and a few functions.

The contract (ARCHITECTURE.md): ``recipe`` (data recipe name), ``preset(arch)`` (paper
defaults merged into Config), ``small_preset(arch)`` (its overrides for images <= 64 px,
docs/presets.md), ``forward(views) -> {"loss", **logs}``, ``param_groups(cfg)``,
``on_step_end(step, total_steps)`` and ``encoder()``. One level of subclassing at most.
"""

from __future__ import annotations

import copy
import math
from itertools import groupby
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_backbone
from ..models.vit import DropPath


class Method(nn.Module):
    recipe: ClassVar[str] = "mocov2"
    sync_bn: ClassVar[bool] = False  # convert BN to SyncBatchNorm under DDP (heads with BN)
    # multi-crop: forward() takes 2 global + any number of local views (--local-crops);
    # "paper": the paper uses them, their number defaults to --n-local (DINO, SwAV)
    multicrop: ClassVar[bool | str] = False
    scale_key: ClassVar[str] = "scale"  # the recipe keyword --crop-scale sets

    @classmethod
    def preset(cls, arch: str | None) -> dict:
        """Paper defaults for this method (and this arch when it matters)."""
        return {}

    @classmethod
    def small_preset(cls, arch: str | None) -> dict:
        """Overrides of preset(arch) for images <= 64 px (--preset small, chosen
        automatically: engine/presets.py): the papers' CIFAR settings where they exist."""
        return {}

    @classmethod
    def recipe_kwargs(cls, cfg) -> dict:
        """Extra build_loader arguments: --crop-scale, and the multi-crop flags --local-crops /
        --n-local / --local-crop-scale for a method whose forward takes local views."""
        return {**crop_scale_kwargs(cfg, cls.scale_key), **multicrop_kwargs(cfg, cls)}

    def param_groups(self, cfg) -> list[dict]:
        return split_decay(self.named_parameters(), decay_all=bool(cfg.decay_all))

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA / queue / center updates after the optimizer step `step` (0-based)."""

    def encoder(self) -> nn.Module:
        """The backbone to evaluate and export."""
        return self.backbone

    def trained_encoder(self) -> nn.Module:
        """The backbone the optimizer updates (gradient monitors read its first layer)."""
        return self.backbone


# ----------------------------------------------------------------------------- small images
# What every method's small preset (Method.small_preset, images <= 64 px) shares, all about
# the image size, none about one dataset:
# - no Gaussian blur: SimCLR's CIFAR-10 recipe (appendix B.9) and solo-learn's CIFAR
#   augmentations (blur probability 0); a 23-px kernel at 32 px erases what tells classes apart
# - random-resized crops of 0.3-1 of the area: at 28-32 px a 0.08 crop is 8-9 px wide,
#   upsampled 3.5x; on Fashion-MNIST 0.3-1 beat 0.08-1 (docs/quality.md)
# - batch 128: the lr still follows --blr x batch / 256; on small images a run is step-bound
#   and batches of 64-128 gained more per CPU minute than 256 (docs/quality.md)
SMALL_IMAGES = dict(blur=False, crop_scale=(0.3, 1.0), batch_size=128)
# Zero-init residuals: SimSiam's and MoCo v3's ImageNet presets zero the last BN of every
# residual block (the official code's zero-init-residual, Goyal et al.'s large-batch ImageNet
# trick); their small presets do not. At batch 64-128 nothing needs it, and it leaves the
# random-init ResNet a stack of near-identity blocks whose k-NN on Fashion-MNIST is 27%
# against 77% without, so it is no random-init baseline to beat; SimSiam's trained k-NN was
# 80.6% with it against 82.8% for the recorded row without (docs/quality.md).


def cpu_heads(arch: str | None, paper: dict | None = None, **cpu) -> dict:
    """The head widths `paper` (a dict of config fields), with `cpu` over them on the CPU
    ResNet (presets.CPU_RESNETS; arch None is the Config default, resnet_tiny). The papers'
    2048-4096-wide MLP heads are sized for ResNet-18/50 features of 512-2048; on resnet_tiny's
    256 they are ~40% of a step's CPU time (BYOL at 4096: 847 img/s, at 1024: 1205), time a
    short run needs for steps (docs/presets.md)."""
    from ..engine.presets import CPU_RESNETS

    return {**(paper or {}), **(cpu if arch in CPU_RESNETS or arch is None else {})}


# ----------------------------------------------------------------------------- building
def crop_scale_kwargs(cfg, name: str, field: str = "crop_scale") -> dict:
    """{name: cfg.<field>} (--crop-scale, or DINO's --local-crop-scale) for the recipe, or {}
    to keep the paper's range."""
    value = getattr(cfg, field)
    if value is None:
        return {}
    lo, hi = value
    if not 0 < lo <= hi <= 1:
        flag = "--" + field.replace("_", "-")
        raise ValueError(f"{flag} must be two area fractions 0 < MIN <= MAX <= 1, "
                         f"got {lo} {hi}")
    return {name: (float(lo), float(hi))}


def multicrop_kwargs(cfg, cls) -> dict:
    """{n_local, local_scale} for the recipe's multi-crop (selfsup.data.recipes
    .with_local_crops), or {} for the recipe's default.

    --local-crops N asks any method that takes local views (cls.multicrop) for N of them; a
    method whose paper uses multi-crop (cls.multicrop == "paper": DINO, SwAV) defaults to its
    --n-local (preset 8 / 6); the others default to none, and ignore --n-local as they always
    have. A method that cannot take local views refuses --local-crops."""
    n_local = cfg.local_crops
    if not cls.multicrop:
        if n_local:
            raise ValueError(f"--local-crops: --method {cfg.method} takes no local views "
                             f"(multi-crop: {', '.join(multicrop_methods())})")
        return {}
    if n_local is None and cls.multicrop == "paper":
        n_local = cfg.n_local
    if n_local is not None and (not isinstance(n_local, int) or n_local < 0):
        raise ValueError(f"--local-crops must be an int >= 0, got {n_local!r}")
    out = {} if n_local is None else {"n_local": n_local}
    return {**out, **crop_scale_kwargs(cfg, "local_scale", "local_crop_scale")}


def multicrop_methods() -> list[str]:
    from . import METHODS  # the registry imports this module

    return [name for name, cls in METHODS.items() if cls.multicrop]


def crop_pairs(n_views: int, *, symmetric: bool) -> list[tuple[int, int]]:
    """The multi-crop loss terms (g, v): global view g (0 or 1) as the target of view v.

    symmetric=False (a target and a prediction: BYOL, SimSiam, SwAV, DINO): every v != g,
    2 (V - 1) terms. symmetric=True (a loss of two embeddings: SimCLR, Barlow Twins, VICReg):
    each unordered pair once, (0, 1) then each local against both globals, 2 V - 3 terms.
    Two views give [(0, 1), (1, 0)] and [(0, 1)]: the two-view losses unchanged."""
    if n_views < 2:
        raise ValueError(f"multi-crop needs the 2 global views, got {n_views} view(s)")
    if symmetric:
        return [(g, v) for g in (0, 1) for v in range(g + 1, n_views)]
    return [(g, v) for g in (0, 1) for v in range(n_views) if v != g]


def multicrop_forward(backbone, head, views: list[torch.Tensor]) -> torch.Tensor:
    """Run consecutive same-size views as one batch; (V*B, K) in view-major order (DINO's and
    SwAV's official multi-crop forward: the 2 globals share one batch, the locals another)."""
    out = [head(backbone(torch.cat(list(group))))
           for _, group in groupby(views, key=lambda v: tuple(v.shape[-2:]))]
    return torch.cat(out)


def recipe_is_default(cfg, cls) -> bool:
    """True unless --aug picked another recipe than the method's own."""
    return cfg.aug in (None, cls.recipe)


def split_decay(named_params, *, decay_all: bool = False, **extra) -> list[dict]:
    """Two groups: weights, and biases/norm parameters (ndim <= 1).

    The second group is exempt from weight decay (BYOL, SimCLR, DINO, MAE), or with
    decay_all=True decayed like the weights (official MoCo v1/v2, SimSiam and MoCo v3's
    AdamW put every parameter under weight decay). LARS skips it either way, both its trust
    ratio and its decay (MoCo v3's LARS, BYOL and SimCLR exclude biases and norms)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [dict(params=decay, **extra), dict(params=no_decay, apply_wd=decay_all,
                                                lars_exclude=True, **extra)]
    return [g for g in groups if g["params"]]


def is_vit(arch: str | None) -> bool:
    return bool(arch) and arch.startswith("vit")


def build_encoder(cfg, **kw) -> nn.Module:
    """The backbone named by cfg.arch at the run's image size.

    Small images (<= 64 px): ViTs default to patch 4, ResNets to the CIFAR stem (3x3 conv,
    no max-pool); --cifar-stem / --no-cifar-stem choose the ResNet stem explicitly.
    --grad-ckpt turns on activation checkpointing in ViT blocks; --drop-path and --vit-init
    apply to ViTs, --zero-init-residual to ResNets (each a ValueError for the other family).
    This is the trained encoder: its momentum / target / teacher copies (frozen_copy) never
    drop paths.
    """
    small = bool(cfg.img_size) and cfg.img_size <= 64
    cifar_stem = cfg.cifar_stem
    if is_vit(cfg.arch):
        # a flag that would act on the other family is an error, not silently dropped
        for flag, acts in (("--cifar-stem", cifar_stem is not None),
                           ("--zero-init-residual", bool(cfg.zero_init_residual))):
            if acts:
                raise ValueError(f"{flag} applies to ResNets only, not --arch {cfg.arch}")
        kw.setdefault("patch_size", cfg.patch_size or (4 if small else None))
        kw.setdefault("drop_path", cfg.drop_path or 0.0)
        kw.setdefault("init", cfg.vit_init or "xavier")
        kw.setdefault("registers", getattr(cfg, "registers", 0) or 0)  # docs/dinov2.md
        kw.setdefault("layer_scale", getattr(cfg, "layer_scale", None))
    else:
        for flag, acts in (("--drop-path", bool(cfg.drop_path)),
                           ("--vit-init", cfg.vit_init not in (None, "xavier")),
                           ("--registers", bool(getattr(cfg, "registers", 0))),
                           ("--layer-scale", getattr(cfg, "layer_scale", None) is not None)):
            if acts:
                raise ValueError(f"{flag} applies to ViTs only, not --arch {cfg.arch}")
        kw.setdefault("cifar_stem", small if cifar_stem is None else cifar_stem)
        kw.setdefault("zero_init_residual", bool(cfg.zero_init_residual))
    net = build_backbone(cfg.arch, img_size=cfg.img_size, in_chans=cfg.in_chans, **kw)
    if cfg.grad_ckpt and hasattr(net, "set_grad_checkpointing"):
        net.set_grad_checkpointing(True)
    return net


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that gets no gradient (momentum / target / teacher encoder).

    Its stochastic depth is off: DINO's teacher (and every official EMA branch) runs the
    whole network; only the trained student drops paths."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        if isinstance(m, DropPath):
            m.p = 0.0
    return twin


# ----------------------------------------------------------------------------- EMA
def momentum_at(base: float, step: int, total: int) -> float:
    """Cosine EMA momentum base -> 1 (BYOL, MoCo v3, DINO): 1 - (1-base)(cos(pi t/T)+1)/2."""
    if total <= 1:
        return base
    t = min(max(step, 0), total - 1) / (total - 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online, for parameters and float buffers.

    One fused `torch._foreach_lerp_` per tensor kind: no per-parameter Python loop.
    """
    tp, op = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(tp, op, 1.0 - momentum)
    tb = [b for b in target.buffers() if b.is_floating_point()]
    ob = [b for b in online.buffers() if b.is_floating_point()]
    if tb:
        torch._foreach_lerp_(tb, ob, 1.0 - momentum)
    # integer buffers (BN's num_batches_tracked) are copied
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if not t.is_floating_point():
            t.copy_(o)


# ----------------------------------------------------------------------------- monitors
@torch.no_grad()
def collapse_stats(z: torch.Tensor) -> dict:
    """std over the batch of normalize(z), averaged over dims: ~1/sqrt(d) healthy, 0 collapsed."""
    zn = F.normalize(z.detach().float(), dim=1)
    return {"collapse_std": zn.std(0).mean(), "collapse_dim": float(z.shape[1])}


def cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean cos(p, sg(z)): SimSiam's D(p, z)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()
