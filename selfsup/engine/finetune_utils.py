"""Pieces of supervised fine-tuning (selfsup.finetune): the classifier around a pretrained
encoder, layer-wise lr decay, stochastic depth, random erasing, mixup / cutmix and the
soft-target loss.

Derived from the papers, not from their code:
- Layer-wise lr decay (BEiT, Bao et al. 2022, §2.4; MAE, He et al. 2022, App. A.2): a ViT of
  depth L has L + 2 "layers": 0 = patch embedding, cls token and position embedding, i = block
  i - 1 (i = 1..L), L + 1 = everything after the blocks (final norm, fc_norm, head). Layer i
  learns at lr * decay^(L + 1 - i): the head at the full lr, the last block at lr * decay, the
  embedding at lr * decay^(L + 1).
- Pooling, as each method fine-tunes: MAE averages the patch tokens of the last block and
  normalizes the mean with a fresh LayerNorm (fc_norm; the pretrained final norm is unused);
  MoCo v3 and DINO (DeiT's recipe) classify the normed cls token.
- Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) pair each image with the batch in
  reverse order; one of the two per batch (switch probability 0.5 when both are on), lambda
  ~ Beta(alpha, alpha). CutMix pastes a box of area (1 - lambda) H W (clipped at the border)
  and the label mass follows the pasted area exactly. Label smoothing (Szegedy et al. 2016)
  puts eps / C on every class and 1 - eps + eps / C on the true one; the loss is the
  cross-entropy against these soft targets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("auto", "cls", "avg")
AVG_POOL_METHODS = ("mae",)  # methods whose fine-tuning averages the patch tokens


# ----------------------------------------------------------------------------- the model
def is_vit_encoder(encoder: nn.Module) -> bool:
    return hasattr(encoder, "blocks") and hasattr(encoder, "cls_token")


def resolve_pool(pool: str, method: str, encoder: nn.Module) -> str:
    """"cls" | "avg" for a ViT ("auto": as `method` was pretrained), "resnet" for a ResNet."""
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {POOLS}, got {pool!r}")
    if not is_vit_encoder(encoder):
        if pool != "auto":
            raise ValueError(f"--pool {pool} applies to ViTs only; a ResNet classifies its "
                             "global average pool")
        return "resnet"
    if pool == "auto":
        return "avg" if method in AVG_POOL_METHODS else "cls"
    return pool


def set_drop_path(encoder: nn.Module, rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 (first block) to `rate` (last block), the rule
    VisionTransformer(drop_path=rate) builds with; returns the per-block rates."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"--drop-path must be in [0, 1), got {rate}")
    if not is_vit_encoder(encoder):
        if rate:
            raise ValueError(f"--drop-path applies to ViTs only, got {rate} for a ResNet")
        return []
    depth = len(encoder.blocks)
    rates = [rate * i / max(depth - 1, 1) for i in range(depth)]
    for blk, r in zip(encoder.blocks, rates, strict=True):
        blk.drop_path.p = r
    return rates


class Classifier(nn.Module):
    """A pretrained encoder under a linear head: (B, C, H, W) -> logits (B, num_classes).

    pool: "avg" (mean patch token -> fc_norm, MAE), "cls" (the normed cls token), "resnet"
    (the ResNet's global average pool). probe=True is MAE's linear probe: the frozen encoder's
    own features (`encoder(x)`, as `selfsup.eval linear` takes them) under BatchNorm without
    affine + Linear; only the head learns.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str, *,
                 probe: bool = False, head_init_std: float | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder, self.pool, self.probe = encoder, pool, probe
        dim = encoder.feature_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "avg" and not probe else None
        linear = nn.Linear(dim, num_classes)
        # Fine-tuning: a near-zero head (std 2e-5), so at step 0 every class is equally likely
        # and the first, large gradients do not flow back through a random projection into
        # the pretrained blocks. The probe: std 0.01, since LARS steps are proportional to the
        # weight's norm and a near-zero head would hardly move.
        if head_init_std is None:
            head_init_std = 0.01 if probe else 2e-5
        nn.init.trunc_normal_(linear.weight, std=head_init_std, a=-2 * head_init_std,
                              b=2 * head_init_std)
        nn.init.zeros_(linear.bias)
        self.head = (nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
                     if probe else linear)
        if probe:
            encoder.requires_grad_(False)
        elif pool == "avg":  # the final norm is bypassed: frozen, so DDP expects no gradient
            encoder.norm.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.probe:  # frozen: BN statistics and drop path stay as in evaluation
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        enc = self.encoder
        if self.probe:
            with torch.no_grad():
                return enc(x)
        if self.pool == "resnet":
            return enc(x)
        h = enc._run_blocks(enc._embed(x), enc.blocks)  # (B, 1+R+L, D), before the final norm
        if getattr(enc, "num_registers", 0):  # registers are never pooled
            h = enc.drop_registers(h)
        if self.pool == "avg":
            return self.fc_norm(h[:, 1:].mean(1))
        return enc.norm(h)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- parameter groups
def layer_id(name: str, depth: int) -> int:
    """BEiT's layer index of a Classifier parameter name (see the module docstring)."""
    if name.startswith(("encoder.cls_token", "encoder.reg_token", "encoder.pos_embed",
                        "encoder.patch_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1  # encoder.norm, fc_norm, head


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norm gains and the token / position embeddings are not decayed (BEiT, MAE)."""
    return p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in (
        "cls_token", "reg_token", "pos_embed")


def param_groups(model: Classifier, layer_decay: float) -> list[dict]:
    """Optimizer groups with `lr_scale` (layer-wise decay) and `apply_wd`, one per (layer,
    decayed?) pair; a ResNet (no layers to decay) or a probe gets lr_scale 1 everywhere."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    vit = is_vit_encoder(model.encoder) and not model.probe
    depth = len(model.encoder.blocks) if vit else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth) if vit else 0
        decay = not no_weight_decay(name, p)
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - lid) if vit else 1.0
            groups[key] = dict(params=[], lr_scale=scale, apply_wd=decay,
                               lars_exclude=not decay,
                               name=f"layer{lid}_{'wd' if decay else 'nowd'}")
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------- mixup / cutmix
def smooth_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, C) float targets: eps / C off the label, 1 - eps + eps / C on it."""
    off = smoothing / num_classes
    t = torch.full((len(y), num_classes), off, device=y.device)
    return t.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(lam: float, h: int, w: int, centre: tuple[float, float]
               ) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): a box of about (1 - lam) h w around the pixel at `centre` (fractions
    of h and w in [0, 1)), clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(centre[0] * h), int(centre[1] * w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class Mixup:
    """Mix a batch and its labels: `(x, y, rng) -> (x_mixed, soft targets (B, C))`.

    Each batch is mixed with probability `prob`; it is then CutMix with probability
    `switch_prob` when both alphas are > 0 (else whichever is on), Mixup otherwise. The
    partner of image i is image B - 1 - i (the batch flipped), so nothing is sampled twice.
    An alpha of 0 turns that kind off; both 0 leaves only label smoothing.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 smoothing: float = 0.1, prob: float = 1.0, switch_prob: float = 0.5) -> None:
        for name, v in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)):
            if v < 0:
                raise ValueError(f"--{name} alpha must be >= 0, got {v}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"--smoothing must be in [0, 1), got {smoothing}")
        for name, v in (("mix-prob", prob), ("switch-prob", switch_prob)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {v}")
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        target = smooth_targets(y, self.num_classes, self.smoothing)
        # Every draw is made whatever the outcome, so one batch's choice never shifts the next.
        u_mix, u_switch, cy, cx = rng.random(4)
        lam_mixup = rng.beta(self.mixup_alpha, self.mixup_alpha) if self.mixup_alpha > 0 else 1.0
        lam_cut = rng.beta(self.cutmix_alpha, self.cutmix_alpha) if self.cutmix_alpha > 0 else 1.0
        if not self.active or u_mix >= self.prob:
            return x, target
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0
                                                or u_switch < self.switch_prob)
        partner = x.flip(0)
        if use_cutmix:
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(float(lam_cut), h, w, (cy, cx))
            x = x.clone()
            x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the pasted area decides, not the draw
        else:
            lam = float(lam_mixup)
            x = x * lam + partner * (1.0 - lam)
        return x, target * lam + target.flip(0) * (1.0 - lam)


class RandomErasing:
    """Random Erasing (Zhong et al. 2020), as MAE's fine-tuning applies it (p = 0.25): each
    image, with probability p, gets one box of area U(0.02, 1/3) of the image and aspect ratio
    log-uniform in (0.3, 1/0.3) replaced by N(0, 1) noise per pixel and channel (the images
    are normalized, so that is noise at the data's own scale). Ten tries to fit the box, else
    the image is left alone. Applied before mixup / cutmix, as a per-image augmentation.
    """

    def __init__(self, p: float = 0.25, scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 10) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"--reprob must be in [0, 1], got {p}")
        self.p, self.scale, self.ratio, self.tries = p, scale, ratio, tries

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.p == 0:
            return x
        b, c, h, w = x.shape
        # every value drawn up front, whatever the coins say
        coin = rng.random(b)
        area = rng.uniform(*self.scale, (b, self.tries)) * h * w
        logr = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), (b, self.tries))
        pos = rng.random((b, self.tries, 2))
        eh = np.rint(np.sqrt(area * np.exp(logr))).astype(int)
        ew = np.rint(np.sqrt(area / np.exp(logr))).astype(int)
        fits = (eh >= 1) & (ew >= 1) & (eh <= h) & (ew <= w)
        out = None
        for i in np.flatnonzero((coin < self.p) & fits.any(1)):
            t = int(np.argmax(fits[i]))
            bh, bw = int(eh[i, t]), int(ew[i, t])
            top, left = int(pos[i, t, 0] * (h - bh + 1)), int(pos[i, t, 1] * (w - bw + 1))
            noise = torch.from_numpy(rng.standard_normal((c, bh, bw), dtype=np.float32))
            out = x.clone() if out is None else out
            out[i, :, top:top + bh, left:left + bw] = noise.to(x.device, x.dtype)
        return x if out is None else out


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b sum_c -target[b, c] log softmax(logits)[b, c]; float32 whatever the autocast."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
